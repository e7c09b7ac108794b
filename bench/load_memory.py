"""Peak memory of ``rgemma.checkpoint.load`` on a random 2B-shaped checkpoint.

    python bench/load_memory.py [--dir DIR] [--dtype bfloat16] [--shard-size 2GB] [--keep]
    python bench/load_memory.py --quantize 8         # ... quantized to int8 while loading
    python bench/load_memory.py --smoke --quantize 4 # a tiny checkpoint, seconds (CI)

1. Writes a random RecurrentGemma-2B-shaped Hugging Face checkpoint (bf16 by
   default, ~5.4 GB) into DIR (a temp dir by default), streaming: one shard's
   tensors at a time, so the writer never holds the model.
2. In a fresh subprocess, loads it with ``rgemma.checkpoint.load(dtype=...,
   quantize=...)``
   and reports the peak RSS (``resource.getrusage``), the peak anonymous RSS
   (sampled from /proc/self/status; file-backed mmap pages excluded) and the
   load time, against the weight bytes and the RSS after imports.

Needs ~11 GB of disk (less with --keep off: the checkpoint is removed) and
~6 GB of RAM. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES  # noqa: E402
from rgemma import weights  # noqa: E402
from rgemma.config import GriffinConfig  # noqa: E402
from rgemma.io.checkpoint import INDEX_FILE, parse_size, plan_shards, shard_file_name  # noqa: E402


def write_random_checkpoint(
    out: Path, config: GriffinConfig, dtype: torch.dtype, shard_size: int, seed: int = 0
) -> int:
    """Writes config.json and random safetensors shards; returns the weight bytes."""
    from safetensors.torch import save_file

    shapes = weights.expected_shapes(config)
    sizes = {k: math.prod(s) * dtype.itemsize for k, s in shapes.items()}
    shards = plan_shards(sizes, shard_size)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        file = shard_file_name(k, len(shards))
        part = {
            "model." + n: (torch.randn(shapes[n], generator=gen) * 0.02).to(dtype) for n in names
        }
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        del part
        print(f"  wrote {file}", flush=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return sum(sizes.values())


MEASURE = textwrap.dedent("""
    import json, resource, sys, threading, time
    import torch
    import rgemma.io.checkpoint as C
    from rgemma.quantize import quantized_bytes

    def rss_kb(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    peak_anon = [0]
    done = threading.Event()
    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], rss_kb("RssAnon"))
            time.sleep(0.02)

    base_rss, base_anon = rss_kb("VmRSS"), rss_kb("RssAnon")
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    quantize = int(sys.argv[3]) if sys.argv[3] != "none" else None
    model, _ = C.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]), quantize=quantize,
                      progress=False)
    seconds = time.perf_counter() - t0
    done.set()
    param_bytes = quantized_bytes(model)
    print(json.dumps(dict(
        seconds=seconds, param_bytes=param_bytes,
        base_rss_kb=base_rss, base_anon_kb=base_anon,
        peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        peak_anon_kb=max(peak_anon[0], rss_kb("RssAnon")),
        final_rss_kb=rss_kb("VmRSS"))))
""")


def measure(directory: Path, dtype: str, quantize: int | None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(directory), dtype, str(quantize or "none")],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to write the checkpoint (reused if it has a config.json)",
    )
    parser.add_argument("--dtype", default="bfloat16", help="stored and loaded dtype")
    parser.add_argument("--shard-size", default="2GB")
    parser.add_argument("--preset", default="recurrentgemma-2b")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--quantize", type=int, choices=[8, 4], default=None,
                        help="quantize the weights while loading (int8 or int4)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny checkpoint (CI)")
    args = parser.parse_args()

    config = SHAPES["tiny"]() if args.smoke else GriffinConfig.from_preset(args.preset)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="rgemma-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if (directory / "config.json").exists():
            print(f"reusing the checkpoint in {directory}")
            nbytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        else:
            name = "tiny" if args.smoke else args.preset
            print(f"writing a random {name} checkpoint ({args.dtype}) to {directory}")
            nbytes = write_random_checkpoint(
                directory, config, getattr(torch, args.dtype), parse_size(args.shard_size)
            )
        r = measure(directory, args.dtype, args.quantize)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    gb = 1e9
    kb = 1024
    held = f"int{args.quantize}" if args.quantize else "parameters"
    print(f"weights:           {nbytes / gb:.2f} GB ({r['param_bytes'] / gb:.2f} GB of {held})")
    print(f"RSS after imports: {r['base_rss_kb'] * kb / gb:.2f} GB")
    print(
        f"peak RSS:          {r['peak_rss_kb'] * kb / gb:.2f} GB "
        f"(+{(r['peak_rss_kb'] - r['base_rss_kb']) * kb / nbytes:.2f} x weights)"
    )
    print(
        f"peak anon RSS:     {r['peak_anon_kb'] * kb / gb:.2f} GB "
        f"(+{(r['peak_anon_kb'] - r['base_anon_kb']) * kb / nbytes:.2f} x weights)"
    )
    print(f"RSS after load:    {r['final_rss_kb'] * kb / gb:.2f} GB")
    print(f"load time:         {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
