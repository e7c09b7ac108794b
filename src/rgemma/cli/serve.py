"""``rgemma serve``: the OpenAI-compatible HTTP server (``rgemma.serving``) over one model.

    rgemma serve --model PATH --port 8000        # binds 127.0.0.1 unless --host says otherwise
    python -m rgemma.cli.serve --model PATH      # the same, on its own

torch, fastapi and uvicorn are imported by ``run``, not with this module, so
``rgemma --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from rgemma.cli.common import (
    CLIError,
    add_model_args,
    load_model,
    model_sampling_defaults,
    report_error,
    resolve_model_path,
)
from rgemma.serving import DEFAULT_HOST, DEFAULT_PORT

DEMO_NAME = "demo"  # --model demo (or no --model): the bundled demo model
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    """Adds the ``serve`` verb."""
    p = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API with continuous batching",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
        "/metrics (OpenAI-compatible) with continuous batching.",
    )
    add_model_args(
        p,
        model_help="checkpoint (a directory or file, or a Hugging Face Hub id ORG/NAME), or "
        "'demo' for the bundled demo model (the default)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="model id in /v1/models (default: the checkpoint's directory name)",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}, this machine only)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"TCP port, 0 = any free one (printed once bound; default {DEFAULT_PORT})",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="sequences decoded together (rows of the state; default 8)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting at most; more get 503 (default 64)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="prompt tokens prefilled per step between decode steps (default 256)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=256.0,
        help="memory for cached prompt-prefix states, 0 = off (default 256)",
    )
    p.add_argument(
        "--state-memory-mb",
        type=float,
        default=1024.0,
        help="memory for state handles (/v1/states) kept in RAM (default 1024)",
    )
    p.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="disk tier: state handles and evicted prefix-cache states are written here "
        "and survive a restart (default: none, handles live in RAM only)",
    )
    p.add_argument(
        "--state-disk-mb",
        type=float,
        default=8192.0,
        help="bytes of the disk tier; the least recently used files go first (default 8192)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("RGEMMA_API_KEY"),
        help="require 'Authorization: Bearer KEY' (all paths but /health and "
        "/metrics; default: $RGEMMA_API_KEY, else none)",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=2048,
        help="largest max_tokens a request may ask (default 2048)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=8192,
        help="longest prompt accepted, in tokens (default 8192)",
    )
    p.add_argument(
        "--max-request-tokens",
        type=int,
        default=2**20,
        help="most tokens one request may cost: its prompt tokens + n x max_tokens per "
        f"prompt (default {2**20})",
    )
    p.add_argument(
        "--max-logprob-entries",
        type=int,
        default=2_000_000,
        help="most log-probabilities one request may return: scored tokens x n x "
        "(1 + logprobs) (default 2000000, about 50 MB of JSON)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=4.0,
        help="largest request body (default 4 MB; larger gets 413)",
    )
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    p.set_defaults(func=run)


def run(args) -> int:
    """``rgemma serve``: returns the exit status."""
    try:
        return _serve(args)
    except CLIError as e:
        return report_error("serve", e)


def _serve(args) -> int:
    _check_args(args)
    import uvicorn

    from rgemma.inference.engine import Engine, EngineConfig
    from rgemma.inference.state_store import StateStore
    from rgemma.serving.app import ServerConfig, create_app, long_lived_objects_frozen

    model, tokenizer, path = _load(args)
    model_sampling_defaults(tokenizer)  # refuse out-of-range defaults now, not per request
    disk = _disk_tier(args, model)
    engine = Engine(
        model,
        tokenizer,
        EngineConfig(
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            prefill_chunk=args.prefill_chunk,
            prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
        ),
        disk=disk,
    ).start()
    states = StateStore(model, int(args.state_memory_mb * 2**20), disk)
    name = args.served_model_name or os.path.basename(os.path.normpath(path)) or "rgemma"
    config = ServerConfig(
        model_name=name,
        api_key=args.api_key or None,
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_request_tokens=args.max_request_tokens,
        max_logprob_entries=args.max_logprob_entries,
    )
    try:
        sock = _listen(args.host, args.port)
    except CLIError:
        engine.stop()
        raise
    if args.host not in LOCAL_HOSTS and not config.api_key:
        print(f"rgemma serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"rgemma serve: {name} on http://{host}:{sock.getsockname()[1]} "
        f"(batch {args.max_batch}, queue {args.max_queue})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(engine, tokenizer, config, states),
                log_level=args.log_level,
                timeout_graceful_shutdown=5,
            )
        )
        with long_lived_objects_frozen(collect_first=True):
            server.run(sockets=[sock])
    finally:
        sock.close()
        engine.stop()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); port 0 picks a free port (``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        reason = getattr(e, "strerror", None) or e
        raise CLIError(f"cannot listen on {host} port {port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def _check_args(args) -> None:
    for flag, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--max-queue", args.max_queue, 1),
        ("--prefill-chunk", args.prefill_chunk, 1),
        ("--max-tokens-limit", args.max_tokens_limit, 1),
        ("--max-prompt-tokens", args.max_prompt_tokens, 1),
        ("--max-request-tokens", args.max_request_tokens, 1),
        ("--max-logprob-entries", args.max_logprob_entries, 1),
        ("--threads", args.threads, 0),
    ):
        if value < low:
            raise CLIError(f"{flag} must be >= {low}, got {value}", 2)
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535] (0 = any free port), got {args.port}", 2)
    if args.prefix_cache_mb < 0 or args.max_body_mb <= 0:
        raise CLIError("--prefix-cache-mb must be >= 0 and --max-body-mb > 0", 2)
    if args.state_memory_mb <= 0 or args.state_disk_mb <= 0:
        raise CLIError("--state-memory-mb and --state-disk-mb must be > 0", 2)


def _disk_tier(args, model):
    """The disk tier under --state-dir (None without one)."""
    if args.state_dir is None:
        return None
    from rgemma.io.disk_tier import DiskTier

    try:
        return DiskTier(args.state_dir, int(args.state_disk_mb * 2**20), model.config)
    except OSError as e:
        raise CLIError(f"--state-dir {args.state_dir}: cannot use it ({e.strerror or e})") from None


def _load(args):
    """(model, tokenizer, checkpoint path); ``--model demo`` names the bundled demo model
    unless a file or directory of that name exists."""
    path = args.model
    if path == DEMO_NAME and not os.path.exists(path):
        path = None
    path = resolve_model_path(path, args.revision)
    model, tokenizer = load_model(
        argparse.Namespace(**{**vars(args), "model": path, "revision": None})
    )
    return model.eval(), tokenizer, path


def main(argv: list[str] | None = None) -> int:
    """``python -m rgemma.cli.serve ...``: the ``serve`` verb on its own."""
    parser = argparse.ArgumentParser(prog="python -m rgemma.cli.serve")
    register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
