"""GET /tokenizer_info as lm-evaluation-harness reads it, GET /openapi.json, and the Python
example `ember serve` prints, run as printed."""

import os
import subprocess

import requests

from engine.cli import _print_examples
from engine.tokenizer import Tokenizer
from tests.server.conftest import MAX_MODEL_LEN, ROOT, VOCAB_SIZE, auth


def test_tokenizer_info_is_what_a_remote_tokenizer_needs(server, api_key, server_model_dir):
    assert requests.get(server.base_url + "/tokenizer_info", timeout=30).status_code == 401
    info = requests.get(server.base_url + "/tokenizer_info", headers=auth(api_key),
                        timeout=30).json()
    local = Tokenizer.from_pretrained(server_model_dir)
    assert info["eos_token"] == local.decode([local.eos_token_id], skip_special_tokens=False)
    assert info["bos_token"] == local.decode([local.bos_token_id], skip_special_tokens=False)
    assert "pad_token" in info and info["tokenizer_class"]
    assert (info["model_max_length"], info["vocab_size"]) == (MAX_MODEL_LEN, VOCAB_SIZE)
    assert info["chat_template"] == (server_model_dir / "chat_template.jinja").read_text()
    # lm-evaluation-harness encodes the EOS text through /tokenize to find its id.
    eos = requests.post(server.base_url + "/tokenize", headers=auth(api_key), timeout=30,
                        json={"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == [local.eos_token_id]


def test_openapi_document_names_every_route_and_body(server):
    document = requests.get(server.base_url + "/openapi.json", timeout=30).json()
    assert document["openapi"] == "3.1.0"
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
            "/v1/usage", "/health", "/tokenizer_info"} <= set(document["paths"])
    completion = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert completion["required"] == ["prompt"]
    assert completion["properties"]["top_k"]["maximum"] == 2 ** 31 - 1
    assert completion["properties"]["model"]["enum"] == ["tiny-llama"]


def test_printed_python_example_runs_as_printed(server, api_key, capsys):
    _print_examples("127.0.0.1", server.port, "tiny-llama", no_auth=False)
    printed = capsys.readouterr().err.splitlines()
    (python_line,) = [line for line in printed if " -c " in line]
    result = subprocess.run(python_line, shell=True, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "EMBER_API_KEY": api_key}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.endswith("\n")   # the completion's text, printed
