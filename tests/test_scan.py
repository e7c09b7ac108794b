"""The chunked scan equals the reference loop, values and gradients."""

from __future__ import annotations

import pytest
import torch

from rgemma.scan import linear_scan, linear_scan_chunked, linear_scan_reference


def _inputs(B, T, L, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, L, generator=g, dtype=dtype) ** 0.1  # decays near 1, like the RG-LRU
    a[:, T // 3] = 0  # a reset in the middle
    x = torch.randn(B, T, L, generator=g, dtype=dtype)
    h0 = torch.randn(B, L, generator=g, dtype=dtype)
    return a, x, h0


@pytest.mark.parametrize("T,chunk", [(1, None), (7, 4), (64, 8), (1000, None), (1037, 32)])
def test_chunked_equals_reference(T, chunk):
    a, x, h0 = _inputs(2, T, 16)
    y_ref, h_ref = linear_scan_reference(a, x, h0)
    y, h = linear_scan_chunked(a, x, h0, chunk=chunk)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(h, h_ref, atol=1e-5, rtol=1e-5)
    y2, _ = linear_scan(a, x, h0)
    assert torch.allclose(y2, y_ref, atol=1e-5, rtol=1e-5)


def test_chunked_gradients_equal_reference():
    a, x, h0 = _inputs(2, 100, 8, dtype=torch.float64)
    grads = []
    for fn in (linear_scan_reference, lambda *t: linear_scan_chunked(*t, chunk=16)):
        leaves = [t.clone().requires_grad_() for t in (a, x, h0)]
        y, h = fn(*leaves)
        ((y * torch.linspace(-1, 1, y.shape[1])[None, :, None]).sum() + h.sum()).backward()
        grads.append([t.grad for t in leaves])
    for g_ref, g in zip(*grads):
        assert torch.allclose(g, g_ref, atol=1e-10)


def test_chunked_gradcheck_float64():
    a, x, h0 = _inputs(1, 13, 3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (a, x, h0)]
    assert torch.autograd.gradcheck(lambda *t: linear_scan_chunked(*t, chunk=4), leaves)
