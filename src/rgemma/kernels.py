"""rgemma's own CPU kernels: the products of a decode step with narrow weights.

    int8_matmul(x [M, K] float32, q [N, K] int8, scale [N] float32) -> [M, N] float32
        = (x @ q.T) * scale            (reference: ``int8_matmul_reference``)
    bf16_matmul(x [M, K] float32, w [N, K] bfloat16) -> [M, N] float32
        = x @ w.float().T              (reference: ``bf16_matmul_reference``)

A decode step reads every weight once and does little arithmetic on it, so its
speed is the speed at which the weights stream in from memory. PyTorch's
packed kernel (``_weight_int8pack_mm``) rounds the activations to bfloat16 and
streams int8 weights at ~22-28 GB/s on the 2-core machine this was tuned on;
``kernels.c`` keeps the activations in float32 and streams faster by
prefetching the next block of weight rows while it multiplies this one. The
bf16 product is the same loop over 2-byte weights: it reads what oneDNN's
bf16 product reads, faster at a few rows, and keeps x in float32 where
oneDNN rounds it to bf16 (and it does not depend on native bf16, which
AVX2-only CPUs lack).

The C source ships with the package and is compiled on first use with the
machine's C compiler (``$CC``, else ``cc``; -O3 -march=native -fopenmp), into
a cache folder (``$RGEMMA_CACHE``, else ``~/.cache/rgemma``), under a name
that hashes the source, the flags and the CPU, so it is built once per
machine. It shares PyTorch's OpenMP runtime (the same ``libgomp.so.1``) and
its thread count. Without a compiler (or with ``RGEMMA_NATIVE=0``) the
quantized layers fall back to PyTorch's kernel, with one warning.

Under ``torch.compile`` the kernel is the custom op ``rgemma::int8_matmul``, an
opaque call inside the compiled graph; in eager mode it is called directly
(ctypes releases the GIL for the call).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"])
_SMALL_WORK = 1 << 18  # fewer multiply-adds than this: one thread (no fork/join)


def int8_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The definition: (x @ q.T) * scale in float32."""
    return (x.float() @ q.float().T) * scale.float()


def bf16_matmul_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The definition: x @ w.T in float32."""
    return x.float() @ w.float().T


def cache_dir() -> Path:
    return Path(os.environ.get("RGEMMA_CACHE") or Path.home() / ".cache" / "rgemma")


def cpu_signature() -> str:
    """What -march=native depends on: the CPU model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            keys = ("model name", "flags", "Features", "CPU part")
            lines = [line for line in f if line.startswith(keys)]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc")


def build() -> Path:
    """Compiles kernels.c into the cache (atomically) and returns the library's path.

    Raises RuntimeError, saying what failed, when no compiler works.
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc)")
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            source + " ".join([cc, *flags]).encode() + cpu_signature().encode()
        ).hexdigest()[:16]
        target = cache_dir() / f"kernels-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cc, *flags, "-fPIC", "-shared", "-std=gnu11", str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, target)  # complete or absent, never half-written
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {proc.stderr.strip().splitlines()[-1:]}")
    raise RuntimeError("cannot compile rgemma's kernels: " + "; ".join(errors))


_lib: ctypes.CDLL | None = None
_loaded = False  # tried to load (a plain flag: torch.compile reads it)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("RGEMMA_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        warnings.warn(
            f"rgemma: {e}; int8 decode falls back to PyTorch's kernel (slower). "
            "Set RGEMMA_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.rgemma_int8_matmul.argtypes = [p, i64, i64, p, i64, p, p, ctypes.c_int]
    lib.rgemma_int8_matmul.restype = None
    lib.rgemma_bf16_matmul.argtypes = [p, i64, i64, p, i64, p, ctypes.c_int]
    lib.rgemma_bf16_matmul.restype = None
    return lib


def available() -> bool:
    """True where the native kernel is built (or can be) and loads. The first
    call builds it; under torch.compile (which cannot trace a build) only an
    earlier call counts, so the int8 models' constructors (``quantize_model``,
    ``load_quantized``) call this first."""
    global _lib, _loaded
    if not _loaded and not torch.compiler.is_compiling():
        _lib, _loaded = _load(), True
    return _lib is not None


def _threads(M: int, N: int, K: int) -> int:
    return 1 if M * N * K < _SMALL_WORK else torch.get_num_threads()


def _int8_matmul_native(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N = q.shape[0]
    x, q, scale = (
        x.float().contiguous(),
        q.contiguous(),
        scale.float().contiguous(),
    )  # the C contract
    y = torch.empty(M, N, dtype=torch.float32)
    _lib.rgemma_int8_matmul(
        x.data_ptr(), M, K, q.data_ptr(), N, scale.data_ptr(), y.data_ptr(), _threads(M, N, K)
    )
    return y


def _bf16_matmul_native(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    x, w = x.float().contiguous(), w.contiguous()  # the C contract
    y = torch.empty(M, N, dtype=torch.float32)
    _lib.rgemma_bf16_matmul(x.data_ptr(), M, K, w.data_ptr(), N, y.data_ptr(), _threads(M, N, K))
    return y


@torch.library.custom_op("rgemma::int8_matmul", mutates_args=())
def _int8_matmul_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _int8_matmul_native(x, q, scale)


@_int8_matmul_op.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x @ q.T) * scale: x [M, K], q [N, K] int8, scale [N] (CPU) -> [M, N] float32,
    computed in float32. Needs ``available()``."""
    if torch.compiler.is_compiling():
        return _int8_matmul_op(x, q, scale)
    return _int8_matmul_native(x, q, scale)


@torch.library.custom_op("rgemma::bf16_matmul", mutates_args=())
def _bf16_matmul_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _bf16_matmul_native(x, w)


@_bf16_matmul_op.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)


def bf16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T: x [M, K], w [N, K] bfloat16 (CPU) -> [M, N] float32, computed in float32
    (w widened exactly). Needs ``available()``."""
    if torch.compiler.is_compiling():
        return _bf16_matmul_op(x, w)
    return _bf16_matmul_native(x, w)
