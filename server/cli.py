"""The `bitserve` command line (DESIGN §9): pull, serve, generate, info, admin. Parses flags, then hands off."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from engine.default_model import PullError, pull_default_model, resolve_model_path
from engine.formats.errors import ModelFormatError

if TYPE_CHECKING:
    import httpx


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
    _add_admin_parser(commands)
    return parser


def _add_admin_parser(commands: argparse._SubParsersAction) -> None:
    admin = commands.add_parser("admin", help="call the admin API of a server, or of every replica with --all")
    actions = admin.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="loaded models, the active one, bytes and load state")
    load = actions.add_parser("load", help="load a model from the models directory (in the background)")
    load.add_argument("id", help="id the model will be served under")
    load.add_argument("path", help="file or directory, relative to the server's models directory")
    load.add_argument("--activate", action="store_true", help="make it the active (`default`) model once ready")
    activate = actions.add_parser("activate", help="send new `default` requests to this model")
    activate.add_argument("id")
    unload = actions.add_parser("unload", help="stop serving a model once its in-flight requests finish; free it")
    unload.add_argument("id")
    for action in (load, unload):
        action.add_argument("--wait", action="store_true", help="return only once the load or unload has finished")
    for action in (listing, load, activate, unload):
        action.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
        action.add_argument("--admin-token", default=None, help="admin bearer token [env BITSERVE_ADMIN_TOKEN]")
        action.add_argument("--all", action="store_true",
                            help="call every replica of --replicas-file (or env BITSERVE_REPLICAS) instead of --url")
        action.add_argument("--replicas-file", type=Path, default=None, help="replica base URLs, one per line")
        action.add_argument("--timeout-s", type=float, default=600.0, help="how long --wait waits")
        action.set_defaults(handler=_admin)


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


def _admin(args: argparse.Namespace) -> int:
    """Run one admin call against each target; print each answer as JSON. Exit 1 if any target failed."""
    import httpx

    token = args.admin_token or os.environ.get("BITSERVE_ADMIN_TOKEN")
    if not token:
        raise ValueError("no admin token: pass --admin-token or set BITSERVE_ADMIN_TOKEN")
    urls = _replica_urls(args.replicas_file) if args.all else [args.url]
    all_ok = True
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30.0) as http:
        for url in urls:
            try:
                ok, answer = _admin_call(http, url.rstrip("/"), args)
            except httpx.HTTPError as exc:
                ok, answer = False, {"error": f"{type(exc).__name__}: {exc}"}
            all_ok &= ok
            if args.all:
                print(f"# {url}: {'ok' if ok else 'FAILED'}")
            print(json.dumps(answer, indent=2))
    return 0 if all_ok else 1


def _admin_call(http: httpx.Client, url: str, args: argparse.Namespace) -> tuple[bool, object]:
    if args.action == "list":
        response = http.get(f"{url}/admin/models")
    elif args.action == "load":
        response = http.post(f"{url}/admin/models/load", json={"id": args.id, "path": args.path,
                                                                "activate": args.activate})
    else:
        response = http.post(f"{url}/admin/models/{args.action}", json={"id": args.id})
    if not response.is_success or not getattr(args, "wait", False):
        return response.is_success, _answer(response)
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        listing = http.get(f"{url}/admin/models").raise_for_status().json()
        entry = next((model for model in listing["data"] if model["id"] == args.id), None)
        if args.action == "unload" and entry is None:
            return True, listing
        if args.action == "load" and entry is not None and entry["state"] in ("ready", "failed"):
            return entry["state"] == "ready", entry
    return False, {"error": f"{args.action} of {args.id} did not finish within {args.timeout_s:.0f} s"}


def _answer(response: httpx.Response) -> object:
    """The JSON body; a failure also carries its HTTP status, and a body that is not JSON (a proxy's page) its text."""
    try:
        body = response.json()
    except ValueError:
        body = {"text": response.text[:1000]}
    return body if response.is_success else {"http_status": response.status_code, **body}


def _replica_urls(replicas_file: Path | None) -> list[str]:
    """Base URLs from the file (one per line, # comments) or BITSERVE_REPLICAS (comma-separated)."""
    if replicas_file is not None:
        lines = (line.split("#", 1)[0].strip() for line in replicas_file.read_text().splitlines())
    else:
        lines = (url.strip() for url in os.environ.get("BITSERVE_REPLICAS", "").split(","))
    urls = [url for url in lines if url]
    if not urls:
        raise ValueError("--all needs replicas: pass --replicas-file or set BITSERVE_REPLICAS (comma-separated URLs)")
    return urls


if __name__ == "__main__":
    sys.exit(main())
