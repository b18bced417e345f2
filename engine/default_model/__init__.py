"""The embedded default model, built locally on first use (build.py) by training a small Llama
and its SentencePiece tokenizer on the Python standard library's sources (training.py)."""
