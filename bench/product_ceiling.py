"""How fast rgemma's native decode products compute, apart from how fast memory delivers.

    python bench/product_ceiling.py --shape 2b --systems bf16 int8 int4 --batches 1
    python bench/product_ceiling.py --smoke                           # seconds, for CI

A batch-1 decode step is bound by reading the weights only if the products
compute faster than memory delivers. For each system and each product shape of
the model (a [B, K] activation against an [N, K] weight), this times the
native product two ways, round by round, interleaved with ``x.sum()`` over
1 GiB (the read bandwidth of the same moment):

- "streamed": a run of distinct weight copies (about 1 GB, read from memory,
  as a decode step reads them);
- "in cache": the first rows of one weight, few enough to stay in the cache
  (``--cache-kib`` per thread, or the fewest that still use every thread),
  called again and again: the rate at which the kernel computes with no
  memory wait, its ceiling.

Rates are weight bytes read per second (medians over rounds). Where "in
cache" is not well above ``x.sum()``, the product cannot reach the memory
bound on this machine whatever the memory does: the kernel's arithmetic per
weight byte is the limit, not the layout of its reads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, write_json  # noqa: E402
from compare import read_bandwidth  # noqa: E402
from rgemma import kernels  # noqa: E402

GROUP = 128  # int4 group size (rgemma quantize's default)


def product_shapes(cfg) -> list[tuple[str, int, int]]:
    """(name, N, K) of each distinct product of a decode step (the MLP's two up
    projections share a shape, as do the recurrent block's x / y / out)."""
    shapes = [
        ("recurrent x/y/out", cfg.lru_width, cfg.width),
        ("mlp up", cfg.mlp_width, cfg.width),
        ("mlp down", cfg.width, cfg.mlp_width),
        ("attention kv", cfg.head_dim, cfg.width),
        ("logits", cfg.vocab_size, cfg.width),
    ]
    return [(name, n, k) for name, n, k in shapes if k % GROUP == 0]


def weights(system: str, n: int, k: int) -> tuple:
    """Random weight tensors of one [n, k] product in ``system``'s storage."""
    if system == "bf16":
        return (torch.randn(n, k).bfloat16(),)
    if system == "int8":
        return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 127
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    return packed, torch.rand(n, k // GROUP) / 15, torch.randn(n, k // GROUP)


class Product:
    """The native product of ``x`` with ``tensors`` as a call without arguments (a bound
    call holds addresses only: this holds the tensors too)."""

    def __init__(self, system: str, x: torch.Tensor, tensors: tuple):
        self.x, self.tensors = x, tensors
        self.y = torch.empty(x.shape[0], tensors[0].shape[0])
        into = {"bf16": kernels.bf16_matmul_into, "int8": kernels.int8_matmul_into,
                "int4": kernels.int4_matmul_into}[system]  # fmt: skip
        self.call = into(x, *tensors, self.y)

    def __call__(self) -> None:
        self.call()


def nbytes(tensors: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def all_threads(system: str, batch: int, n: int, k: int) -> bool:
    """Whether the kernels run a [batch, k] x [n, k] product on every thread."""
    work = k // 4 if system == "int4" else k  # as kernels' own binders count it
    return kernels._threads(batch, n, work) == torch.get_num_threads()


def rate(calls: list, bytes_per_call: int, repeat: int) -> float:
    """Bytes per second over ``repeat`` passes through ``calls``."""
    calls[0]()
    t0 = time.perf_counter()
    for _ in range(repeat):
        for call in calls:
            call()
    return bytes_per_call * len(calls) * repeat / (time.perf_counter() - t0)


def cases(systems, shapes, batch: int, stream_bytes: float, cache_bytes: int) -> list[dict]:
    """Per system and shape: the streamed calls (distinct copies) and the in-cache call."""
    out = []
    for system in systems:
        for name, n, k in shapes:
            x = torch.randn(batch, k)
            one = nbytes(weights(system, 1, k))
            copies = max(1, int(stream_bytes // (one * n)))
            streamed = [Product(system, x, weights(system, n, k)) for _ in range(copies)]
            rows = max(16, min(n, cache_bytes // one) // 16 * 16)
            while rows < n and not all_threads(system, batch, rows, k):
                rows += 16  # a product too small for a fork runs on one thread
            hot = Product(system, x, weights(system, rows, k))
            repeat = max(1, int(2e8 // (one * rows)))  # about 0.2 GB a pass
            out.append(dict(system=system, product=name, n=n, k=k, batch=batch,
                            streamed=streamed, stream_bytes=one * n, hot=hot,
                            hot_bytes=one * rows, hot_repeat=repeat))  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    p.add_argument("--systems", nargs="+", default=["bf16", "int8", "int4"],
                   choices=["bf16", "int8", "int4"])  # fmt: skip
    p.add_argument("--batches", nargs="+", type=int, default=[1])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stream-gb", type=float, default=0.5, help="weight copies streamed a pass")
    p.add_argument("--cache-kib", type=int, default=320, help="in-cache weight, per thread")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="bench/results/product_ceiling", help="writes OUT.json")
    p.add_argument("--smoke", action="store_true", help="tiny shape, one round (CI)")
    args = p.parse_args()
    if args.smoke:
        args.shape, args.rounds, args.stream_gb = "tiny", 1, 0.01
    if not kernels.available():
        sys.exit("rgemma's native kernels are not built on this machine (no C compiler?)")
    torch.set_num_threads(args.threads)
    shapes = product_shapes(SHAPES[args.shape]())
    cache_bytes = args.cache_kib * 1024 * args.threads
    todo = [c for b in args.batches for c in cases(args.systems, shapes, b, args.stream_gb * 1e9,
                                                   cache_bytes)]  # fmt: skip
    bandwidths = []
    streamed, hot = ({i: [] for i in range(len(todo))} for _ in range(2))
    for r in range(args.rounds):
        bandwidths.append(read_bandwidth())
        for i, c in enumerate(todo):
            streamed[i].append(rate(c["streamed"], c["stream_bytes"], 1))
            hot[i].append(rate([c["hot"]], c["hot_bytes"], c["hot_repeat"]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    bw = statistics.median(bandwidths)
    print(f"\n{args.shape} shape, {args.threads} threads; x.sum() read {bw / 1e9:.1f} GB/s "
          f"(median of {args.rounds}); weight bytes read per second")  # fmt: skip
    print("| system | batch | product [N x K] | streamed | in cache | streamed / x.sum | "
          "in cache / x.sum |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    rows = []
    for i, c in enumerate(todo):
        s, h = statistics.median(streamed[i]), statistics.median(hot[i])
        rows.append(dict(system=c["system"], batch=c["batch"], product=c["product"], n=c["n"],
                         k=c["k"], streamed_gbs=s / 1e9, in_cache_gbs=h / 1e9))  # fmt: skip
        print(f"| {c['system']} | {c['batch']} | {c['product']} [{c['n']} x {c['k']}] | "
              f"{s / 1e9:.1f} GB/s | {h / 1e9:.1f} GB/s | "
              f"{s / bw:.0%} | {h / bw:.0%} |")  # fmt: skip
    meta = dict(shape=args.shape, threads=args.threads, read_bandwidth_gbs=bw / 1e9)
    write_json(args.out + ".json", {"meta": meta, "results": rows})


if __name__ == "__main__":
    main()
