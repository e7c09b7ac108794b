"""Load and latency of `rgemma serve`: aggregate tok/s and time-to-first-token by concurrency.

    python bench/serve_load.py                         # bundled demo model, in-process server
    python bench/serve_load.py --model PATH --clients 1 8 32 --max-tokens 64
    python bench/serve_load.py --url http://127.0.0.1:8000   # a server already running
    python bench/serve_load.py --random                # a random ~5M-parameter model

For each number of concurrent clients C, C clients each send requests one
after another (streamed completions, greedy, ``ignore_eos`` so every request
generates exactly ``--max-tokens`` tokens) until ``--requests`` have been
sent in all. Reported per C: aggregate generated tokens per second (all
completion tokens / wall time), time to first token (request sent -> first
streamed text) p50 / p99, and whole-request latency p50. Unless ``--url`` is
given, the server runs as a separate process (``python -m rgemma.cli.serve``)
bound to 127.0.0.1, stopped at the end.

Also unless ``--url`` is given, the same load is first run on the engine alone
(a separate process, no HTTP: C threads submitting the same requests), and
the last column is the server's tok/s over the engine's: what the HTTP layer
(parsing, SSE, the event loop) costs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WORDS = (
    "the of and to in is for def return self import class if else while with as "
    "value data list dict print range len open file name path time model state "
    "token stream batch server client request answer question"
).split()


# ================================================================= the model
def random_checkpoint(directory: Path) -> str:
    """A random-weight Griffin (width 256, 6 layers) with a SentencePiece tokenizer."""
    import sentencepiece
    import torch

    from rgemma.config import GriffinConfig, griffin_pattern
    from rgemma.io import checkpoint
    from rgemma.model import Griffin

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    buf = io.BytesIO()
    specials = [f"<unused{i}>" for i in range(102)] + ["<start_of_turn>", "<end_of_turn>"]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=1024,
        hard_vocab_limit=False,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        user_defined_symbols=specials,
        add_dummy_prefix=False,
        minloglevel=2,
        num_threads=1,
    )
    tok_dir = directory / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes(buf.getvalue())
    vocab = sentencepiece.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    config = GriffinConfig(
        vocab_size=vocab,
        width=256,
        mlp_width=768,
        num_heads=2,
        block_types=griffin_pattern(6),
        attention_window=256,
    )
    torch.manual_seed(0)
    path = directory / "model"
    checkpoint.save_hf(Griffin(config).init_weights(0), path, tokenizer_dir=tok_dir)
    return str(path)


def start_server(args, path: str) -> tuple[subprocess.Popen, str]:
    """``python -m rgemma.cli.serve`` serving ``path`` on 127.0.0.1 (a separate process, so
    the load generator does not share its interpreter); returns (process, url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "rgemma.cli.serve",
        "--model",
        path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch or max(args.clients)),
        "--max-queue",
        str(max(64, 2 * max(args.clients))),
        "--prefill-chunk",
        str(args.prefill_chunk),
        "--prefix-cache-mb",
        str(args.prefix_cache_mb),
        "--max-tokens-limit",
        str(max(2048, args.max_tokens)),
        "--log-level",
        "warning",
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server did not start: {' '.join(cmd)}")


# ================================================================== the load
async def one_request(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: its TTFT, latency and completion tokens."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"status": 200, "ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens}


async def run_level(
    url: str, clients: int, requests: int, max_tokens: int, prompt_words: int, seed: int
) -> dict:
    """``requests`` requests from ``clients`` concurrent closed-loop clients."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) for _ in range(requests)]
    results: list[dict] = []

    async def client(http):
        while prompts:
            results.append(await one_request(http, prompts.pop(), max_tokens))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(clients)])
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "tok_s": sum(r["tokens"] for r in ok) / wall,
        "wall_s": wall,
        "ttft_p50": _quantile(ttft, 0.5),
        "ttft_p99": _quantile(ttft, 0.99),
        "latency_p50": _quantile(sorted(r["latency"] for r in ok), 0.5),
    }


def engine_level(
    path: str,
    clients: int,
    requests: int,
    max_tokens: int,
    prompt_words: int,
    seed: int,
    max_batch: int,
) -> dict:
    """The load of ``run_level`` on the engine alone (no HTTP), in this process."""
    import threading

    from rgemma.inference.engine import Engine, EngineConfig, Request
    from rgemma.io import checkpoint

    model, tok = checkpoint.load(path, progress=False)
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) for _ in range(requests)]
    tokens = []

    def client(engine):
        while prompts:
            ids = tok.encode(prompts.pop(), add_bos=True)
            handle = engine.submit(Request(ids, max_tokens=max_tokens, stop_ids=[]))
            tokens.append(sum(1 for e in handle if e.kind == "token"))

    with Engine(model.eval(), tok, EngineConfig(max_batch=max_batch, max_queue=4 * requests)) as e:
        warm = e.submit(Request(tok.encode("warm up", add_bos=True), max_tokens=4))
        list(warm)
        threads = [threading.Thread(target=client, args=(e,)) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    return {"clients": clients, "tok_s": sum(tokens) / wall}


def engine_baseline(args, path: str) -> dict[int, float]:
    """{clients: tok/s} of ``engine_level`` per level, each in a fresh process."""
    out = {}
    for clients in args.clients:
        n = args.requests or max(8, 2 * clients)
        call = (
            f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import torch; torch.set_num_threads({args.threads}) if {args.threads} else None; "
            f"from serve_load import engine_level; print(json.dumps(engine_level({path!r}, "
            f"{clients}, {n}, {args.max_tokens}, {args.prompt_words}, {clients}, "
            f"{args.max_batch or max(args.clients)})))"
        )
        done = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the engine baseline failed:\n{done.stderr}")
        out[clients] = json.loads(done.stdout.strip().splitlines()[-1])["tok_s"]
    return out


def _vs_engine(tok_s: float, engine_tok_s: float | None) -> str:
    if engine_tok_s is None:
        return ""
    return f"{engine_tok_s:>12.1f} {tok_s / engine_tok_s:>12.2f}x"


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list (nan when empty)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", help="checkpoint to serve (default: the bundled demo model)")
    where.add_argument("--url", help="benchmark a server already running at this URL")
    where.add_argument("--random", action="store_true", help="serve a random ~5M model")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: max(8, 2 x clients))"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=0, help="default: the most clients")
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--prefix-cache-mb", type=float, default=0.0)
    p.add_argument(
        "--threads", type=int, default=0, help="the server's torch threads (default: torch's)"
    )
    args = p.parse_args()

    server = None
    url = args.url
    baseline: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if url is None:
            path = args.model
            if args.random:
                path = random_checkpoint(Path(tmp))
            elif path is None:
                from rgemma.io import demo

                try:
                    path = demo.path()
                except FileNotFoundError as e:
                    raise SystemExit(f"{e}\n(use --model PATH or --random)") from None
            baseline = engine_baseline(args, path)
            server, url = start_server(args, path)
            print(f"serving {path} at {url}", file=sys.stderr)
        try:
            asyncio.run(run_level(url, 1, 2, 4, args.prompt_words, seed=123))  # warm-up
            print(
                f"{'clients':>7} {'requests':>8} {'errors':>6} {'tok/s':>8} "
                f"{'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} {'wall s':>7} "
                f"{'engine tok/s':>12} {'server/engine':>13}"
            )
            for clients in args.clients:
                n = args.requests or max(8, 2 * clients)
                r = asyncio.run(
                    run_level(url, clients, n, args.max_tokens, args.prompt_words, seed=clients)
                )
                print(
                    f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['tok_s']:>8.1f} "
                    f"{r['ttft_p50'] * 1e3:>7.0f}ms {r['ttft_p99'] * 1e3:>7.0f}ms "
                    f"{r['latency_p50']:>7.2f}s {r['wall_s']:>7.1f} "
                    + _vs_engine(r["tok_s"], baseline.get(clients)),
                    flush=True,
                )
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
