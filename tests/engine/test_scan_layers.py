"""The engine with its layers scanned or unrolled: the same tokens, a KV cache updated in place
(no copy of it per step, whatever its size), the token ladder from 1, the scan_layers option."""

import jax
import numpy as np
import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.worker.host_arrays import empty_batch
from engine.worker.step import jit_steps
from models.checkpoint import abstract_model, load_config
from models.paged import kv_cache_shape
from models.transformer import rotary_table
from tests.hf_models import ARCHITECTURES

# One prefill rung (16) and one decode rung (4): each engine compiles its forward twice.
SMALL = dict(max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_pages=64,
             max_model_len=64, warmup=False, compilation_cache_dir="")


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_scanned_and_unrolled_generate_the_same_tokens(kind, hf_model_dirs):
    rng = np.random.default_rng(sorted(ARCHITECTURES).index(kind))
    prompts = [{"prompt_token_ids": rng.integers(3, 259, size=n).tolist()} for n in (2, 3, 4, 7)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    runs = {}
    for scan_layers in (True, False):
        llm = LLM(hf_model_dirs[kind], scan_layers=scan_layers, **SMALL)
        runs[scan_layers] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    for scanned, unrolled in zip(runs[True], runs[False], strict=True):
        assert scanned.token_ids == unrolled.token_ids
        for want, got in zip(unrolled.logprobs, scanned.logprobs, strict=True):
            for token, logprob in want.items():
                assert abs(got[token].logprob - logprob.logprob) < 1e-4
    assert len({tuple(o.token_ids) for o in runs[True]}) == len(prompts)   # text that varies


def test_a_scanned_engine_compiles_nothing_after_warmup(hf_model_dirs):
    llm = LLM(hf_model_dirs["llama"], scan_layers=True, **{**SMALL, "warmup": True})
    rng = np.random.default_rng(3)
    prompts = [{"prompt_token_ids": rng.integers(3, 259, size=int(n)).tolist()}
               for n in rng.integers(1, 40, size=12)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 9)), temperature=0.8, seed=i,
                             logprobs=2 if i % 3 else None, prompt_logprobs=1 if i % 4 else None,
                             repetition_penalty=1.2 if i % 2 else 1.0)
              for i in range(len(prompts))]
    assert all(o.finished for o in llm.generate(prompts, params, use_tqdm=False))
    assert llm.engine.compilations_after_warmup == 0


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 2, 16])
def test_the_forward_updates_the_kv_cache_in_place(hf_model_dirs, scan_layers, num_tokens):
    # Compiled for a cache of 64k pages (shapes only): it comes back in the donated buffer,
    # and the step's scratch memory stays far below the cache's size (a copy would not).
    config = load_config(hf_model_dirs["llama"], scan_layers=scan_layers)
    engine = EngineConfig(**SMALL)
    graphdef, state = abstract_model(config)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    kv_cache = jax.ShapeDtypeStruct(kv_cache_shape(config, 65536, engine.page_size), np.float32)
    batch, indices = empty_batch(num_tokens, engine.max_num_seqs, 16)
    previous_rows = np.full(num_tokens, -1, np.int32)
    draws = jax.ShapeDtypeStruct((engine.max_num_seqs,), np.int32)
    rotation = jax.eval_shape(lambda: rotary_table(config, 16 * engine.page_size))
    compiled = jit_steps(graphdef, engine).forward.lower(abstract, kv_cache, batch, indices,
                                                         previous_rows, draws, rotation).compile()
    memory = compiled.memory_analysis()
    cache_bytes = np.prod(kv_cache.shape) * 4
    assert memory.alias_size_in_bytes == cache_bytes
    assert memory.temp_size_in_bytes < cache_bytes / 20, memory


def test_the_token_ladder_starts_at_one():
    assert EngineConfig().token_ladder == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert EngineConfig(max_num_seqs=8, max_num_batched_tokens=48).token_ladder == (
        1, 2, 4, 8, 16, 32, 48)


@pytest.mark.parametrize("value", [1, 0, "yes"])
def test_scan_layers_is_true_false_or_none(value):
    with pytest.raises(ValueError, match=f"scan_layers={value!r}: expected None"):
        EngineConfig(scan_layers=value)


def test_auto_scans_models_of_more_than_eight_layers():
    assert not EngineConfig().scans(2) and not EngineConfig().scans(8)
    assert EngineConfig().scans(9) and EngineConfig().scans(30)
    assert EngineConfig(scan_layers=True).scans(2)
    assert not EngineConfig(scan_layers=False).scans(80)
