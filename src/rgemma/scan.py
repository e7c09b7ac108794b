"""The linear recurrence of the RG-LRU: h_t = a_t * h_{t-1} + x_t.

Three implementations of the same math, in float32 (or float64):

* ``linear_scan_reference``: the plain loop over time, the definition.
* ``linear_scan_chunked``: a two-level scan. Time is cut into N chunks of C
  steps; (1) every chunk is scanned from h = 0, all chunks at once (a loop of
  C steps over [B, N, L] slices), keeping the running product of a inside
  the chunk; (2) a loop of N steps carries the state across chunk
  boundaries; (3) the carried-in state is added back in one pass:
  h_t = local_t + (prod a)_t * carry. About 2 sqrt(T) Python steps instead of
  T, each a single fused ``addcmul`` written in place, and the same result up
  to float32 re-association.
  Its backward is the same scan run backwards in time:
      G_t = dL/dh_t = dy_t + a_{t+1} G_{t+1},
      dx_t = G_t,  da_t = G_t h_{t-1},  dh0 = a_0 G_0.

* ``linear_scan_triton`` (CUDA, where Triton is installed): the same scan as one
  kernel launch (``scan_triton.py``), instead of the chunked scan's ~2 sqrt(T)
  launches per layer, which leave a GPU idle while Python issues them.

``linear_scan`` picks one: a single step for T == 1, the Triton kernel on CUDA
where Triton is installed, the chunked scan otherwise.
"""

from __future__ import annotations

import functools
import math

import torch


def linear_scan_reference(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = a_t * h_{t-1} + x_t, one step at a time.

    Args:
      a: [B, T, L] float32 decay per step.
      x: [B, T, L] float32 input per step.
      h0: [B, L] float32 state before the first step (None = zeros).
    Returns:
      y: [B, T, L] float32, every h_t; h_last: [B, L] float32.
    """
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0
    ys = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t]
        ys.append(h)
    return torch.stack(ys, dim=1), h


def _chunked_forward(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-level scan, without autograd. Shapes as in linear_scan_reference."""
    B, T, L = x.shape
    C = chunk or max(8, int(math.sqrt(T)))
    N = -(-T // C)
    if N * C != T:  # identity steps at the end: a = 1, x = 0 leave h unchanged
        a = torch.cat([a, a.new_ones(B, N * C - T, L)], dim=1)
        x = torch.cat([x, x.new_zeros(B, N * C - T, L)], dim=1)
    a4, x4 = a.reshape(B, N, C, L), x.reshape(B, N, C, L)
    h = torch.empty_like(x4)  # (1) local scans, then (3) the true h
    a_prod = torch.empty_like(a4)  # running product of a inside each chunk
    h[:, :, 0], a_prod[:, :, 0] = x4[:, :, 0], a4[:, :, 0]
    for c in range(1, C):
        torch.addcmul(x4[:, :, c], a4[:, :, c], h[:, :, c - 1], out=h[:, :, c])
        torch.mul(a4[:, :, c], a_prod[:, :, c - 1], out=a_prod[:, :, c])
    carry_in = torch.empty(B, N, 1, L, dtype=x.dtype, device=x.device)
    carry = h0
    for n in range(N):  # (2) carry across chunk boundaries
        carry_in[:, n, 0] = carry
        carry = torch.addcmul(h[:, n, -1], a_prod[:, n, -1], carry)
    h.addcmul_(a_prod, carry_in)  # (3)
    return h.reshape(B, N * C, L)[:, :T], carry


class _Scan(torch.autograd.Function):
    """Any exact forward ``run(a, x, h0) -> (y, h_last)`` with the backward above,
    which is ``run`` again on time-reversed inputs."""

    @staticmethod
    def forward(ctx, a, x, h0, run):
        y, h_last = run(a, x, h0)
        # h0 is usually the live state, which the caller overwrites in place next.
        ctx.save_for_backward(a, y, h0.clone())
        ctx.run = run
        return y, h_last

    @staticmethod
    def backward(ctx, dy, dh_last):
        a, y, h0 = ctx.saved_tensors
        dy = torch.zeros_like(y) if dy is None else dy.clone()
        if dh_last is not None:
            dy[:, -1] += dh_last
        # G_t = dy_t + a_{t+1} G_{t+1}: a forward scan over reversed time.
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        g, _ = ctx.run(a_next.flip(1), dy.flip(1), torch.zeros_like(h0))
        g = g.flip(1)
        h_prev = torch.cat([h0[:, None], y[:, :-1]], dim=1)
        return g * h_prev, g, a[:, 0] * g[:, 0], None


def linear_scan_chunked(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``linear_scan_reference``, in about 2 sqrt(T) Python steps."""
    if h0 is None:
        h0 = torch.zeros_like(x[:, 0])
    return _Scan.apply(a, x, h0, functools.partial(_chunked_forward, chunk=chunk))


def linear_scan_triton(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``linear_scan_reference``, in one Triton kernel launch (the
    backward in another); a, x and h0 on a CUDA device, or on the CPU under Triton's
    interpreter (``TRITON_INTERPRET=1``)."""
    from rgemma import scan_triton

    if h0 is None:
        h0 = torch.zeros_like(x[:, 0])
    return _Scan.apply(a, x, h0, scan_triton.scan_forward)


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it comes with PyTorch's CUDA builds)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def linear_scan(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fastest exact scan for this shape (see the module docstring)."""
    if x.shape[1] == 1:
        h = x[:, 0] if h0 is None else a[:, 0] * h0 + x[:, 0]
        return h[:, None], h
    if x.is_cuda and triton_available():
        return linear_scan_triton(a, x, h0)
    return linear_scan_chunked(a, x, h0)
