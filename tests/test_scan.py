"""The chunked scan and the Triton kernel equal the reference loop, values and
gradients. The Triton kernel runs here under Triton's interpreter on the CPU
(tests/test_cuda.py runs it compiled on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

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


# Run in a child process: TRITON_INTERPRET must be set before the kernel is defined.
TRITON_CHECK = os.path.join(os.path.dirname(__file__), "triton_scan_check.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_kernel_equals_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for y_err, h_err, scale, dtype, shape in out["forward"]:
        assert dtype == "torch.float32" and len(shape) == 3
        # float32 re-association inside 64-step tiles: a few ulps of the largest h
        assert y_err <= 1e-5 * scale and h_err <= 1e-5 * scale, (y_err, h_err, scale)
    assert max(out["backward"]) <= 1e-10, out["backward"]
