"""rgemma's own CPU kernels: the work of a decode step with narrow weights.

    int8_matmul(x [M, K] float32, q [N, K] int8, scale [N] float32) -> [M, N] float32
        = (x @ q.T) * scale            (reference: ``int8_matmul_reference``)
    bf16_matmul(x [M, K] float32, w [N, K] bfloat16) -> [M, N] float32
        = x @ w.float().T              (reference: ``bf16_matmul_reference``)
    int4_matmul(x [M, K] float32, packed [N, K/2] uint8, scale, minimum [N, K/G])
        = x @ W.T, W = q * scale + minimum per group of G columns, with x rounded
          to int8 per row and group (W4A8; reference: ``int4_matmul_reference``)
    recurrent_step(...): a recurrent block's decode step between its products
        (conv, RG-LRU, gelu gate) in one call (reference: the layers' own steps)
    rms_norm(x [M, D] float32, w [D], eps) -> [M, D] float32, for a few rows
        (reference: ``layers.RMSNorm``)
    attention_step(...): local attention's decode step after its projections:
        RoPE, the ring's logits, softmax, values, the ring write (reference:
        ``LocalAttentionBlock.step``'s own code)
    quantize_rows_int8(x), dequantize_rows(acc, sx, scale): the passes before and
        after PyTorch's int8 product in a W8A8 product of many rows, each one
        pass (reference: ``quantize.quantize_rows_int8``, ``quantize.w8a8_linear``)
    dequantize_int4_bf16(packed, scale, minimum, out): int4 weights in bf16 for a
        product of many rows, one pass (reference: ``quantize.dequantize_int4``)

A decode step reads every weight once and does little arithmetic on it, so its
speed is the speed at which the weights stream in from memory. PyTorch's
packed kernel (``_weight_int8pack_mm``) rounds the activations to bfloat16 and
streams int8 weights at ~22-28 GB/s on the 2-core machine this was tuned on;
``kernels.c`` keeps the activations in float32 and streams faster by
prefetching the next block of weight rows while it multiplies this one. The
bf16 product is the same loop over 2-byte weights: it reads what oneDNN's
bf16 product reads, faster at a few rows, and keeps x in float32 where
oneDNN rounds it to bf16 (and it does not depend on native bf16, which
AVX2-only CPUs lack). The int4 product multiplies the nibbles as bytes with
int8 activations (byte dot products: VNNI, or AVX2's vpmaddubsw), since
widening every nibble to a float costs more than reading it. Between the
products, a recurrent layer's step is ~25 small PyTorch ops, each a dispatch
and a pass over memory; ``recurrent_step`` is one call.

The C source ships with the package and is compiled on first use with the
machine's C compiler (``$CC``, else ``cc``; -O3 -march=native -fopenmp), into
a cache folder (``$RGEMMA_CACHE``, else ``~/.cache/rgemma``), under a name
that hashes the source, the flags and the CPU, so it is built once per
machine. It shares PyTorch's OpenMP runtime (the same ``libgomp.so.1``) and
its thread count. Without a compiler (or with ``RGEMMA_NATIVE=0``) the
quantized layers fall back to PyTorch's kernel, with one warning.

Under ``torch.compile`` the products are custom ops (``rgemma::int8_matmul``,
``rgemma::bf16_matmul``, ``rgemma::int4_matmul``), opaque calls inside the
compiled graph, and so is the attention step (``rgemma::attention_step``, which
writes the rings in place); in eager mode they are called directly (ctypes
releases the GIL for the call). The recurrent step and RMSNorm are eager only: a
compiled step fuses the same elementwise work itself.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
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


def quantize_groups_int8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (xq int8 [M, K], sx float32 [M, K/group]): per row and group,
    sx = max |x| / 127 (1 where all are 0), xq = round(x / sx) (half to even)."""
    M, K = x.shape
    xg = x.float().reshape(M, K // group, group)
    amax = xg.abs().amax(dim=-1)
    sx = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    xq = torch.round(xg / sx[..., None]).clamp(-127, 127).to(torch.int8)
    return xq.reshape(M, K), sx


def int4_matmul_reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
) -> torch.Tensor:
    """The definition of ``int4_matmul``, in float64: x [M, K] against W = q * scale +
    minimum (q uint8 [N, K] in 0..15, unpacked; scale, minimum [N, K/G]), x quantized
    per group as ``quantize_groups_int8``, the minimum's term from x itself."""
    M, K = x.shape
    N, ng = scale.shape
    G = K // ng
    xq, sx = quantize_groups_int8(x, G)
    dots = torch.einsum("mgk,ngk->mng", xq.double().reshape(M, ng, G),
                        q.double().reshape(N, ng, G))  # fmt: skip
    sums = x.double().reshape(M, ng, G).sum(-1)  # [M, ng]
    return (dots * scale.double()[None] * sx.double()[:, None]).sum(-1) + sums @ minimum.double().T


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


def build(source_path: Path | None = None) -> Path:
    """Compiles kernels.c (or ``source_path``, another version of it) into the cache
    (atomically) and returns the library's path.

    Raises RuntimeError, saying what failed, when no compiler works.
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc)")
    source_path = source_path or SOURCE
    source = source_path.read_bytes()
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
        cmd = [cc, *flags, "-fPIC", "-shared", "-std=gnu11", str(source_path), "-o", tmp]
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
        return load_library(build())
    except (RuntimeError, OSError) as e:
        warnings.warn(
            f"rgemma: {e}; int8 decode falls back to PyTorch's kernel (slower). "
            "Set RGEMMA_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


def load_library(path: Path) -> ctypes.CDLL:
    """The compiled kernels at ``path``, with the argument types of each function."""
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.rgemma_int8_matmul.argtypes = [p, i64, i64, p, i64, p, p, ctypes.c_int]
    lib.rgemma_int8_matmul.restype = None
    lib.rgemma_bf16_matmul.argtypes = [p, i64, i64, p, i64, p, ctypes.c_int]
    lib.rgemma_bf16_matmul.restype = None
    lib.rgemma_int4_matmul.argtypes = [p, i64, i64, p, i64, p, p, i64, p, ctypes.c_int]
    lib.rgemma_int4_matmul.restype = None
    lib.rgemma_recurrent_step.argtypes = [i64, i64, i64, ctypes.c_int, p, p, p, p, p, p, p, p,
                                          p, ctypes.c_int, p, ctypes.c_int, p, p, p, p,
                                          ctypes.c_int]  # fmt: skip
    lib.rgemma_recurrent_step.restype = None
    lib.rgemma_rms_norm.argtypes = [p, i64, i64, p, ctypes.c_int, ctypes.c_float, p]
    lib.rgemma_rms_norm.restype = None
    lib.rgemma_attention_step.argtypes = [i64, i64, i64, i64, i64, p, p, p, p,
                                          ctypes.c_float, p, p, ctypes.c_int, p, p, p, p, p,
                                          ctypes.c_int]  # fmt: skip
    lib.rgemma_attention_step.restype = None
    lib.rgemma_quantize_rows_int8.argtypes = [p, i64, i64, p, p, ctypes.c_int]
    lib.rgemma_quantize_rows_int8.restype = None
    lib.rgemma_dequantize_rows.argtypes = [p, i64, i64, p, p, p, ctypes.c_int]
    lib.rgemma_dequantize_rows.restype = None
    lib.rgemma_dequantize_int4_bf16.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int]
    lib.rgemma_dequantize_int4_bf16.restype = None
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


def _int8_matmul_call(x, q, scale, y) -> Callable[[], None]:
    """The native call writing (x @ q.T) * scale into y, on tensors as the C code takes
    them (x, scale, y float32, q int8, all contiguous)."""
    M, K = x.shape
    N = q.shape[0]
    return functools.partial(
        _lib.rgemma_int8_matmul,
        x.data_ptr(), M, K, q.data_ptr(), N, scale.data_ptr(), y.data_ptr(), _threads(M, N, K),
    )  # fmt: skip


def _int8_matmul_native(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x, q, scale = x.float().contiguous(), q.contiguous(), scale.float().contiguous()
    y = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32)
    _int8_matmul_call(x, q, scale, y)()
    return y


def _bf16_matmul_call(x, w, y) -> Callable[[], None]:
    """The native call writing x @ w.T into y (x, y float32, w bf16, all contiguous)."""
    M, K = x.shape
    N = w.shape[0]
    return functools.partial(
        _lib.rgemma_bf16_matmul, x.data_ptr(), M, K, w.data_ptr(), N, y.data_ptr(),
        _threads(M, N, K),
    )  # fmt: skip


def _bf16_matmul_native(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x, w = x.float().contiguous(), w.contiguous()  # the C contract
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    _bf16_matmul_call(x, w, y)()
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


def _int4_matmul_call(x, packed, scale, minimum, y) -> Callable[[], None]:
    """The native call writing ``int4_matmul(x, packed, scale, minimum)`` into y (x, scale,
    minimum, y float32, packed uint8, all contiguous)."""
    M, K = x.shape
    N, ng = scale.shape
    return functools.partial(
        _lib.rgemma_int4_matmul,
        x.data_ptr(), M, K, packed.data_ptr(), N, scale.data_ptr(), minimum.data_ptr(), K // ng,
        y.data_ptr(), _threads(M, N, K // 4),
    )  # fmt: skip


def _int4_matmul_native(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
) -> torch.Tensor:
    x, packed = x.float().contiguous(), packed.contiguous()  # the C contract
    scale, minimum = scale.float().contiguous(), minimum.float().contiguous()
    y = torch.empty(x.shape[0], scale.shape[0], dtype=torch.float32)
    _int4_matmul_call(x, packed, scale, minimum, y)()
    return y


@torch.library.custom_op("rgemma::int4_matmul", mutates_args=())
def _int4_matmul_op(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
) -> torch.Tensor:
    return _int4_matmul_native(x, packed, scale, minimum)


@_int4_matmul_op.register_fake
def _(x, packed, scale, minimum):
    return x.new_empty(x.shape[0], scale.shape[0], dtype=torch.float32)


def int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
) -> torch.Tensor:
    """x @ W.T with W int4 groups: x [M, K], packed uint8 [N, K/2] (two columns a byte,
    ``quantize.pack_nibbles``), scale, minimum [N, K/G] (CPU) -> [M, N] float32, with x
    quantized per group to int8 (``int4_matmul_reference``). Needs ``available()``."""
    if torch.compiler.is_compiling():
        return _int4_matmul_op(x, packed, scale, minimum)
    return _int4_matmul_native(x, packed, scale, minimum)


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


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 (CPU) -> (xq int8 [M, K], sx float32 [M]): what
    ``quantize.quantize_rows_int8`` returns (equal), in one pass. Needs ``available()``."""
    M, K = x.shape
    x = x.float().contiguous()
    xq = torch.empty(M, K, dtype=torch.int8)
    sx = torch.empty(M, dtype=torch.float32)
    _lib.rgemma_quantize_rows_int8(x.data_ptr(), M, K, xq.data_ptr(), sx.data_ptr(),
                                   _threads(M, K, 8))  # fmt: skip
    return xq, sx


def dequantize_rows(acc: torch.Tensor, sx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """acc [M, N] int32, sx [M], scale [N] float32 (CPU) -> (acc * sx[:, None]) * scale
    [M, N] float32, in one pass (equal to those float32 operations). Needs ``available()``."""
    M, N = acc.shape
    acc, sx, scale = acc.contiguous(), sx.float().contiguous(), scale.float().contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    _lib.rgemma_dequantize_rows(acc.data_ptr(), M, N, sx.data_ptr(), scale.data_ptr(),
                                y.data_ptr(), _threads(M, N, 8))  # fmt: skip
    return y


def dequantize_int4_bf16(
    packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """int4 groups -> W [N, K] in bfloat16, written into ``out``, in one pass: equal to
    ``quantize.dequantize_int4(unpack_nibbles(packed), scale, minimum, torch.bfloat16)``.
    packed uint8 [N, K/2], scale, minimum [N, K/G] (CPU). Needs ``available()``."""
    N, ng = scale.shape
    K = packed.shape[1] * 2
    packed = packed.contiguous()
    scale, minimum = scale.float().contiguous(), minimum.float().contiguous()
    _lib.rgemma_dequantize_int4_bf16(packed.data_ptr(), N, K, scale.data_ptr(),
                                     minimum.data_ptr(), K // ng, out.data_ptr(),
                                     _threads(N, K, 4))  # fmt: skip
    return out


_KIND = {torch.bfloat16: 1, torch.float32: 2}  # kernels.c's enum kind


def step_kernels_take(x: torch.Tensor, *, compiled: bool = False) -> bool:
    """Whether the kernels that work on activations (recurrent_step, attention_step,
    rms_norm, the W8A8 passes) may run on x: float32 on the CPU, without autograd
    (they are opaque to backward), the kernels available; eager only unless
    ``compiled`` (a kernel that is also a custom op inside a compiled step)."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and (compiled or not torch.compiler.is_compiling())
        and available()
    )


def recurrent_step_supports(x: torch.Tensor, params: list[torch.Tensor], tail, h) -> bool:
    """Whether ``recurrent_step`` takes these: ``step_kernels_take(x)``, float32 h,
    parameters all float32 or all bf16, a float32 or bf16 tail, state tensors
    contiguous (they are updated in place)."""
    dtype = params[0].dtype
    return (
        step_kernels_take(x)
        and dtype in _KIND
        and all(p.dtype == dtype for p in params)
        and tail.dtype in _KIND
        and h.dtype == torch.float32
        and tail.is_contiguous()
        and h.is_contiguous()
    )


def recurrent_step(
    ux: torch.Tensor,
    uy: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    input_gate: tuple[torch.Tensor, torch.Tensor],
    recurrent_gate: tuple[torch.Tensor, torch.Tensor],
    recurrent_param: torch.Tensor,
    tail: torch.Tensor,
    h: torch.Tensor,
    reset: torch.Tensor,
    real: torch.Tensor,
) -> torch.Tensor:
    """A recurrent block's decode step between its products (kernels.c states the math):
    ux = linear_x(x), uy = linear_y(x) [B, L] float32 -> z [B, L] float32, the input of
    linear_out; updates ``tail`` [B, K-1, L] and ``h`` [B, L] in place.

    conv_weight [L, 1, K], conv_bias [L], gates (weight [H, bw, bw], bias [H, bw]),
    recurrent_param [L]; reset, real [B] bool. Reference: ``Conv1D.step``,
    ``RGLRU.step`` and the gelu gate of ``RecurrentBlock.step``. Needs
    ``recurrent_step_supports``.
    """
    ux, uy = ux.float().contiguous(), uy.float().contiguous()
    params = [
        t.contiguous()
        for t in (conv_weight, conv_bias, *input_gate, *recurrent_gate, recurrent_param)
    ]
    reset, real = reset.to(torch.bool).contiguous(), real.to(torch.bool).contiguous()
    z = torch.empty(ux.shape, dtype=torch.float32)
    _recurrent_step_call(ux, uy, params, tail, h, reset, real, z)()
    return z


def _recurrent_step_call(ux, uy, params, tail, h, reset, real, z) -> Callable[[], None]:
    """The native call of ``recurrent_step`` writing z, on tensors as the C code takes them
    (params: conv weight and bias, input gate weight and bias, recurrent gate weight and
    bias, recurrent_param; all contiguous)."""
    B, L = ux.shape
    cw, cb, wx, bx, wa, ba, rp = params
    H, K = wx.shape[0], cw.shape[-1]
    return functools.partial(
        _lib.rgemma_recurrent_step,
        B, L, H, K, ux.data_ptr(), uy.data_ptr(),
        cw.data_ptr(), cb.data_ptr(), wx.data_ptr(), bx.data_ptr(), wa.data_ptr(), ba.data_ptr(),
        rp.data_ptr(), _KIND[cw.dtype], tail.data_ptr(), _KIND[tail.dtype], h.data_ptr(),
        reset.data_ptr(), real.data_ptr(), z.data_ptr(), _threads(B, L, 2 * L // H),
    )  # fmt: skip


def rms_norm_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``rms_norm`` takes these: ``step_kernels_take(x)``, a float32 or bf16 weight."""
    return step_kernels_take(x) and weight.dtype in _KIND


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] float32 (CPU) -> x * rsqrt(mean(x^2) + eps) * (1 + weight), weight [D]
    float32 or bf16; one thread, for the few rows of a decode step. Needs ``available()``."""
    flat, w = x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous()
    y = torch.empty_like(flat)
    _rms_norm_call(flat, w, eps, y)()
    return y.view(x.shape)


def _rms_norm_call(x, weight, eps: float, y) -> Callable[[], None]:
    """The native call of ``rms_norm`` writing y (x, y [M, D] float32, contiguous)."""
    M, D = x.shape
    return functools.partial(
        _lib.rgemma_rms_norm, x.data_ptr(), M, D, weight.data_ptr(), _KIND[weight.dtype], eps,
        y.data_ptr(),
    )  # fmt: skip


def attention_step_supports(q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor) -> bool:
    """Whether ``attention_step`` takes these: ``step_kernels_take(q)``, eager or
    compiled, a float32 or bf16 ring, contiguous (it is written in place)."""
    return (
        step_kernels_take(q, compiled=True)
        and ring_k.dtype in _KIND
        and ring_v.dtype == ring_k.dtype
        and ring_k.is_contiguous()
        and ring_v.is_contiguous()
    )


def _attention_step_native(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    rope_base: float,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    ring_index: torch.Tensor,
    stream: torch.Tensor,
    doc: torch.Tensor,
    real: torch.Tensor,
    window: int,
) -> torch.Tensor:
    B, H, Dh = q.shape
    R = ring_index.shape[1]
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    ints = [t.to(torch.int64).contiguous() for t in (positions, ring_index, stream, doc)]
    positions, ring_index, stream, doc = ints
    real = real.to(torch.bool).contiguous()
    out = torch.empty(B, H, Dh, dtype=torch.float32)
    _lib.rgemma_attention_step(
        B, H, Dh, window, R, q.data_ptr(), k.data_ptr(), v.data_ptr(), positions.data_ptr(),
        rope_base, ring_k.data_ptr(), ring_v.data_ptr(), _KIND[ring_k.dtype],
        ring_index.data_ptr(), stream.data_ptr(), doc.data_ptr(), real.data_ptr(),
        out.data_ptr(), _threads(B * H, R + 1, 2 * Dh),
    )  # fmt: skip
    return out


# Inside a compiled step the ring write must stay in place. Written with PyTorch's
# ops (``state.k[rows, slot] = ...``) it is functionalized into a new ring plus a
# copy back, and the compiler may move the write before the ring's last read, so
# every step copies every ring ([B, W, Dh], twice); as one op that mutates its
# ring arguments, it is a call on the rings themselves.
_attention_step_op = torch.library.custom_op(
    "rgemma::attention_step", _attention_step_native, mutates_args=("ring_k", "ring_v")
)


@_attention_step_op.register_fake
def _(q, k, v, positions, rope_base, ring_k, ring_v, ring_index, stream, doc, real, window):
    return q.new_empty(q.shape, dtype=torch.float32)


def attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    rope_base: float,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    ring_index: torch.Tensor,
    stream: torch.Tensor,
    doc: torch.Tensor,
    real: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """Local attention's decode step after the projections (kernels.c states the math):
    q [B, H, Dh], k, v [B, Dh] float32 before RoPE; positions, stream (each row's stream
    index), doc (its document's start) [B] int64; real [B] bool; ring_k, ring_v
    [B, W, Dh], of which the first R = ring_index.shape[1] slots are read; ring_index
    [B, R]. -> [B, H, Dh] float32; writes (k, v) into slot stream % W of real rows."""
    args = (q, k, v, positions, rope_base, ring_k, ring_v, ring_index, stream, doc, real, window)
    if torch.compiler.is_compiling():
        return _attention_step_op(*args)
    return _attention_step_native(*args)


# ----------------------------------------------------------------------------
# Bound calls: a kernel on fixed tensors, for a step that is run again and again
# on the same buffers (``step_plan``). Each returns a call without arguments; the
# tensors are taken by address now, so each must be of the dtype the kernel takes
# (float32 activations) and outlive the call (the caller keeps them); None where
# one is not a contiguous CPU tensor. The math is that of the function of the
# same name without "_into".


def _bindable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def int8_matmul_into(x, q, scale, y) -> Callable[[], None] | None:
    """y [M, N] = int8_matmul(x [M, K], q, scale)."""
    return None if not _bindable(x, q, scale, y) else _int8_matmul_call(x, q, scale, y)


def bf16_matmul_into(x, w, y) -> Callable[[], None] | None:
    """y [M, N] = bf16_matmul(x [M, K], w)."""
    return None if not _bindable(x, w, y) else _bf16_matmul_call(x, w, y)


def int4_matmul_into(x, packed, scale, minimum, y) -> Callable[[], None] | None:
    """y [M, N] = int4_matmul(x [M, K], packed, scale, minimum)."""
    if not _bindable(x, packed, scale, minimum, y):
        return None
    return _int4_matmul_call(x, packed, scale, minimum, y)


def rms_norm_into(x, weight, eps: float, y) -> Callable[[], None] | None:
    """y [M, D] = rms_norm(x [M, D], weight, eps)."""
    return None if not _bindable(x, weight, y) else _rms_norm_call(x, weight, eps, y)


def recurrent_step_into(
    ux, uy, conv_weight, conv_bias, input_gate, recurrent_gate, recurrent_param, tail, h,
    reset, real, z,
) -> Callable[[], None] | None:  # fmt: skip
    """z [B, L] = recurrent_step(ux, uy, ...), updating tail and h; reset, real [B] bool
    (read at each call: the caller writes a step's flags into them first)."""
    params = [conv_weight, conv_bias, *input_gate, *recurrent_gate, recurrent_param]
    if not _bindable(ux, uy, *params, tail, h, reset, real, z):
        return None
    return _recurrent_step_call(ux, uy, params, tail, h, reset, real, z)
