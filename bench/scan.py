"""Fast chunked scan vs the reference loop (CPU), at the 2B width.

python bench/scan.py [--width 2560] [--lengths 1024 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rgemma.scan import linear_scan_chunked, linear_scan_reference


def timed(fn, *args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=int, default=2560)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'T':>6} {'loop ms':>9} {'chunked ms':>11} {'speed-up':>9} {'max |diff|':>11}")
    for T in args.lengths:
        a = torch.rand(args.batch, T, args.width) ** 0.05
        x = torch.randn(args.batch, T, args.width)
        h0 = torch.zeros(args.batch, args.width)
        with torch.no_grad():
            ref, _ = linear_scan_reference(a, x, h0)
            fast, _ = linear_scan_chunked(a, x, h0)
            loop = timed(linear_scan_reference, a, x, h0, repeats=args.repeats)
            chunked = timed(linear_scan_chunked, a, x, h0, repeats=args.repeats)
        diff = (ref - fast).abs().max().item()
        print(
            f"{T:>6} {loop * 1e3:>9.1f} {chunked * 1e3:>11.1f} "
            f"{loop / chunked:>8.1f}x {diff:>11.2e}"
        )


if __name__ == "__main__":
    main()
