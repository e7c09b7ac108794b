"""The Triton scan against the loop, run by test_scan.py in a child process under
Triton's interpreter (TRITON_INTERPRET=1 in its environment). Prints one JSON line:
forward errors per shape (float32 against a float64 loop) and the largest gradient
difference (float64)."""

import json

import torch

from rgemma.scan import linear_scan_reference, linear_scan_triton


def inputs(B, T, L, dtype):
    g = torch.Generator().manual_seed(T)
    a = torch.rand(B, T, L, generator=g, dtype=dtype) ** 0.1
    a[:, T // 3] = 0  # a reset
    x = torch.randn(B, T, L, generator=g, dtype=dtype)
    return a, x, torch.randn(B, L, generator=g, dtype=dtype)


def as_double(t):
    return None if t is None else t.double()


out = {"forward": [], "backward": []}
# T past one 64-step tile and not a multiple of it, L not a multiple of 16, no h0
for B, T, L, with_h0 in (
    (2, 150, 20, True),
    (1, 64, 16, False),
    (3, 1, 5, True),
    (1, 65, 17, True),
):
    a, x, h0 = inputs(B, T, L, torch.float32)
    h0 = h0 if with_h0 else None
    y, h = linear_scan_triton(a, x, h0)
    y_ref, h_ref = linear_scan_reference(as_double(a), as_double(x), as_double(h0))
    y_err = (y.double() - y_ref).abs().max().item()
    h_err = (h.double() - h_ref).abs().max().item()
    out["forward"].append([y_err, h_err, y_ref.abs().max().item(), str(y.dtype), list(y.shape)])

a, x, h0 = inputs(2, 100, 18, torch.float64)
grads = []
for scan in (linear_scan_reference, linear_scan_triton):
    leaves = [t.clone().requires_grad_() for t in (a, x, h0)]
    y, h = scan(*leaves)
    ((y * torch.linspace(-1, 1, y.shape[1])[None, :, None]).sum() + h.sum()).backward()
    grads.append([t.grad for t in leaves])
out["backward"] = [(g - g_ref).abs().max().item() for g_ref, g in zip(*grads)]
print(json.dumps(out))
