"""`ember batch`: OpenAI Batch API files through one engine, resumable and billed exactly once.

    job.py     open_batch / run_batch / reconcile: the run and its billing
    jsonl.py   the input reader and the append-only, recoverable output file
    lines.py   one input line -> the server's request and response body (deterministic ids)
"""
