"""The `bitserve` command line (DESIGN §9): pull, serve, generate, info, admin. Parses flags, then hands off."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.default_model import PullError, pull_default_model, resolve_model_path
from engine.formats.errors import ModelFormatError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (PullError, ModelFormatError, FileNotFoundError, ValueError) as exc:
        print(f"bitserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitserve", description="Serve low-bit LLMs on CPUs, OpenAI-compatible.")
    commands = parser.add_subparsers(dest="command", required=True)

    pull = commands.add_parser("pull", help="fetch the default model into the models directory")
    pull.add_argument("--models-dir", type=Path, default=None)
    pull.set_defaults(handler=_pull)

    generate = commands.add_parser("generate", help="one chat reply, streamed to the terminal")
    generate.add_argument("prompt")
    generate.add_argument("--model", default=None, help="HF model directory or .gguf file (default: the default model)")
    generate.add_argument("--models-dir", type=Path, default=None)
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--threads", type=int, default=None)
    generate.set_defaults(handler=_generate)

    info = commands.add_parser("info", help="architecture, tensor types and byte counts of a model")
    info.add_argument("path", type=Path)
    info.set_defaults(handler=_info)

    serve = commands.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    from server.settings import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)
    return parser


def _pull(args: argparse.Namespace) -> int:
    path = pull_default_model(args.models_dir, log=lambda message: print(message, file=sys.stderr))
    print(path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine import load_model
    from engine.detokenizer import IncrementalDetokenizer
    from engine.runtime import configure_threads

    configure_threads(args.threads)
    model = load_model(resolve_model_path(args.model, args.models_dir))
    if model.tokenizer is None:
        raise ValueError(f"{model.source} has no tokenizer; generate needs one")
    prompt_ids = model.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                     add_generation_prompt=True, tokenize=True)
    detokenizer = IncrementalDetokenizer(model.tokenizer, prompt_ids, skip_special_tokens=True)
    eos = set(model.eos_token_ids)
    for token_id in model.stream_greedy(prompt_ids, args.max_tokens, stop_token_ids=tuple(eos)):
        if token_id in eos:
            break
        print(detokenizer.push(token_id), end="", flush=True)
    print(detokenizer.flush())
    return 0


def _info(args: argparse.Namespace) -> int:
    from engine.inspect import describe_model

    print(describe_model(args.path))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from server.app import run_server
    from server.settings import settings_from_args

    settings = settings_from_args(args)
    return run_server(settings)


if __name__ == "__main__":
    sys.exit(main())
