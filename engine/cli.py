"""The `ember` command: generate, serve, batch, keys, usage, convert, fetch-default-model.

    generate              stream one completion to the terminal
    serve                 the OpenAI-compatible HTTP server (engine/serving/gunicorn_app.py)
    batch                 an OpenAI Batch API file, resumable and billed (engine/batch)
    keys, usage           API keys and usage in the metering ledger (engine/metering)
    convert               a Hugging Face directory or a GGUF file -> an orbax checkpoint
    fetch-default-model   fetch the default model (SmolLM2-135M-Instruct) into the cache
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

# EngineConfig fields `serve` and `batch` take as flags (--max-model-len ...); `generate` takes
# the model-shaping ones (_MODEL_FIELDS).
_MODEL_FIELDS = (("dtype", str), ("tensor-parallel-size", int), ("quantization", str),
                 ("kv-cache-dtype", str), ("load-format", str))
_ENGINE_FIELDS = (("max-model-len", int), ("max-num-seqs", int),
                  ("max-num-batched-tokens", int), ("page-size", int), ("num-pages", int),
                  ("memory-fraction", float), ("backend", str), ("seed", int),
                  *_MODEL_FIELDS)
_FIELD_HELP = {
    "quantization": "weights: none (float), int8 (per channel), int4 (groups of 32); default: "
                    "the checkpoint's own (a GGUF's Q8_0/Q4_0/Q4_1 blocks stay quantized)",
    "kv-cache-dtype": "auto (the model dtype), bfloat16, float8_e4m3fn or int8",
    "tensor-parallel-size": "devices the model is split over (default 1)",
    "backend": "kernels: auto (default: by the device; on a CPU the C++ attention where a "
               "C++ compiler builds it), reference (plain jnp), cpu, gpu or tpu",
    "load-format": "auto (read the weights) or dummy (random weights from config.json alone, "
                   "for benchmarks)",
}


def _add_engine_fields(parser: argparse.ArgumentParser, fields=_ENGINE_FIELDS) -> None:
    for name, kind in fields:
        parser.add_argument(f"--{name}", type=kind, default=None,
                            help=_FIELD_HELP.get(name, "EngineConfig field"))
    parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                        help="run the layers under jax.lax.scan (compile time flat in depth) "
                             "or unrolled; default: scan models of more than 8 layers")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=None, help="plan step N+1 while step N runs (default: on; "
                                           "off on several hosts)")


def _engine_fields(args, fields=_ENGINE_FIELDS) -> dict:
    """The EngineConfig fields given as flags (those left out keep their defaults)."""
    names = [name.replace("-", "_") for name, _ in fields] + ["scan_layers", "async_scheduling"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}

# With several hosts a follower that hangs would hold every request: steps longer than this
# fail their requests (a step of a warmed engine takes milliseconds to seconds).
MULTIHOST_STEP_TIMEOUT_S = 300.0


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model directory (Hugging Face or converted) or GGUF file; "
                             "default: the "
                             "default model, SmolLM2-135M-Instruct, fetched on first use")


def _check_model(model: str | None) -> None:
    """One line, before anything loads, when --model names no model directory."""
    from pathlib import Path

    if model is None:
        return
    if not Path(model).exists():
        raise ValueError(f"--model={model!r}: no such file or directory")
    if Path(model).is_file() and Path(model).suffix == ".gguf":
        return
    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"--model={model!r}: expected a model directory with a config.json, "
                         "or a .gguf file")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 is greedy (the default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Ember: JAX/XLA LLM inference")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="stream a completion to the terminal")
    _add_model(generate)
    _add_sampling(generate)
    generate.add_argument("--chat", action="store_true",
                          help="treat the prompt as a user message and apply the chat template")
    _add_engine_fields(generate, _MODEL_FIELDS)
    generate.add_argument("prompt")

    convert = commands.add_parser(
        "convert", help="write an orbax checkpoint of a HF directory or of a GGUF file")
    convert.add_argument("hf_dir", metavar="HF_DIR_OR_GGUF")
    convert.add_argument("out_dir")

    commands.add_parser("fetch-default-model",
                        help="fetch the default model (SmolLM2-135M-Instruct) into the cache")
    _add_metering_commands(commands)
    _add_serve_command(commands)
    _add_batch_command(commands)
    return parser


def _generate(args) -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            seed=args.seed, stop=args.stop)
    _check_model(args.model)
    # A one-off command compiles only what it uses; the server warms every rung.
    engine = LLMEngine(args.model, EngineConfig(
        max_num_seqs=1, max_num_batched_tokens=256, warmup=False,
        **_engine_fields(args, _MODEL_FIELDS)))
    prompt = args.prompt
    if args.chat:
        prompt = {"prompt_token_ids": engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=True)}
    else:
        sys.stdout.write(prompt)
    engine.add_request("cli", prompt, params)
    printed, start, output = 0, time.perf_counter(), None
    while engine.has_unfinished_requests():
        for output in engine.step():
            text = output.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    if output is not None:
        seconds = time.perf_counter() - start
        tokens = output.usage.completion_tokens
        finish_reason = output.outputs[0].finish_reason
        print(f"[{tokens} tokens in {seconds:.2f} s, finish_reason={finish_reason}]",
              file=sys.stderr)


def _convert(args) -> None:
    """A Hugging Face directory, or a GGUF file, to a directory with orbax weights (the GGUF
    file's Hugging Face directory, float32 safetensors, is written beside it as OUT/hf)."""
    from pathlib import Path

    from models.checkpoint import convert_to_orbax

    start = time.perf_counter()
    source = Path(args.hf_dir)
    if source.suffix == ".gguf":
        from engine.tokenizer.gguf_tokenizer import write_tokenizer_files
        from models.gguf import write_hf_directory

        if not source.is_file():
            raise ValueError(f"{source}: no such GGUF file")
        source = write_hf_directory(source, Path(args.out_dir) / "hf", write_tokenizer_files)
    out_dir = convert_to_orbax(source, args.out_dir)
    print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s")


def _fetch_default_model(args) -> None:
    from engine.default_model.fetch import ensure_default_model
    print(ensure_default_model())


def _add_metering_commands(commands) -> None:
    db_help = "ledger SQLAlchemy URL (default: sqlite:///$EMBER_HOME/ledger.db)"
    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="create a key (printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--tokens-per-day", type=int, default=None)
    create.add_argument("--rpm", type=int, default=None, help="requests per minute")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    create.add_argument("--admin", action="store_true", help="may read every key's usage")
    listing = actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="revoke a key; its usage stays")
    revoke.add_argument("name")
    usage = commands.add_parser("usage", help="usage and cost per key, model or day")
    usage.add_argument("--key", default=None, help="one key's usage (default: all keys)")
    usage.add_argument("--start", default=None, help="ISO date/time, inclusive (naive is UTC)")
    usage.add_argument("--end", default=None, help="ISO date/time, exclusive (naive is UTC)")
    usage.add_argument("--group-by", choices=["model", "day", "key"], default=None)
    usage.add_argument("--csv", action="store_true", help="CSV instead of a table")
    for parser in (create, listing, revoke, usage, *_add_prices_command(commands)):
        parser.add_argument("--db", default=None, help=db_help)


def _add_prices_command(commands) -> tuple:
    prices = commands.add_parser("prices", help="set and list prices per model (USD per 1M "
                                                "tokens), which `ember usage` costs are from")
    actions = prices.add_subparsers(dest="prices_command", required=True)
    set_price = actions.add_parser(
        "set", help="set a model's price; applies to requests finalised from now on",
        description="Prices are USD per million tokens. MODEL is the served model name "
                    "(--served-model-name); '*' prices every model without its own row.")
    set_price.add_argument("model")
    set_price.add_argument("--input", type=float, required=True, help="prompt tokens")
    set_price.add_argument("--cached-input", type=float, default=None,
                           help="prompt tokens read from the prefix cache (default: --input)")
    set_price.add_argument("--output", type=float, required=True, help="completion tokens")
    listing = actions.add_parser("list", help="list the prices")
    return set_price, listing


def _keys(args) -> None:
    from engine.metering import Ledger

    with Ledger(args.db) as ledger:
        if args.keys_command == "create":
            info, plaintext = ledger.create_key(args.name, tokens_per_day=args.tokens_per_day,
                                                rpm=args.rpm, tpm=args.tpm, admin=args.admin)
            print(plaintext)
            print(f"created key {info.name!r} ({info.prefix}...): it is shown only this once; "
                  "store it now", file=sys.stderr)
        elif args.keys_command == "revoke":
            print(f"revoked key {ledger.revoke_key(args.name).name!r}")
        else:
            def limit(value):
                return "-" if value is None else str(value)
            _print_table(["name", "prefix", "admin", "revoked", "rpm", "tpm", "tokens/day",
                          "created (UTC)"],
                         [[k.name, k.prefix, "yes" if k.admin else "no",
                           "yes" if k.revoked else "no", limit(k.rpm), limit(k.tpm),
                           limit(k.tokens_per_day), k.created_at.isoformat(" ", "seconds")]
                          for k in ledger.list_keys()])


def _prices(args) -> None:
    from engine.metering import Ledger

    with Ledger(args.db) as ledger:
        if args.prices_command == "set":
            cached = args.input if args.cached_input is None else args.cached_input
            for flag, value in (("--input", args.input), ("--cached-input", cached),
                                ("--output", args.output)):
                if not 0.0 <= value < float("inf"):
                    raise ValueError(f"{flag}={value}: expected a price >= 0 (USD per million "
                                     "tokens)")
            ledger.set_price(args.model, args.input, cached, args.output)
            print(f"price of {args.model!r} set (USD per 1M tokens): input {args.input:g}, "
                  f"cached input {cached:g}, output {args.output:g}")
            return
        prices = ledger.list_prices()
    _print_table(["model", "input", "cached_input", "output"],
                 [[model, f"{price.input:g}", f"{price.cached_input:g}", f"{price.output:g}"]
                  for model, price in prices.items()])
    print("USD per million tokens; '*' prices models without their own row", file=sys.stderr)


def _parse_time(flag: str, value: str | None):
    from datetime import datetime

    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{flag}={value!r}: expected an ISO date or time such as 2025-01-31 "
                         "or 2025-01-31T12:00:00") from None


def _usage(args) -> None:
    import csv

    from engine.metering import Ledger

    start, end = _parse_time("--start", args.start), _parse_time("--end", args.end)
    with Ledger(args.db) as ledger:
        key_id = None
        if args.key is not None:
            key = ledger.get_key(args.key)
            if key is None:
                raise ValueError(f"--key={args.key!r}: no such key")
            key_id = key.id
        rows = ledger.usage(key_id, start, end, args.group_by)
    header = [args.group_by or "group", "requests", "prompt_tokens", "cached_tokens",
              "completion_tokens", "total_tokens", "cost_usd"]
    table = [[row.group or "all", row.requests, row.prompt_tokens, row.cached_tokens,
              row.completion_tokens, row.total_tokens, f"{row.cost:.6f}"] for row in rows]
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(table)
    else:
        _print_table(header, table)


def _add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (gunicorn)")
    _add_model(serve)
    serve.add_argument("--served-model-name", default=None,
                       help="the model id clients send (default: the model directory's name)")
    serve.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--db", default=None,
                       help="ledger SQLAlchemy URL (default: sqlite:///$EMBER_HOME/ledger.db)")
    serve.add_argument("--instance", default=None,
                       help="this replica's name in a shared ledger (default: an id unique to "
                            "this process; after a crash only a gone instance's open rows are "
                            "marked interrupted)")
    serve.add_argument("--no-auth", action="store_true",
                       help="no API keys: all usage goes to the anonymous key, and only "
                            "requests addressed to a loopback Host (or to --host) are answered")
    serve.add_argument("--threads", type=int, default=128,
                       help="HTTP threads, started as requests need them")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="most engine requests in flight; more get 503")
    serve.add_argument("--max-n", type=int, default=16, help="most samples per prompt")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    serve.add_argument("--max-sequences-per-key", type=int, default=256,
                       help="most sequences (prompts x n) one key may have queued or running; "
                            "more get 429")
    serve.add_argument("--max-requests-per-key", type=int, default=None,
                       help="most requests one key may have in flight, each holding an HTTP "
                            "thread; more get 429 (default: half of --threads; no limit with "
                            "--no-auth)")
    serve.add_argument("--default-max-tokens", type=int, default=None,
                       help="max_tokens of a request that sets none, cut to the context left "
                            "(default: 16 for completions, the whole context for chat)")
    serve.add_argument("--shared-prefix-cache", action="store_true",
                       help="share the prefix cache between keys (default: each key's own, "
                            "so cached tokens never tell one key what another sent)")
    serve.add_argument("--read-timeout", type=float, default=30.0,
                       help="seconds a client has to send a whole request (then 408)")
    serve.add_argument("--write-timeout", type=float, default=30.0,
                       help="seconds each write of a response may wait for the client to read "
                            "(then the connection is closed and the request aborted)")
    serve.add_argument("--send-buffer-bytes", type=int, default=None,
                       help="each connection's kernel send buffer (SO_SNDBUF): the unread "
                            "output a client can pin before a write waits (default: the "
                            "kernel's, which grows to megabytes)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds SIGTERM waits for running requests (then aborts them)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    _add_engine_fields(serve)
    serve.add_argument("--no-prefix-caching", action="store_true")
    serve.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help="multi-host: jax.distributed's coordinator (process 0's address); "
                            "process 0 serves HTTP, the others run the model's steps with it")
    serve.add_argument("--num-processes", type=int, default=None,
                       help="multi-host: how many processes (hosts) the model spans")
    serve.add_argument("--process-id", type=int, default=None,
                       help="multi-host: this process's rank, 0 (the server) to P - 1")
    serve.add_argument("--tool-call-parser", default=None, choices=_tool_call_parsers(),
                       help="how the model writes tool calls (tool_choice auto); default: "
                            "detected from the chat template")
    serve.add_argument("--step-timeout", type=float, default=None, metavar="SECONDS",
                       help="fail the requests of an engine step running longer, and answer "
                            "/health with 503 until it ends (default: none on one host, "
                            f"{MULTIHOST_STEP_TIMEOUT_S:g} s with several)")
    serve.add_argument("--distributed", action="store_true",
                       help="multi-host: take the three flags above from the cluster "
                            "(SLURM, Open MPI, a TPU pod slice, Kubernetes) as "
                            "jax.distributed.initialize() does; flags given still win")
    serve.add_argument("--no-warmup", action="store_true",
                       help="compile shapes on first use (development only)")


def _serve(args) -> None:
    from engine.config import EngineConfig

    config = EngineConfig(**_engine_fields(args),
                          enable_prefix_caching=not args.no_prefix_caching,
                          warmup=not args.no_warmup)
    _check_model(args.model)
    if args.distributed:
        _detect_cluster(args)
    if (args.coordinator_address, args.num_processes, args.process_id) != (None, None, None):
        _multihost_flags(args)
    for flag in ("port", "threads", "max_queue", "max_n", "max_body_bytes",
                 "max_sequences_per_key", "max_requests_per_key", "default_max_tokens",
                 "read_timeout", "write_timeout", "send_buffer_bytes"):
        value = getattr(args, flag)
        if value is not None and not value >= (0 if flag == "port" else 1):
            raise ValueError(f"--{flag.replace('_', '-')}={value}: expected a positive number")
    if args.no_auth and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("ember.server").warning(
            "serving without API keys on %s: anyone who can reach it and names it as the "
            "Host can use it", args.host)
    for logger_name in ("ember", "engine"):
        logging.getLogger(logger_name).setLevel(args.log_level.upper())
    if args.coordinator_address is not None and args.process_id != 0:
        return _serve_follower(args, config)   # the ledger is process 0's alone
    from engine.metering import Ledger
    Ledger(args.db).close()   # a bad URL fails here, in one line, before the server starts
    from engine.serving import gunicorn_app
    name = _served_model_name(args)
    if args.model is None:
        args.model = str(_default_model())
    _print_examples(args.host, args.port, name, args.no_auth)
    gunicorn_app.serve(model=args.model, engine_config=config, db_url=args.db,
                       instance=args.instance, host=args.host, port=args.port, model_name=name,
                       no_auth=args.no_auth, threads=args.threads, max_queue=args.max_queue,
                       max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                       max_sequences_per_key=args.max_sequences_per_key,
                       max_requests_per_key=args.max_requests_per_key,
                       shared_prefix_cache=args.shared_prefix_cache,
                       default_max_tokens=args.default_max_tokens,
                       read_timeout=args.read_timeout, write_timeout=args.write_timeout,
                       send_buffer_bytes=args.send_buffer_bytes,
                       shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
                       engine_factory=_multihost_leader(args, config),
                       step_timeout=_step_timeout(args),
                       tool_call_parser=args.tool_call_parser)


def _tool_call_parsers() -> tuple[str, ...]:
    from engine.openai.tools import PARSERS
    return tuple(PARSERS)


def _step_timeout(args) -> float | None:
    if args.step_timeout is not None:
        if not args.step_timeout > 0:
            raise ValueError(f"--step-timeout={args.step_timeout}: expected seconds > 0")
        return args.step_timeout
    return None if args.coordinator_address is None else MULTIHOST_STEP_TIMEOUT_S


def _detect_cluster(args) -> None:
    """--distributed: fills the multi-host flags not given from jax's cluster detection."""
    from pallas_kernels.compat import detect_cluster

    detected = detect_cluster()
    if detected == (None, None, None):
        raise ValueError("--distributed: no cluster environment found (SLURM, Open MPI, a "
                         "TPU pod slice, Kubernetes): pass --coordinator-address, "
                         "--num-processes and --process-id instead")
    for flag, value in zip(("coordinator_address", "num_processes", "process_id"), detected):
        if getattr(args, flag) is None:
            setattr(args, flag, value)


def _multihost_flags(args) -> None:
    given = (args.coordinator_address, args.num_processes, args.process_id)
    if None in given:
        raise ValueError(f"--coordinator-address={given[0]}, --num-processes={given[1]}, "
                         f"--process-id={given[2]}: multi-host serving needs all three")
    if given[1] < 2 or not 0 <= given[2] < given[1]:
        raise ValueError(f"--process-id={given[2]}, --num-processes={given[1]}: expected "
                         "--num-processes >= 2 and 0 <= --process-id < --num-processes")


def _multihost_config(args, config):
    """jax.distributed.initialize (before anything touches a device), then the config with
    the mesh over every process's devices unless --tensor-parallel-size says otherwise."""
    import dataclasses

    import jax

    from engine.worker import multihost
    multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
    if args.tensor_parallel_size is None:
        config = dataclasses.replace(config, tensor_parallel_size=jax.device_count())
    return config


def _multihost_leader(args, config):
    """None on one host; else the engine factory of process 0, run in the server's worker
    (after gunicorn's fork, so jax starts in the process that owns the devices)."""
    if args.coordinator_address is None:
        return None

    def build_engine():
        from engine.llm_engine import LLMEngine
        return LLMEngine(args.model, _multihost_config(args, config))

    return build_engine


def _serve_follower(args, config) -> None:
    """A process other than 0: runs the model's steps as process 0 sends them; no HTTP."""
    if args.model is None:
        args.model = str(_default_model())
    import dataclasses

    from engine.llm_engine import LLMEngine
    from engine.serving.gunicorn_app import frozen_after
    from engine.worker import multihost
    config = dataclasses.replace(_multihost_config(args, config), warmup=False)
    engine = frozen_after(lambda: LLMEngine(args.model, config))()
    multihost.Follower(engine.runner).run()   # the leader warms up


def _served_model_name(args) -> str:
    """--served-model-name, else the model directory's name or the GGUF file's stem."""
    from pathlib import Path

    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        from engine.default_model.fetch import MODEL_NAME
        return MODEL_NAME
    path = Path(args.model)
    return path.stem if path.suffix == ".gguf" else path.name


def _default_model():
    """The default model's GGUF file, fetched first if missing (no JAX: the server forks)."""
    from engine.default_model.fetch import ensure_default_model
    return ensure_default_model()


def _print_examples(host: str, port: int, model_name: str, no_auth: bool) -> None:
    """Ready-to-paste requests for the server that is starting (printed before warm-up); the
    Python one names this interpreter, which has the openai package (a dependency)."""
    import shlex

    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"   # a wildcard is where it listens, not an address to send to
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    key = "none" if no_auth else "$EMBER_API_KEY"
    auth = "" if no_auth else f' -H "Authorization: Bearer {key}"'
    question = "What is the capital of France?"
    body = json.dumps({"model": model_name, "max_tokens": 48, "temperature": 0,
                       "messages": [{"role": "user", "content": question}]})
    print(f"Ember serves {model_name} at {base} (/health answers 200 once warm-up is done)."
          + ("" if no_auth else " Create a key with: ember keys create --name me"),
          f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{body}'",
          f"  {shlex.quote(sys.executable)} -c \"from openai import OpenAI; "
          f"client = OpenAI(base_url='{base}/v1', api_key='{key}'); "
          f"print(client.chat.completions.create(model='{model_name}', max_tokens=48, "
          f"temperature=0, messages=[{{'role': 'user', 'content': '{question}'}}])"
          f".choices[0].message.content)\"",
          sep="\n", file=sys.stderr, flush=True)


def _add_batch_command(commands) -> None:
    batch = commands.add_parser(
        "batch", help="run an OpenAI Batch API file: resumable, exactly once, billed",
        description="Runs every line of INPUT (OpenAI Batch API JSONL) through one engine and "
                    "appends one output line per request to OUTPUT. Run the same command "
                    "again after an interruption: finished lines are kept and skipped.")
    batch.add_argument("input", help="OpenAI Batch API JSONL: {custom_id, method, url, body}")
    batch.add_argument("output", help="output JSONL (created, or resumed when it exists)")
    _add_model(batch)
    batch.add_argument("--served-model-name", default=None,
                       help="the model name bodies carry (default: the model directory's name)")
    account = batch.add_mutually_exclusive_group()
    account.add_argument("--api-key", default=None,
                         help="bill the key with this secret (default: $EMBER_API_KEY; a key "
                              "on the command line shows in `ps`)")
    account.add_argument("--account", default=None,
                         help="bill the key of this name (default: the key in $EMBER_API_KEY, "
                              "else the anonymous account)")
    batch.add_argument("--db", default=None,
                       help="ledger SQLAlchemy URL (default: sqlite:///$EMBER_HOME/ledger.db)")
    batch.add_argument("--batch-discount", type=float, default=0.5,
                       help="fraction taken off the ledger price (default 0.5: half price)")
    _add_engine_fields(batch)
    batch.add_argument("--no-prefix-caching", action="store_true")
    batch.add_argument("--warmup", action="store_true",
                       help="compile every shape first (default: compile on first use)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")


def _batch(args) -> None:
    from engine.batch.job import open_batch, run_batch
    from engine.config import EngineConfig
    from engine.metering import Ledger

    if not 0.0 <= args.batch_discount <= 1.0:
        raise ValueError(f"--batch-discount={args.batch_discount}: expected a fraction in "
                         "[0, 1]")
    _check_model(args.model)
    config = EngineConfig(**_engine_fields(args),
                          enable_prefix_caching=not args.no_prefix_caching, warmup=args.warmup)
    output_existed = os.path.exists(args.output)
    files = open_batch(args.input, args.output)   # a repeated custom_id fails here, first
    try:
        with Ledger(args.db, instance="batch") as ledger:
            key = _batch_key(ledger, args)
            from engine.llm_engine import LLMEngine
            engine = LLMEngine(args.model, config)
            name = _served_model_name(args)
            summary = run_batch(engine, files, model_name=name, ledger=ledger, key=key,
                                discount=args.batch_discount, progress=not args.no_progress)
    except BaseException:
        files.close()
        # A run that failed before writing a line leaves no empty output behind.
        if not output_existed and os.path.isfile(args.output) \
                and os.path.getsize(args.output) == 0:
            os.unlink(args.output)
        raise
    files.close()
    print(f"{args.output}: {summary.succeeded} succeeded, {summary.failed} failed, "
          f"{summary.skipped} already done; {summary.prompt_tokens} prompt + "
          f"{summary.completion_tokens} completion tokens in {summary.seconds:.1f} s; "
          f"{summary.billed} billed to {key.name!r}", file=sys.stderr)


def _batch_key(ledger, args):
    """The key to bill: --api-key, --account, $EMBER_API_KEY, else the anonymous key."""
    secret = args.api_key
    if secret is None and args.account is None:
        secret = os.environ.get("EMBER_API_KEY") or None
    source = "--api-key" if args.api_key is not None else "EMBER_API_KEY"
    if secret is not None:
        key = ledger.authenticate(secret)
        if key is None:
            raise ValueError(f"{source}: not a key of this ledger")
    elif args.account is not None:
        key = ledger.get_key(args.account)
        if key is None:
            raise ValueError(f"--account={args.account!r}: no such key (see "
                             "`ember keys list`)")
    else:
        key = ledger.anonymous_key()
    if key.revoked:
        raise ValueError(f"key {key.name!r} is revoked")
    return key


def _print_table(header: list[str], rows: list[list]) -> None:
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("EMBER_LOG_LEVEL", "WARNING"))
    handlers = {"generate": _generate, "convert": _convert,
                "fetch-default-model": _fetch_default_model,
                "keys": _keys, "usage": _usage, "prices": _prices, "serve": _serve,
                "batch": _batch}
    try:
        handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as error:
        # User mistakes (bad paths, files, fields) get one line, not a traceback.
        print(f"ember {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
