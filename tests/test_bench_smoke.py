"""The benchmark scripts still run (tiny shape, a few tokens): they must not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_smoke(script: str, tmp_path) -> subprocess.CompletedProcess:
    """``bench/SCRIPT.py --smoke``, writing ``tmp_path/SCRIPT.*``; it must succeed."""
    argv = [
        sys.executable,
        os.path.join(ROOT, "bench", f"{script}.py"),
        "--smoke",
        "--threads",
        "1",
        "--out",
        str(tmp_path / script),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_compare_smoke(tmp_path):
    proc = run_smoke("compare", tmp_path)
    data = json.loads((tmp_path / "compare.json").read_text())
    systems = {r["system"] for r in data["results"]}
    assert {"rgemma", "rgemma-int8", "rgemma-int4", "transformers", "official"} <= systems
    assert all(r["median"] > 0 for r in data["results"])
    assert "rgemma/transformers" in proc.stdout


def test_decode_step_smoke(tmp_path):
    """Both settings of the native step kernels decode, for every system and batch."""
    proc = run_smoke("decode_step", tmp_path)
    rows = json.loads((tmp_path / "decode_step.json").read_text())["results"]
    assert {(r["system"], r["batch"]) for r in rows} == {
        (s, b) for s in ("bf16", "int8", "int4") for b in (1, 2)
    }
    assert all(r["off_tok_s"] > 0 and r["on_tok_s"] > 0 for r in rows)
    assert "| int4 | 2 |" in proc.stdout
    parts = json.loads((tmp_path / "decode_step.json").read_text())["parts"]
    # which products are native at the tiny shape is the autotuner's choice: only the sums
    assert {(p["system"], p["batch"]) for p in parts} == {(r["system"], r["batch"]) for r in rows}
    assert all(0 <= p["products"] + p["kernels"] < p["step"] for p in parts), parts


def test_load_memory_smoke(tmp_path):
    """A checkpoint written, then loaded (quantized to int4) in a fresh process, measured."""
    script = os.path.join(ROOT, "bench", "load_memory.py")
    argv = [sys.executable, script, "--smoke", "--quantize", "4", "--dir", str(tmp_path / "ckpt")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GB of int4)" in proc.stdout and "load time:" in proc.stdout
    assert not (tmp_path / "ckpt").exists()  # removed without --keep


def test_memory_growth_smoke(tmp_path):
    proc = run_smoke("memory_growth", tmp_path)
    data = json.loads((tmp_path / "memory_growth.json").read_text())
    assert (tmp_path / "memory_growth.png").stat().st_size > 0
    results = data["results"]
    for system in ("rgemma", "gemma"):
        rows = results[system]
        assert [r["length"] for r in rows] == [64, 128, 256]
        assert all("error" not in r and r["tok_s"] > 0 and r["mem_mb"] > 0 for r in rows), rows
    cache = [r["state_bytes"] for r in results["gemma"]]
    assert cache[0] < cache[1] < cache[2] and cache[2] >= 3 * cache[0]  # the KV cache grows
    state = [r["state_bytes"] for r in results["rgemma"]]
    assert state[0] > 0 and len(set(state)) == 1  # a fixed-size state
    assert "last/first" in proc.stdout


def test_kernel_builds_smoke(tmp_path):
    """Two builds of the kernels (here the committed source and the tree's) both decode,
    loaded side by side, every system and batch timed under each."""
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    from rgemma import kernels

    if not kernels.available():
        pytest.skip("no C compiler")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "kernel_builds.py"), "--smoke", "--base",
         "HEAD", "--systems", "int8", "int4", "--threads", "1", "--out",
         str(tmp_path / "kernel_builds")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "kernel_builds.json").read_text())["results"]
    assert {(r["system"], r["batch"]) for r in rows} == {(s, b) for s in ("int8", "int4")
                                                         for b in (1, 4)}  # fmt: skip
    assert all(r["base_tok_s"] > 0 and r["tree_tok_s"] > 0 for r in rows)


def test_product_ceiling_smoke(tmp_path):
    """Every system's products of every step shape, streamed and from cache, each rate
    read from timed calls that produced outputs."""
    from rgemma import kernels

    if not kernels.available():
        pytest.skip("no C compiler")
    proc = run_smoke("product_ceiling", tmp_path)
    rows = json.loads((tmp_path / "product_ceiling.json").read_text())["results"]
    assert {r["system"] for r in rows} == {"bf16", "int8", "int4"}
    assert {r["product"] for r in rows} >= {"mlp up", "mlp down", "logits"}
    assert all(r["streamed_gbs"] > 0 and r["in_cache_gbs"] > 0 for r in rows)
    assert "| int4 | 1 | logits" in proc.stdout
