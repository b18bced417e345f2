"""Quantized weights and KV cache dtypes through the engine: a GGUF file's Q4_0/Q4_1/Q8_0
blocks kept as they are give the tokens and logprobs of the dequantized model; int8/int4 at
load hold a fraction of the float bytes and stay close to it; every KV cache dtype generates
close to the float cache and fits more pages in less memory; nothing compiles after warm-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q

from engine import LLM, EngineConfig, SamplingParams
from engine.worker import runner as runner_module
from engine.worker.sizing import page_bytes, pages_that_fit
from models.checkpoint import PROJECTIONS, load_config
from pallas_kernels import cpu as cpu_kernels
from tests.gguf_files import write_model_gguf

SMALL = dict(max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_pages=64,
             max_model_len=64, warmup=False, compilation_cache_dir="")
# Every linear in a block type that stays quantized; the embedding's Q8_0 is dequantized.
BLOCKS = {"embed_tokens": Q.Q8_0, "q_proj": Q.Q4_0, "k_proj": Q.Q4_1, "v_proj": Q.Q8_0,
          "o_proj": Q.Q4_0, "gate_proj": Q.Q4_1, "up_proj": Q.Q8_0, "down_proj": Q.Q4_1}


@pytest.fixture(scope="module")
def quantized_gguf(hf_model_dirs, tmp_path_factory):
    return write_model_gguf(hf_model_dirs["llama"], tmp_path_factory.mktemp("q") / "q.gguf",
                            BLOCKS)


def _prompts(seed: int, count: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 259, size=int(n)).tolist()}
            for n in rng.integers(3, 12, size=count)]


def _greedy(llm: LLM, prompts: list[dict]):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def _prompt_logprobs(llm: LLM, prompts: list[dict]) -> np.ndarray:
    """Every scored prompt token's logprob (teacher forced: no drift between models)."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return np.array([next(iter(entry.values())).logprob for o in outputs
                     for entry in o.prompt_logprobs if entry])


def _linear_arrays(llm: LLM) -> dict[str, jax.Array]:
    """The projections' parameters by path, e.g. 'model.layers.mlp.up_proj.q'."""
    flat = nnx.to_flat_state(llm.engine.runner.params)
    return {".".join(map(str, path)): variable.get_value() for path, variable in flat
            if str(path[-2]) in PROJECTIONS}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kept_gguf_blocks_give_the_dequantized_models_tokens(quantized_gguf, scan_layers):
    prompts = _prompts(1)
    kept = LLM(quantized_gguf, quantization=None, scan_layers=scan_layers, **SMALL)
    arrays = _linear_arrays(kept)
    assert not any(name.endswith(".weight") for name in arrays)   # no float copy of a linear
    assert {str(a.dtype) for name, a in arrays.items()
            if name.endswith((".q", ".packed"))} == {"int8", "uint8"}
    dequantized = LLM(quantized_gguf, quantization="none", scan_layers=scan_layers, **SMALL)
    assert all(name.endswith(".weight") for name in _linear_arrays(dequantized))
    for got, want in zip(_greedy(kept, prompts), _greedy(dequantized, prompts), strict=True):
        assert got.token_ids == want.token_ids
        for got_step, want_step in zip(got.logprobs, want.logprobs, strict=True):
            token = next(iter(want_step))
            assert abs(got_step[token].logprob - want_step[token].logprob) < 1e-4


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_a_q8_0_head_kept_gives_the_dequantized_models_tokens(hf_model_dirs, tmp_path, kind):
    # Qwen2's tiny model ties its head to the embedding (Q8_0 here); Llama's head is its own
    # tensor, written Q8_0. Kept, the head is also held as the file's blocks, which a decode's
    # few rows read (the C++ kernel on a CPU); more rows (prompt logprobs) and the tokens'
    # embeddings use the float weights.
    path = write_model_gguf(hf_model_dirs[kind], tmp_path / f"{kind}.gguf",
                            {**BLOCKS, "lm_head": Q.Q8_0})
    prompts = _prompts(2)
    kept = LLM(path, quantization=None, **SMALL)
    runner = kept.engine.runner
    model = nnx.merge(runner.graphdef, runner.params)
    assert model.config.head_blocks and (model.lm_head is None) == (kind == "qwen2")
    blocks = model.head_blocks
    assert blocks.q[...].dtype == jnp.int8 and blocks.scale[...].dtype == jnp.float16
    hidden = jnp.ones((1, model.config.hidden_size), jnp.float32)
    uses_kernel = "ember_table_matmul" in nnx.jit(lambda m, h: m.logits(h)).lower(
        model, hidden).as_text()
    assert uses_kernel == (jax.default_backend() == "cpu" and cpu_kernels.available())
    dequantized = LLM(path, quantization="none", **SMALL)
    assert "head_blocks" not in str(nnx.to_flat_state(dequantized.engine.runner.params))
    for got, want in zip(_greedy(kept, prompts), _greedy(dequantized, prompts), strict=True):
        assert got.token_ids == want.token_ids
        for got_step, want_step in zip(got.logprobs, want.logprobs, strict=True):
            token = next(iter(want_step))
            assert abs(got_step[token].logprob - want_step[token].logprob) < 1e-4
    np.testing.assert_allclose(_prompt_logprobs(kept, prompts),
                               _prompt_logprobs(dequantized, prompts), atol=1e-4)


# int8 per channel is 1 byte + a f32 scale per 64 inputs here (hidden 64): 0.27 of f32;
# int4 0.5 byte + a f32 scale and minimum per 32 inputs: 0.19. The tiny model's random,
# spread weights are int4's worst case (a real model's error is far smaller: the bench).
@pytest.mark.parametrize("quantization, max_ratio, max_error, mean_error",
                         [("int8", 0.27, 0.1, 0.04), ("int4", 0.19, 1.0, 0.4)])
def test_int8_and_int4_at_load_hold_less_and_stay_close(hf_model_dirs, quantization,
                                                        max_ratio, max_error, mean_error):
    prompts = _prompts(2)
    float_llm = LLM(hf_model_dirs["llama"], **SMALL)
    quantized = LLM(hf_model_dirs["llama"], quantization=quantization, **SMALL)
    nbytes = lambda llm: sum(a.nbytes for a in _linear_arrays(llm).values()
                             if a.ndim >= 2 and a.size > 64 * 2)   # weights, not biases
    assert nbytes(quantized) <= max_ratio * nbytes(float_llm)
    error = np.abs(_prompt_logprobs(quantized, prompts) - _prompt_logprobs(float_llm, prompts))
    assert 0 < error.max() < max_error and error.mean() < mean_error
    first = lambda llm: [o.token_ids[0] for o in _greedy(llm, prompts)]
    if quantization == "int8":
        assert first(quantized) == first(float_llm)


@pytest.mark.parametrize("kv_cache_dtype, max_error", [("bfloat16", 0.05),
                                                       ("float8_e4m3fn", 0.2), ("int8", 0.1)])
def test_kv_cache_dtypes_generate_close_to_the_float_cache(hf_model_dirs, kv_cache_dtype,
                                                           max_error):
    prompts = _prompts(3)
    float_llm = LLM(hf_model_dirs["llama"], **SMALL)
    llm = LLM(hf_model_dirs["llama"], kv_cache_dtype=kv_cache_dtype, **SMALL)
    pages = jax.tree.leaves(llm.engine.runner.kv_cache)[0]
    assert str(pages.dtype) == kv_cache_dtype
    error = np.abs(_prompt_logprobs(llm, prompts) - _prompt_logprobs(float_llm, prompts))
    assert error.max() < max_error
    assert all(len(o.token_ids) == 8 for o in _greedy(llm, prompts))


def test_smaller_kv_dtypes_fit_more_pages(hf_model_dirs, monkeypatch):
    config = load_config(hf_model_dirs["llama"])
    per_page = {dtype: page_bytes(config, EngineConfig(kv_cache_dtype=dtype))
                for dtype in ("auto", "bfloat16", "float8_e4m3fn", "int8")}
    assert per_page["auto"] == 2 * per_page["bfloat16"]
    # The 8-bit caches carry one f32 scale per token and head.
    assert per_page["float8_e4m3fn"] == per_page["int8"] < per_page["bfloat16"]

    class Accelerator:   # a device reporting its memory, as a GPU or TPU does
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_limit": 1 << 30, "bytes_in_use": 0}

    monkeypatch.setattr(runner_module.jax, "devices", lambda: [Accelerator()])
    fits = {dtype: pages_that_fit(config, EngineConfig(kv_cache_dtype=dtype))
            for dtype in per_page}
    assert fits["auto"] < fits["bfloat16"] < fits["int8"] == fits["float8_e4m3fn"]


def test_a_bad_kv_cache_dtype_is_refused_by_name(hf_model_dirs):
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp4': expected one of"):
        LLM(hf_model_dirs["llama"], kv_cache_dtype="fp4", **SMALL)


def test_quantized_weights_and_int8_kv_compile_nothing_after_warmup(quantized_gguf):
    llm = LLM(quantized_gguf, kv_cache_dtype="int8", **{**SMALL, "warmup": True})
    rng = np.random.default_rng(4)
    prompts = [{"prompt_token_ids": rng.integers(3, 259, size=int(n)).tolist()}
               for n in rng.integers(1, 40, size=8)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 9)), temperature=0.8, seed=i,
                             logprobs=2 if i % 3 else None, prompt_logprobs=1 if i % 4 else None)
              for i in range(len(prompts))]
    assert all(o.finished for o in llm.generate(prompts, params, use_tqdm=False))
    assert llm.engine.compilations_after_warmup == 0
