"""The benchmark scripts still run (tiny shape, a few tokens): they must not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_smoke(tmp_path):
    out = tmp_path / "compare"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compare.py"), "--smoke",
                           "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "compare.json").read_text())
    systems = {r["system"] for r in data["results"]}
    assert {"rgemma", "rgemma-int8", "rgemma-int4", "transformers", "official"} <= systems
    assert all(r["median"] > 0 for r in data["results"])
    assert "rgemma/transformers" in proc.stdout
