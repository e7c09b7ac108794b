"""The scans against the reference loop, at the 2B width: the chunked scan (CPU and
GPU) and, on a GPU with Triton, the one-launch Triton kernel, forward and
forward + backward. On a GPU each scan's time is also given as a fraction of the
memory bound: the forward reads a and x and writes h (3 x 4 bytes a value) at the
device's copy bandwidth, measured in the same run.

python bench/scan.py [--device cpu|cuda] [--width 2560] [--lengths 1024 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import read_bandwidth  # noqa: E402
from rgemma.scan import (  # noqa: E402
    linear_scan_chunked,
    linear_scan_reference,
    linear_scan_triton,
    triton_available,
)


def timed(fn, *args, repeats: int) -> float:
    """Median wall seconds of fn(*args), waiting for the GPU."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn(*args)  # warm-up (and Triton's compile)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_backward(scan):
    def run(a, x, h0):
        leaves = [t.detach().requires_grad_() for t in (a, x, h0)]
        y, h = scan(*leaves)
        (y.sum() + h.sum()).backward()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--width", type=int, default=2560)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scans = {"loop": linear_scan_reference, "chunked": linear_scan_chunked}
    if args.device == "cuda" and triton_available():
        scans["triton"] = linear_scan_triton
    copy_rate = None
    if args.device == "cuda":
        copy_rate = read_bandwidth(1.0, "cuda")
        print(f"copy bandwidth {copy_rate / 1e12:.2f} TB/s (read + write)")
    for T in args.lengths:
        shape = (args.batch, T, args.width)
        a = (torch.rand(shape, device=args.device) ** 0.05).float()
        x = torch.randn(shape, device=args.device)
        h0 = torch.zeros(args.batch, args.width, device=args.device)
        ref, _ = linear_scan_reference(a.double(), x.double(), h0.double())
        print(f"T={T} [{args.batch}, {T}, {args.width}] float32:")
        loop_s = None
        for name, scan in scans.items():
            with torch.no_grad():
                y, _ = scan(a, x, h0)
                seconds = timed(scan, a, x, h0, repeats=args.repeats)
            both = timed(forward_backward(scan), a, x, h0, repeats=args.repeats)
            loop_s = loop_s or seconds
            line = (
                f"  {name:8s} forward {seconds * 1e3:9.3f} ms ({loop_s / seconds:7.1f}x loop)"
                f"  forward+backward {both * 1e3:9.3f} ms"
                f"  max |diff| vs float64 {(y.double() - ref).abs().max().item():.2e}"
            )
            if copy_rate:
                line += f"  forward at {3 * a.numel() * 4 / copy_rate / seconds:6.1%} of the bound"
            print(line, flush=True)


if __name__ == "__main__":
    main()
