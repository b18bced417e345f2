"""A CPU model's weights in transparent huge pages (models/huge_pages.py)."""

import gc
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import load_model
from models.huge_pages import collapse_into_huge_pages, huge_page_buffer, huge_pages_available
from tests.hf_models import build_hf_model

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or jax.default_backend() != "cpu" or not huge_pages_available(),
    reason="reads /proc/self/smaps; needs a CPU backend and transparent huge pages")

IDS = np.random.default_rng(5).integers(3, 300, size=(2, 17))


def mapping_of(address: int) -> dict | None:
    """The /proc/self/smaps entry holding `address`: its name, VmFlags and AnonHugePages."""
    entry = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            entry = dict(name=fields[5] if len(fields) > 5 else "", flags=[], huge_kb=0,
                         hit=start <= address < end)
        elif entry and entry["hit"] and fields[0] == "VmFlags:":
            entry["flags"] = fields[1:]
            return entry
        elif entry and entry["hit"] and fields[0] == "AnonHugePages:":
            entry["huge_kb"] = int(fields[1])
    return None


def weights(model) -> dict:
    return {path: variable.get_value() for path, variable in nnx.iter_graph(model)
            if isinstance(variable, nnx.Variable)}


@pytest.mark.parametrize("scan_layers, quantization", [(True, None), (False, "int8")])
def test_loaded_weights_lie_in_huge_page_memory_and_compute_the_same(hf_model_dirs, scan_layers,
                                                                     quantization):
    moved = load_model(hf_model_dirs["llama"], scan_layers=scan_layers,
                       quantization=quantization)
    kept = load_model(hf_model_dirs["llama"], scan_layers=scan_layers,
                      quantization=quantization, huge_pages=False)
    for path, array in weights(moved).items():
        mapping = mapping_of(array.unsafe_buffer_pointer())
        assert mapping is not None and mapping["name"] == "", path   # anonymous memory
        assert "hg" in mapping["flags"], (path, mapping)             # advised MADV_HUGEPAGE
        np.testing.assert_array_equal(np.asarray(array), np.asarray(weights(kept)[path]))
    assert any(array.dtype == jnp.int8 for array in weights(moved).values()) == bool(quantization)
    ids = jnp.asarray(IDS)
    np.testing.assert_array_equal(np.asarray(moved.forward_dense(ids)),
                                  np.asarray(kept.forward_dense(ids)))


def test_huge_page_buffer_is_filled_with_huge_pages():
    buffer = huge_page_buffer(8 << 20)
    buffer[:] = 1
    mapping = mapping_of(buffer.ctypes.data)
    assert buffer.ctypes.data % (2 << 20) == 0
    assert mapping["huge_kb"] >= 2048, mapping   # at least one of its four 2 MiB pages


def first_huge_page(address: int) -> int:
    """The first 2 MiB boundary at or after `address`: the advised part of a buffer is a
    mapping of its own from there."""
    return -(-address // (2 << 20)) * (2 << 20)


def test_collapsing_an_xla_buffer_gives_it_huge_pages_and_keeps_its_contents():
    values = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)   # 16 MiB
    array = jnp.asarray(values) + 0   # XLA's own buffer, not numpy's
    address = array.unsafe_buffer_pointer()
    assert collapse_into_huge_pages({"a": array, "small": jnp.zeros(1024)}) >= 12 << 20
    mapping = mapping_of(first_huge_page(address))
    assert "hg" in mapping["flags"] and mapping["huge_kb"] >= 2048, mapping
    assert array.unsafe_buffer_pointer() == address
    np.testing.assert_array_equal(np.asarray(array), values)
    assert collapse_into_huge_pages(jnp.zeros(256 << 10)) == 0   # 1 MiB: no whole huge page


def test_the_kv_cache_lies_in_huge_pages_and_the_steps_keep_its_buffer(hf_model_dirs):
    from engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(hf_model_dirs["llama"], EngineConfig(num_pages=2048, max_model_len=64,
                                                            warmup=False))
    address = engine.runner.kv_cache.unsafe_buffer_pointer()
    assert engine.runner.kv_cache.nbytes >= 8 << 20
    mapping = mapping_of(first_huge_page(address))
    assert "hg" in mapping["flags"] and mapping["huge_kb"] >= 2048, mapping
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7, 8]},
                       SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.runner.kv_cache.unsafe_buffer_pointer() == address   # donated in place
    assert "hg" in mapping_of(first_huge_page(address))["flags"]


def test_the_mapping_goes_with_the_model(hf_model_dirs):
    model = load_model(hf_model_dirs["llama"])
    address = model.model.embed_tokens.weight[...].unsafe_buffer_pointer()
    assert mapping_of(address)["name"] == ""
    del model
    gc.collect()
    assert mapping_of(address) is None


def test_moving_the_weights_leaves_no_second_copy_behind(tmp_path):
    # The weights' old XLA buffers (a few MB each) come from the heap, which kept them for
    # reuse after the move: 90 MB of this 110 MB model until the heap was trimmed.
    model_dir = build_hf_model("llama", tmp_path / "llama", hidden_size=512,
                               intermediate_size=1376, num_hidden_layers=6,
                               num_attention_heads=8, num_key_value_heads=8, vocab_size=8192)
    script = ("import sys\n"
              "from models import load_model\n"
              "model = load_model(sys.argv[1], scan_layers=False, huge_pages=sys.argv[2] == '1')\n"
              "print(next(int(line.split()[1]) for line in open('/proc/self/status')\n"
              "           if line.startswith('VmRSS:')))\n")
    rss_kb = {moved: int(subprocess.run([sys.executable, "-c", script, str(model_dir), moved],
                                         check=True, capture_output=True, text=True,
                                         timeout=300).stdout.split()[-1])
              for moved in ("0", "1")}
    weights_kb = (model_dir / "model.safetensors").stat().st_size // 1024
    assert weights_kb > 100_000
    assert rss_kb["1"] - rss_kb["0"] < weights_kb // 4, (rss_kb, weights_kb)
