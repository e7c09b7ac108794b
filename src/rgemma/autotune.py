"""Which way of computing a product is fastest on this machine: measured once, then cached.

The machines rgemma runs on differ (AVX2 only; AVX512 with bf16 and VNNI; AMX),
and so does the best kernel for a product of a given shape: an int8 weight
times 16 rows of activations may be fastest through rgemma's weight-only
kernel on one CPU and through a VNNI int8 x int8 product on another. So the
choice is not assumed: each candidate is timed on the real shape, and the
winner is written to a JSON file in the cache folder (``$RGEMMA_CACHE``, else
``~/.cache/rgemma``), named after the CPU, PyTorch's version, rgemma's
kernel source and the timing method. Later runs read it: given the file, the
choice is fixed.

Each timed run starts with cold caches (``evict_caches``): inside a model step
every weight is used once and comes from memory, so a product timed again and
again on a weight that stays in the last-level cache (a [7680, 2560] int8
weight is 20 MB, under a 32 MB L3) measures arithmetic, not streaming, and can
pick a product that is slower in the model.

``RGEMMA_AUTOTUNE=0`` turns measuring off: what is not in the cache gets the
first candidate (the default), and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rgemma import kernels

ROW_BUCKETS = (1, 4, 16, 64, 256)  # products are tuned at these row counts
_REPEATS = 5
_METHOD = b"cold caches"  # part of the cache file's name: choices timed otherwise are not reused
MARGIN = 0.9  # another candidate replaces the default only when at least 10% faster

_choices: dict[str, str] | None = None  # the cache file's contents, once read


def row_bucket(rows: int) -> int:
    """The bucket a product of ``rows`` rows is tuned in: the smallest >= rows (or the last)."""
    for b in ROW_BUCKETS:
        if rows <= b:
            return b
    return ROW_BUCKETS[-1]


def enabled() -> bool:
    return os.environ.get("RGEMMA_AUTOTUNE", "1") != "0"


def cache_file() -> Path:
    """The machine's choices (one file per CPU kind, PyTorch version and kernel source)."""
    blob = (kernels.cpu_signature() + torch.__version__).encode() + kernels.SOURCE.read_bytes()
    blob += _METHOD
    return kernels.cache_dir() / f"autotune-{hashlib.sha256(blob).hexdigest()[:16]}.json"


def _read() -> dict[str, str]:
    global _choices
    if _choices is None:
        try:
            data = json.loads(cache_file().read_text())
            _choices = {k: v for k, v in data.items() if isinstance(v, str)}
        except (OSError, ValueError, AttributeError):
            _choices = {}
    return _choices


def _write(key: str, name: str) -> None:
    """Adds one choice to the cache file (read again first: another process may have
    added its own), replacing the file atomically."""
    global _choices
    path = cache_file()
    _choices = None
    choices = {**_read(), key: name}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(choices, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    _choices = choices


def forget() -> None:
    """Drops the choices read from the cache file (the next lookup reads it again)."""
    global _choices
    _choices = None


def last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache (from sysfs), else 64 MiB."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=64 << 20)


_evict_buffer: torch.Tensor | None = None


def evict_caches() -> None:
    """Reads a buffer twice the size of the last-level cache, so the next product
    finds its weights in memory, not in a cache."""
    global _evict_buffer
    if _evict_buffer is None:
        _evict_buffer = torch.ones(2 * last_level_cache_bytes() // 4)
    _evict_buffer.sum()


def _seconds(run: Callable[[], object]) -> float:
    run()  # warm-up: packing, page faults, threads
    times = []
    for _ in range(_REPEATS):
        evict_caches()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def choose(key: str, candidates: dict[str, Callable[[], object]]) -> str:
    """The name of the fastest candidate for ``key``: the cached choice if there is one
    (and it is still a candidate), else each is timed (median of 5 runs after a warm-up,
    each from cold caches)
    and the winner cached; the first candidate (the default) is kept unless another is at
    least 10% faster. With measuring off, the first candidate."""
    cached = _read().get(key)
    if cached in candidates:
        return cached
    if not enabled() or len(candidates) == 1:
        return next(iter(candidates))
    with torch.no_grad():  # not inference_mode: reused buffers must stay normal tensors
        times = {name: _seconds(run) for name, run in candidates.items()}
    default = next(iter(times))
    best = min(times, key=times.get)
    if times[best] > MARGIN * times[default]:  # not clearly faster: noise on a busy machine
        best = default
    _write(key, best)
    return best
