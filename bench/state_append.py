"""Reading a long document into a state handle: append throughput and the server's memory.

    python bench/state_append.py                          # demo model, 10k and 100k tokens
    python bench/state_append.py --model PATH --tokens 10000 100000 --chunk 2048 --as text

A server (the engine and HTTP layer of ``rgemma serve``, in this process) reads
a document of N tokens into a handle by appends of --chunk tokens (as token ids,
or as text of about that many tokens), then the same document as one prompt of
``/v1/completions`` (``max_tokens`` 1), the way a client without handles must
send it. For each N: tokens per second and the process's RSS after each
(current, and the peak since start), so a flat line is visible.
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import sys
import sysconfig
import time

import httpx
import torch

from rgemma.inference.engine import Engine, EngineConfig
from rgemma.io import checkpoint, demo
from rgemma.serving.app import ServerConfig, ServerThread, create_app


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process, MB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    current = int(fields["VmRSS"].split()[0]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def source_text(chars: int) -> str:
    """Standard-library Python source, repeated to ``chars`` characters."""
    stdlib = sysconfig.get_paths()["stdlib"]
    text = ""
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text += f.read()
        if len(text) >= chars:
            break
    return (text * (chars // max(len(text), 1) + 1))[:chars]


def document(tokenizer, tokens: int, as_text: bool, chunk: int) -> list:
    """The document as append chunks: lists of ids, or texts of about ``chunk`` tokens."""
    if not as_text:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, tokenizer.vocab_size, (tokens,), generator=g).tolist()
        return [ids[i : i + chunk] for i in range(0, tokens, chunk)]
    text = source_text(tokens * 5)
    per_token = len(text) / max(len(tokenizer.encode(text[:200000], add_bos=False)), 1)
    text = text[: int(tokens * per_token)]
    step = int(chunk * per_token)
    return [text[i : i + step] for i in range(0, len(text), step)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    p.add_argument("--tokens", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--chunk", type=int, default=2048, help="tokens per append (default 2048)")
    p.add_argument("--as", dest="as_", choices=("ids", "text"), default="ids")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-whole", action="store_true", help="no whole-prompt comparison")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = checkpoint.load(args.model or demo.path(), progress=False)
    model.eval()
    longest = max(args.tokens)
    config = ServerConfig(
        max_prompt_tokens=longest + 16,
        max_body_bytes=64 * longest + 2**20,
        max_request_tokens=2 * longest,
    )
    print(f"state: {model.init_state(1).nbytes / 2**20:.2f} MB, {torch.get_num_threads()} threads")
    print(f"{'tokens':>8} {'path':>14} {'tok/s':>9} {'RSS MB':>8} {'peak MB':>8}")
    with Engine(model, tok, EngineConfig(max_batch=4)) as engine:
        with ServerThread(create_app(engine, tok, config)) as url:
            client = httpx.Client(base_url=url, timeout=3600)
            for n in sorted(args.tokens):
                chunks = document(tok, n, args.as_ == "text", args.chunk)
                handle = client.post("/v1/states", json={}).json()["id"]
                start = time.perf_counter()
                for c in chunks:
                    r = client.post(f"/v1/states/{handle}/append", json={"prompt": c})
                    r.raise_for_status()
                seconds = time.perf_counter() - start
                got = r.json()["tokens"]
                print(
                    f"{got:>8} {'append':>14} {got / seconds:>9.0f} {rss_mb()[0]:>8.0f} "
                    f"{rss_mb()[1]:>8.0f}",
                    flush=True,
                )
                client.delete(f"/v1/states/{handle}")
                if args.skip_whole:
                    continue
                prompt = [t for c in chunks for t in c] if args.as_ == "ids" else "".join(chunks)
                start = time.perf_counter()
                r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
                r.raise_for_status()
                seconds = time.perf_counter() - start
                got = r.json()["usage"]["prompt_tokens"]
                print(
                    f"{got:>8} {'whole prompt':>14} {got / seconds:>9.0f} "
                    f"{rss_mb()[0]:>8.0f} {rss_mb()[1]:>8.0f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
