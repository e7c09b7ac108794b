"""The linear recurrence of the RG-LRU: h_t = a_t * h_{t-1} + x_t.

Two implementations of the same math, both in float32:

* ``linear_scan_reference``: the plain loop over time, the definition.
* ``linear_scan_chunked``: a two-level scan. Time is cut into N chunks of C
  steps; (1) every chunk is scanned from h = 0 in parallel (a loop of C steps
  over [N, B, L] tensors), accumulating the chunk's running product of a;
  (2) a loop of N steps carries the state across chunk boundaries;
  (3) the carried-in state is added back: h_t = local_t + (prod a) * carry.
  That is C + N Python steps instead of T, with the same result up to float32
  re-association. It is differentiable by autograd.

``linear_scan`` picks one: a single step for T == 1, the loop for short
sequences, the chunked scan otherwise.
"""

from __future__ import annotations

import math

import torch

_CHUNKED_MIN_T = 48


def linear_scan_reference(a: torch.Tensor, x: torch.Tensor,
                          h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
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


def linear_scan_chunked(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None,
                        chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``linear_scan_reference``, in C + N Python steps (T = N * C)."""
    B, T, L = x.shape
    if chunk is None:
        chunk = max(8, int(math.sqrt(T)))
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    if pad:  # identity steps: a = 1, x = 0 leave h unchanged
        a = torch.cat([a, a.new_ones(B, pad, L)], dim=1)
        x = torch.cat([x, x.new_zeros(B, pad, L)], dim=1)
    # [B, N*C, L] -> [C, N, B, L]: step c of every chunk is one contiguous slab.
    a_c = a.reshape(B, n_chunks, chunk, L).permute(2, 1, 0, 3)
    x_c = x.reshape(B, n_chunks, chunk, L).permute(2, 1, 0, 3)

    # (1) scan every chunk from zero; running product of a inside the chunk.
    h_local, a_prod = [x_c[0]], [a_c[0]]
    for c in range(1, chunk):
        h_local.append(a_c[c] * h_local[-1] + x_c[c])
        a_prod.append(a_c[c] * a_prod[-1])
    h_local = torch.stack(h_local)          # [C, N, B, L]
    a_prod = torch.stack(a_prod)            # [C, N, B, L]

    # (2) carry the true state across chunk boundaries.
    carry = torch.zeros_like(x[:, 0]) if h0 is None else h0
    carries = []
    for n in range(n_chunks):
        carries.append(carry)
        carry = h_local[-1, n] + a_prod[-1, n] * carry
    carry_in = torch.stack(carries)         # [N, B, L]

    # (3) add the carried-in state to every step.
    h = h_local + a_prod * carry_in[None]
    y = h.permute(2, 1, 0, 3).reshape(B, n_chunks * chunk, L)[:, :T]
    return y, carry


def linear_scan(a: torch.Tensor, x: torch.Tensor,
                h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatches to the fastest exact scan for this shape (see module docstring)."""
    T = x.shape[1]
    if T == 1:
        h = x[:, 0] if h0 is None else a[:, 0] * h0 + x[:, 0]
        return h[:, None], h
    if T < _CHUNKED_MIN_T:
        return linear_scan_reference(a, x, h0)
    return linear_scan_chunked(a, x, h0)
