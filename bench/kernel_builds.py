"""The eager CPU decode step with two builds of rgemma's kernels, interleaved in one process.

    python bench/kernel_builds.py --base HEAD~1 --shape 2b --systems int8 --batches 1 16
    python bench/kernel_builds.py --smoke --base HEAD                 # seconds, for CI

"base" is ``src/rgemma/kernels.c`` as it was at git revision --base, "tree" the
working tree's; both are compiled as ``kernels.build`` compiles (into its cache)
and loaded side by side, and the model calls whichever is current. Round by
round, in alternating order, each build times a median decode step per system
and batch (``decode_step.median_step``, after a 16-token prompt); the table gives
the median over rounds, tree / base, and the fraction of the memory bound
(B x read bandwidth / weight bytes) each reached. The two sources must export
the same functions with the same arguments (the tree's ``kernels.py`` calls both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, write_json  # noqa: E402
from compare import read_bandwidth, weight_bytes  # noqa: E402
from decode_step import median_step, step_models  # noqa: E402
from rgemma import kernels  # noqa: E402


def load_at(revision: str):
    """kernels.c at ``revision``, compiled as the tree's is (``kernels.build``) and loaded
    with the tree's argument types (``kernels.load_library``)."""
    root = Path(kernels.SOURCE).resolve().parents[2]
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{revision}:src/rgemma/kernels.c"],
        capture_output=True,
        check=False,
    )
    if source.returncode:
        sys.exit(f"cannot read kernels.c at {revision!r}: {source.stderr.decode().strip()}")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "kernels.c")
        path.write_bytes(source.stdout)
        library = kernels.build(path)
    try:
        return kernels.load_library(library)
    except AttributeError as e:
        sys.exit(f"kernels.c at {revision!r} lacks a function the tree's kernels.py calls: {e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="HEAD~1", help="git revision of the other build")
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    p.add_argument("--systems", nargs="+", default=["int8"], choices=["bf16", "int8", "int4"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="bench/results/kernel_builds", help="writes OUT.json")
    p.add_argument("--smoke", action="store_true", help="tiny shape, a few steps (CI)")
    args = p.parse_args()
    if args.smoke:
        args.shape, args.batches, args.steps, args.rounds = "tiny", [1, 4], 2, 2
    torch.set_num_threads(args.threads)
    if not kernels.available():
        sys.exit("rgemma's kernels are not available here (no C compiler, or RGEMMA_NATIVE=0)")
    builds = {"base": load_at(args.base), "tree": kernels._lib}
    models = step_models(args.shape, args.systems)
    rates: dict[tuple[str, int, str], list[float]] = {}
    bandwidth = 0.0
    for r in range(args.rounds):
        bandwidth = max(bandwidth, read_bandwidth())
        order = list(builds) if r % 2 == 0 else list(reversed(builds))
        for name, model in models.items():
            for batch in args.batches:
                for build in order:
                    kernels._lib = builds[build]
                    seconds = median_step(model, batch, args.steps)
                    rates.setdefault((name, batch, build), []).append(batch / seconds)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    kernels._lib = builds["tree"]
    print(f"\n{args.shape} shape, {args.threads} threads, base = {args.base}; "
          f"x.sum() read {bandwidth / 1e9:.1f} GB/s; medians of {args.rounds} rounds")  # fmt: skip
    print("| system | batch | base (tok/s) | tree (tok/s) | tree / base | base: bound "
          "| tree: bound |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name, model in models.items():
        per_token = weight_bytes(model) / bandwidth
        for batch in args.batches:
            b, t = (statistics.median(rates[(name, batch, k)]) for k in ("base", "tree"))
            rows.append(dict(system=name, batch=batch, base_tok_s=b, tree_tok_s=t,
                             base_bound=b / batch * per_token,
                             tree_bound=t / batch * per_token))  # fmt: skip
            print(f"| {name} | {batch} | {b:.2f} | {t:.2f} | {t / b:.2f}x | "
                  f"{b / batch * per_token:.0%} | {t / batch * per_token:.0%} |")  # fmt: skip
    meta = dict(shape=args.shape, threads=args.threads, base=args.base,
                read_bandwidth_gbs=bandwidth / 1e9)  # fmt: skip
    write_json(args.out + ".json", {"meta": meta, "results": rows})


if __name__ == "__main__":
    main()
