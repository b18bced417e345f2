"""The `ember` command: generate, convert (and the server/batch commands as they land)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model directory (Hugging Face or converted); default: the "
                             "embedded default model, built on first use")


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
    generate.add_argument("prompt")

    convert = commands.add_parser("convert", help="write an orbax checkpoint of a HF directory")
    convert.add_argument("hf_dir")
    convert.add_argument("out_dir")

    build = commands.add_parser("build-default-model", help="(re)build the embedded model")
    build.add_argument("--force", action="store_true")
    return parser


def _generate(args) -> None:
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            seed=args.seed, stop=args.stop)
    # A one-off command compiles only what it uses; the server warms every rung.
    engine = LLMEngine(args.model, EngineConfig(max_num_seqs=1, max_num_batched_tokens=256,
                                                warmup=False))
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
        print(f"[{tokens} tokens in {seconds:.2f} s, finish_reason={output.outputs[0].finish_reason}]",
              file=sys.stderr)


def _convert(args) -> None:
    from models.checkpoint import convert_to_orbax

    start = time.perf_counter()
    out_dir = convert_to_orbax(args.hf_dir, args.out_dir)
    print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s")


def _build_default_model(args) -> None:
    from engine.default_model import ensure_default_model
    print(ensure_default_model(force=args.force))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("EMBER_LOG_LEVEL", "WARNING"))
    handlers = {"generate": _generate, "convert": _convert,
                "build-default-model": _build_default_model}
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
