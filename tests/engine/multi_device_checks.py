"""Tensor parallelism on 8 fake CPU devices: the same tokens, logprobs and seeded draws as one
device for every architecture, weights split across devices as loaded (quantized ones too,
as their integer blocks), no compilation after warm-up.

Not collected by the main test session (which keeps one device): test_tensor_parallel.py runs
it in a child pytest with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q

from engine import LLM, SamplingParams
from models import convert_to_orbax, load_config, load_model
from models.checkpoint import PROJECTIONS
from models.sharding import ShardingPlan
from tests.gguf_files import write_model_gguf
from tests.hf_models import ARCHITECTURES, build_hf_model

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (run by "
                                "tests/engine/test_tensor_parallel.py)")

# 8 query heads; kv heads below, at and above N; a vocabulary no N divides (333 = 3^2 * 37).
KV_HEADS = {"llama": 2, "mistral": 4, "qwen2": 8, "qwen3": 2, "gemma": 1}
VOCAB = 333
# One token rung (16) and one sequence rung (4) for the parity runs: each engine compiles
# its forward once. page_size 4 spreads every sequence over several pages.
SMALL = dict(max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_pages=64,
             max_model_len=64, warmup=False, compilation_cache_dir="")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_models")
    return {kind: build_hf_model(kind, root / kind, seed=index, num_attention_heads=8,
                                 num_key_value_heads=KV_HEADS[kind], vocab_size=VOCAB)
            for index, kind in enumerate(sorted(ARCHITECTURES))}


def parity_requests(seed):
    """Four prompts (16 tokens in all): two greedy, two seeded draws; logprobs everywhere."""
    rng = np.random.default_rng(seed)
    lengths = [3, 4, 4, 5]
    prompts = [{"prompt_token_ids": rng.integers(3, 259, size=n).tolist()} for n in lengths]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    drawn = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=int(seed) + 11,
                           ignore_eos=True, logprobs=3)
    return prompts, [greedy, greedy, drawn, drawn]


def run(model_dir, size, seed):
    prompts, params = parity_requests(seed)
    outputs = LLM(model_dir, tensor_parallel_size=size, **SMALL).generate(prompts, params,
                                                                           use_tqdm=False)
    return [output.outputs[0] for output in outputs], [output.prompt_logprobs for output in outputs]


def assert_close_logprobs(expected, actual):
    """Per position: the same token ids, logprobs within 1e-5."""
    for want, got in zip(expected, actual, strict=True):
        if want is None:
            assert got is None
            continue
        assert sorted(want) == sorted(got)
        for token, logprob in want.items():
            assert abs(got[token].logprob - logprob.logprob) <= 1e-5, (token, logprob, got)


@pytest.mark.parametrize("kind", sorted(KV_HEADS))
def test_tokens_and_logprobs_equal_one_device(kind, model_dirs):
    seed = sorted(KV_HEADS).index(kind)
    expected, expected_prompt = run(model_dirs[kind], 1, seed)
    assert len({tuple(o.token_ids) for o in expected}) == 4   # text that varies
    for size in (2, 4, 8):
        samples, prompt_logprobs = run(model_dirs[kind], size, seed)
        for want, got in zip(expected, samples):
            assert got.token_ids == want.token_ids, (size, want.token_ids, got.token_ids)
            assert_close_logprobs(want.logprobs, got.logprobs)
        for want, got in zip(expected_prompt[:2], prompt_logprobs[:2]):
            assert_close_logprobs(want, got)


def test_pallas_kernels_run_per_shard(model_dirs):
    """The GPU kernels (interpret mode) with kv heads repeated (2 -> 4 devices), the TPU
    kernels with one kv head per device: the reference's tokens on one device."""
    prompts, params = parity_requests(seed=5)
    params = [dataclasses.replace(p, max_tokens=6, prompt_logprobs=None) for p in params]

    def tokens(**options):
        outputs = LLM(model_dirs["llama"], **SMALL, **options).generate(prompts, params,
                                                                       use_tqdm=False)
        return [output.outputs[0].token_ids for output in outputs]

    expected = tokens()
    assert tokens(tensor_parallel_size=4, backend="gpu", interpret=True) == expected
    assert tokens(tensor_parallel_size=2, backend="tpu", interpret=True) == expected


def per_device_bytes(model) -> dict:
    totals = {}
    for leaf in jax.tree.leaves(nnx.state(model)):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


@pytest.mark.parametrize("scan_layers", [True, False])
def test_each_device_holds_a_quarter_of_the_weights(model_dirs, tmp_path, scan_layers):
    model_dir = model_dirs["mistral"]   # 4 kv heads: nothing repeated at N = 4
    plan = ShardingPlan.create(load_config(model_dir, scan_layers=scan_layers), 4)
    weights = dict(nnx.to_flat_state(nnx.state(load_model(model_dir, scan_layers=scan_layers),
                                               nnx.Param)))
    total = sum(v[...].nbytes for v in weights.values())
    norms = sum(v[...].nbytes for k, v in weights.items() if "norm" in str(k[-2]))
    # Orbax checkpoints of either structure (unrolled: the layout before scanning).
    converted = [convert_to_orbax(model_dir, tmp_path / str(scanned), scan_layers=scanned)
                 for scanned in (True, False)]
    for source in (model_dir, *converted):
        model = load_model(source, plan=plan, scan_layers=scan_layers)
        held = per_device_bytes(model)
        assert len(held) == 4
        # A quarter of what splits, with the vocabulary padded from 333 to 336 rows.
        assert max(held.values()) <= (total - norms) / 4 * 336 / 333 + norms, (held, total)
        sharded = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        assert sorted(sharded) == sorted(weights)
        for key, variable in sharded.items():
            array = np.asarray(variable[...])
            if key[-2] in ("embed_tokens", "lm_head"):   # vocabulary rows / columns
                vocab_axis = 0 if key[-2] == "embed_tokens" else 1
                assert not np.take(array, range(VOCAB, 336), vocab_axis).any()   # zero padding
                array = np.take(array, range(VOCAB), vocab_axis)
            np.testing.assert_array_equal(array, np.asarray(weights[key][...]),
                                          err_msg=str(key))


def test_scanned_layers_on_a_mesh_equal_unrolled_on_one_device(model_dirs):
    prompts, params = parity_requests(seed=6)
    params = [dataclasses.replace(p, prompt_logprobs=None) for p in params]

    def samples(**options):
        outputs = LLM(model_dirs["llama"], **SMALL, **options).generate(prompts, params,
                                                                       use_tqdm=False)
        return [output.outputs[0] for output in outputs]

    expected = samples(scan_layers=False)
    for want, got in zip(expected, samples(scan_layers=True, tensor_parallel_size=4)):
        assert got.token_ids == want.token_ids
        for want_top, got_top in zip(want.logprobs, got.logprobs, strict=True):
            for token, logprob in want_top.items():
                assert abs(got_top[token].logprob - logprob.logprob) < 1e-4


def mixed_requests():
    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(3, 259, size=int(n)).tolist()}
               for n in rng.integers(2, 40, size=12)]
    choices = [
        SamplingParams(max_tokens=6, temperature=0),
        SamplingParams(max_tokens=8, temperature=1.0, seed=3, n=2),
        SamplingParams(max_tokens=8, temperature=0.7, top_k=20, stop=["a", "e"]),
        SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.5),
        SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2, logprobs=2),
        SamplingParams(max_tokens=10, temperature=0.8, min_p=0.1, seed=9, logprobs=1),
    ]
    return prompts, [choices[i % len(choices)] for i in range(len(prompts))]


def test_zero_compilations_after_warmup_with_four_devices(model_dirs):
    llm = LLM(model_dirs["llama"], tensor_parallel_size=4, max_num_seqs=2,
              max_num_batched_tokens=16, page_size=4, num_pages=128, max_model_len=64,
              warmup=True, compilation_cache_dir="", scan_layers=True)
    prompts, params = mixed_requests()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(output.finished for output in outputs)
    assert llm.engine.compilations_after_warmup == 0
    assert_no_weight_gathered(llm)


def assert_no_weight_gathered(llm):
    """The plan XLA compiled: partial sums added up (all-reduce), no weight gathered."""
    runner = llm.engine.runner
    batch, indices = runner._empty_batch(16)
    hlo = runner._forward.lower(runner.params, runner.kv_cache, batch, indices,
                                np.full(batch.input_ids.shape[0], -1, np.int32),
                                runner._no_draws, runner.rotary_table).compile()
    collectives = re.findall(r"\b(all-reduce|all-gather|all-to-all)(?:-start)?\(",
                             hlo.as_text())
    assert "all-reduce" in collectives and "all-gather" not in collectives, collectives


# Quantized weights on the mesh: GGUF blocks of every kept type, both row-parallel kinds.
GGUF_BLOCKS = {"q_proj": Q.Q8_0, "k_proj": Q.Q4_1, "v_proj": Q.Q4_0, "o_proj": Q.Q4_1,
               "gate_proj": Q.Q4_1, "up_proj": Q.Q4_0, "down_proj": Q.Q8_0}


@pytest.fixture(scope="module")
def quantized_sources(model_dirs, tmp_path_factory):
    """(model, quantization) per case: the float llama quantized at load, or its GGUF file
    whose blocks are kept (quantization=None)."""
    gguf_file = write_model_gguf(model_dirs["llama"], tmp_path_factory.mktemp("q") / "q.gguf",
                                 GGUF_BLOCKS)
    return {"int8": (model_dirs["llama"], "int8"), "int4": (model_dirs["llama"], "int4"),
            "gguf": (gguf_file, None)}


def greedy_tokens(model, size, **options):
    rng = np.random.default_rng(8)
    prompts = [{"prompt_token_ids": rng.integers(3, 259, size=n).tolist()} for n in (3, 5, 8)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    llm = LLM(model, tensor_parallel_size=size, **SMALL, **options)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [output.outputs[0].token_ids for output in outputs], llm


# int8 per channel at 4 devices repeats llama's 2 kv heads (k/v arrays read twice); int4 and
# the GGUF blocks (groups of 32 over o_proj's 64 inputs) split at most 2 ways. Scanned layers
# fill stacked arrays row by row on the mesh; unrolled ones are placed whole.
@pytest.mark.parametrize("case, size, scan_layers", [("int8", 4, False), ("int4", 2, True),
                                                     ("gguf", 2, True)])
def test_quantized_weights_split_over_devices_give_one_devices_tokens(quantized_sources,
                                                                      case, size, scan_layers):
    model, quantization = quantized_sources[case]
    options = dict(quantization=quantization, scan_layers=scan_layers)
    expected, _ = greedy_tokens(model, 1, **options)
    assert len({tuple(tokens) for tokens in expected}) == 3   # text that varies
    tokens, llm = greedy_tokens(model, size, **options)
    assert tokens == expected
    arrays = {path: variable.get_value() for path, variable
              in nnx.to_flat_state(llm.engine.runner.params) if path[-2] in PROJECTIONS}
    assert not any(path[-1] == "weight" for path in arrays)   # no float projection
    for path, array in arrays.items():
        shards = array.addressable_shards
        assert len(shards) == size and {s.data.dtype for s in shards} == {array.dtype}
        if path[-1] in ("q", "packed"):   # each device its block of the integers
            assert array.dtype in (np.int8, np.uint8), path
            assert all(s.data.size * size == array.size for s in shards), path
    assert_no_weight_gathered(llm)


def test_int4_groups_that_would_straddle_devices_are_refused(model_dirs):
    """o_proj's 64 inputs over 4 devices: 16 rows each, half an int4 group."""
    plan = ShardingPlan.create(load_config(model_dirs["llama"]), 4)
    with pytest.raises(ValueError, match=r"o_proj: int4 weights in groups of 32 input rows "
                                         r"with in_features=64 over tensor_parallel_size=4 "
                                         r"leave 16 rows per device.*quantization='int8'"):
        load_model(model_dirs["llama"], plan=plan, quantization="int4")
