"""A GGUF file Ember cannot load fails with one GGUFError that names the file and what is wrong."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from models.gguf import GGUFError, read_gguf, write_hf_directory
from tests.gguf_files import MIXED, write_gguf, write_model_gguf


@pytest.fixture(scope="module")
def llama_file(hf_model_dirs, tmp_path_factory):
    return write_model_gguf(hf_model_dirs["llama"], tmp_path_factory.mktemp("ok") / "ok.gguf")


def _cut(source, target, size: int):
    target.write_bytes(source.read_bytes()[:size])
    return target


def _raises(path, message: str):
    with pytest.raises(GGUFError) as caught:
        read_gguf(path)
    assert str(caught.value).startswith(f"{path}: "), str(caught.value)
    assert re.search(message, str(caught.value)), str(caught.value)
    return str(caught.value)


def test_truncated_tensor_data_names_the_tensor(llama_file, tmp_path):
    reader = gguf.GGUFReader(llama_file)
    last = max(reader.tensors, key=lambda tensor: tensor.data_offset)
    cut = _cut(llama_file, tmp_path / "cut.gguf", last.data_offset + last.n_bytes // 2)
    _raises(cut, rf"tensor {re.escape(last.name)} ends at byte \d+, past the end of the file "
                 rf"\({last.data_offset + last.n_bytes // 2} bytes\): the file is truncated")
    with pytest.raises(GGUFError, match="truncated"):
        write_hf_directory(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written from a file that fails to read"


@pytest.mark.parametrize("size", [40, 2000])
def test_truncated_header_names_the_file(llama_file, tmp_path, size):
    _raises(_cut(llama_file, tmp_path / "cut.gguf", size),
            rf"the GGUF header is truncated or corrupt \(the file has {size} bytes")


@pytest.mark.parametrize("size", [0, 3, 4096])
def test_not_a_gguf_file(tmp_path, size):
    path = tmp_path / "model.safetensors"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    _raises(path, r"not a GGUF file \(it starts with b.*, expected b'GGUF'\)")


def test_missing_file(tmp_path):
    _raises(tmp_path / "absent.gguf", "file not found")


def test_unsupported_tensor_type_names_tensor_and_type(hf_model_dirs, tmp_path):
    path = write_model_gguf(hf_model_dirs["qwen2"], tmp_path / "q5.gguf",
                            plan={**MIXED, "k_proj": Q.Q5_0})
    _raises(path, r"tensor blk\.0\.attn_k\.weight has type Q5_0: expected one of \['F32', "
                  r"'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1', 'Q4_K', 'Q5_K', 'Q6_K'\]")


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", lambda writer: None, arch="phi3")
    _raises(path, r"general\.architecture='phi3' is not supported: expected one of "
                  r"\('llama', 'qwen2', 'qwen3', 'gemma'\)")


def _bare_llama(tmp_path, tensor_name: str = "token_embd.weight"):
    def add(writer: gguf.GGUFWriter):
        writer.add_embedding_length(64)
        writer.add_head_count(4)
        writer.add_tensor(tensor_name, np.zeros((32, 64), dtype=np.float32))

    return write_gguf(tmp_path / "bare.gguf", add)


def test_missing_metadata_key_is_named(tmp_path):
    _raises(_bare_llama(tmp_path), r"metadata key 'llama\.feed_forward_length' is missing: "
                                   r"it is required")


def test_tensor_without_hf_counterpart_is_named(tmp_path):
    _raises(_bare_llama(tmp_path, "blk.0.attn_qkv.weight"),
            r"tensor blk\.0\.attn_qkv\.weight has no Hugging Face counterpart")


def test_rope_scaling_ember_does_not_run_is_named(hf_model_dirs, tmp_path):
    def add_yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)

    path = write_model_gguf(hf_model_dirs["qwen2"], tmp_path / "yarn.gguf", extra=add_yarn)
    _raises(path, "the metadata describes a model Ember cannot run: rope_type='yarn' is not "
                  "supported")
