"""The GPU paths: model, scan, state, compiled decode (CUDA graphs), generation,
engine and training on CUDA, each against the same computation on the CPU.

Skipped where no CUDA device is present (CI has none); run by hand on a GPU
machine with ``python -m pytest tests/test_cuda.py``. Matmuls run in float32
(no TF32) so CPU and GPU agree to rounding.
"""

from __future__ import annotations

import pytest
import torch

from helpers import arange_positions, random_model, tiny_config
from rgemma.inference.generate import generate
from rgemma.scan import linear_scan, linear_scan_reference, triton_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _cpu_and_gpu(cfg, seed: int = 0):
    cpu = random_model(cfg, seed)
    gpu = random_model(cfg, seed).cuda()
    return cpu, gpu


def test_model_matches_cpu_with_padding_chunks_and_window_wrap():
    """Left padding, a document reset, chunked prefill past the window and decode
    steps: the GPU model equals the CPU model token for token."""
    cfg = tiny_config(attention_window=8)
    cpu, gpu = _cpu_and_gpu(cfg)
    B, T = 3, 40
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    positions = arange_positions(B, T)
    positions[1, :5] = -1  # left padding
    positions[1, 5:] = torch.arange(T - 5)
    positions[2, 20:] = torch.arange(T - 20)  # a second document in row 2
    with torch.no_grad():
        ref_state = cpu.init_state(B)
        ref, _ = cpu(tokens, positions, ref_state)
        state = gpu.init_state(B)
        parts = [
            gpu(tokens[:, s:e].cuda(), positions[:, s:e].cuda(), state)[0]
            for s, e in ((0, 13), (13, 14), (14, 40))
        ]
        out = torch.cat(parts, dim=1).cpu()
        real = positions >= 0
        assert (out - ref)[real].abs().max().item() <= ATOL
        # decode steps (the T == 1 path) on both devices
        nxt = torch.randint(0, cfg.vocab_size, (B, 1))
        for i in range(5):
            pos = positions[:, -1:] + 1 + i
            a, _ = cpu(nxt, pos, ref_state)
            b, _ = gpu(nxt.cuda(), pos.cuda(), state)
            assert (b.cpu() - a).abs().max().item() <= ATOL
            nxt = a[:, -1].argmax(-1, keepdim=True)
    gpu_tensors = state.tensors()
    for name, t in ref_state.tensors().items():  # the states agree too
        assert torch.allclose(gpu_tensors[name].cpu(), t, atol=ATOL), name


def test_scan_matches_reference_and_gradients():
    """The scan on CUDA (Triton where installed): values and gradients of the loop."""
    torch.manual_seed(0)
    B, T, L = 2, 300, 48
    a = torch.rand(B, T, L, dtype=torch.float64) * 0.5 + 0.5
    x = torch.randn(B, T, L, dtype=torch.float64)
    h0 = torch.randn(B, L, dtype=torch.float64)
    ref_y, ref_h = linear_scan_reference(a, x, h0)
    ag, xg, hg = (t.cuda().requires_grad_() for t in (a, x, h0))
    y, h = linear_scan(ag, xg, hg)
    assert torch.allclose(y.cpu(), ref_y, atol=1e-10) and torch.allclose(h.cpu(), ref_h, atol=1e-10)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    ac, xc, hc = (t.detach().clone().requires_grad_() for t in (a, x, h0))
    yc, _ = linear_scan_reference(ac, xc, hc)
    (yc * w.cpu()).sum().backward()
    for got, want in ((ag, ac), (xg, xc), (hg, hc)):
        assert torch.allclose(got.grad.cpu(), want.grad, atol=1e-8)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_scan_at_a_prefill_shape(monkeypatch):
    """On CUDA, linear_scan is the one-launch Triton kernel: at the 2B width and a
    prompt past one tile, float32 values within a few ulps of a float64 loop."""
    from rgemma import scan_triton

    calls = []
    monkeypatch.setattr(
        scan_triton, "scan_forward", lambda *t, f=scan_triton.scan_forward: calls.append(1) or f(*t)
    )
    torch.manual_seed(0)
    B, T, L = 2, 1000, 2560
    a = (torch.rand(B, T, L, device="cuda") ** 0.1).float()
    x = torch.randn(B, T, L, device="cuda")
    h0 = torch.randn(B, L, device="cuda")
    y, h = linear_scan(a, x, h0)
    assert calls, "linear_scan did not use the Triton kernel"
    y_ref, h_ref = linear_scan_reference(a.double(), x.double(), h0.double())
    scale = y_ref.abs().max().item()
    assert (y.double() - y_ref).abs().max().item() <= 1e-5 * scale
    assert (h.double() - h_ref).abs().max().item() <= 1e-5 * scale


def test_state_moves_between_devices_mid_stream():
    """Prefill on the GPU, move the state to the CPU and continue there: equal to
    an uninterrupted CPU run (snapshots are device-portable)."""
    cfg = tiny_config(attention_window=8)
    cpu, gpu = _cpu_and_gpu(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 30))
    positions = arange_positions(2, 30)
    with torch.no_grad():
        ref, _ = cpu(tokens, positions)
        state = gpu.init_state(2)
        first, _ = gpu(tokens[:, :17].cuda(), positions[:, :17].cuda(), state)
        moved = state.to("cpu")
        rest, _ = cpu(tokens[:, 17:], positions[:, 17:], moved)
    out = torch.cat([first.cpu(), rest], dim=1)
    assert (out - ref).abs().max().item() <= ATOL


def test_compiled_step_with_cuda_graphs_equals_eager():
    """compile_step(mode="reduce-overhead") (CUDA graphs, state updated in place)
    decodes the same logits as the eager step, across two batch sizes."""
    cfg = tiny_config(attention_window=8)
    eager = random_model(cfg).cuda()
    compiled = random_model(cfg).cuda().compile_step(mode="reduce-overhead")
    for B in (1, 4):
        prompt = torch.randint(0, cfg.vocab_size, (B, 12), device="cuda")
        pos = torch.arange(12, device="cuda").expand(B, 12)
        with torch.inference_mode():
            s1, s2 = eager.init_state(B), compiled.init_state(B)
            a, _ = eager(prompt, pos, s1, logits="last")
            b, _ = compiled(prompt, pos, s2, logits="last")
            for i in range(12):  # past the window: the ring wraps
                tok = a.argmax(-1, keepdim=True)
                p = torch.full((B, 1), 12 + i, device="cuda")
                a, _ = eager(tok, p, s1, logits="last")
                b, _ = compiled(tok, p, s2, logits="last")
                assert (a - b).abs().max().item() <= 1e-3, (B, i)


@pytest.mark.parametrize("compiled", [False, True])
def test_captured_step_equals_eager(compiled):
    """capture_step (the decode step replayed as CUDA graphs, alone or over
    compile_step): the eager step's logits and states, for two batch sizes and
    two live states at once, past the window, with a document reset."""
    cfg = tiny_config(attention_window=8)
    eager = random_model(cfg).cuda()
    graphed = random_model(cfg).cuda()
    if compiled:
        graphed.compile_step()
    graphed.capture_step()
    with torch.inference_mode():
        runs = []
        for B in (1, 3, 3):  # the second B=3 state: its own graph
            prompt = torch.randint(0, cfg.vocab_size, (B, 10), device="cuda")
            pos = torch.arange(10, device="cuda").expand(B, 10)
            s1, s2 = eager.init_state(B), graphed.init_state(B)
            a, _ = eager(prompt, pos, s1, logits="last")
            graphed(prompt, pos, s2, logits="last")
            runs.append((B, s1, s2, a))
        for i in range(14):  # interleaved: graphs replayed in turn
            for B, s1, s2, a in runs:
                tok = torch.full((B, 1), 5 + i, device="cuda")
                p = torch.full((B, 1), 10 + i, device="cuda")
                if i == 9:
                    p[0] = 0  # row 0 starts a new document
                a, _ = eager(tok, p, s1, logits="last")
                b, _ = graphed(tok, p, s2, logits="last")
                assert (a - b).abs().max().item() <= 1e-4, (B, i)
        for _, s1, s2, _ in runs:
            for name, t in s1.tensors().items():
                assert torch.allclose(t, s2.tensors()[name], atol=1e-4), name
    assert len(graphed._graphed_step.graphs) == 3


def test_generate_on_gpu_equals_cpu():
    """Batched greedy generation with the bundled demo model: same tokens on both devices."""
    from rgemma.io import demo

    cpu, tok = demo.load(dtype=torch.float32)
    gpu, _ = demo.load(dtype=torch.float32, device="cuda")
    prompts = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, item):"]
    a = generate(cpu, tok, prompts, max_new_tokens=24)
    b = generate(gpu, tok, prompts, max_new_tokens=24)
    c = generate(gpu, tok, prompts, max_new_tokens=24, compile=True)  # compiled + CUDA graphs
    assert [x.token_ids for x in b] == [x.token_ids for x in a]
    assert [x.token_ids for x in c] == [x.token_ids for x in a]
    assert b[0].state.device.type == "cuda"


def test_engine_on_gpu_batched_equals_alone():
    """The continuous-batching engine drives a GPU model: requests together equal alone."""
    from rgemma.inference.engine import Engine, EngineConfig, Request
    from rgemma.io import demo

    model, tok = demo.load(dtype=torch.float32, device="cuda")
    prompts = ["def main():", "import sys\n", "for i in range(10):", "# a comment"]
    requests = [
        Request(prompt_ids=tok.encode(p), max_tokens=12 + 3 * i, stop_ids=[])
        for i, p in enumerate(prompts)
    ]
    with Engine(model, tok, EngineConfig(max_batch=4, prefill_chunk=8)) as engine:
        alone = [engine.submit(r).result(timeout=120)[0][0].token_ids for r in requests]
        handles = [engine.submit(r) for r in requests]
        together = [h.result(timeout=120)[0][0].token_ids for h in handles]
    assert together == alone
    assert [len(t) for t in together] == [r.max_tokens for r in requests]


def test_training_gradients_match_cpu():
    """Loss and gradients of a training step (scan backward, activation
    checkpointing) on the GPU equal the CPU's."""
    cfg = tiny_config(attention_window=8)
    cpu, gpu = _cpu_and_gpu(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    positions = arange_positions(2, 24)
    positions[1, 10:] = torch.arange(14)  # packed: a second document
    losses = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        model.train()
        model.gradient_checkpointing = True
        logits, _ = model(tokens.to(dev), positions.to(dev))
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1).to(dev)
        )
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-5
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert torch.allclose(q.grad.cpu(), p.grad, atol=1e-4, rtol=1e-3), name


def test_bf16_on_gpu_close_to_fp32():
    """bf16 weights and activations on the GPU (the official numerics there): close
    to float32, and prefill + steps equal one call to bf16 rounding."""
    cfg = tiny_config(attention_window=8)
    ref_model = random_model(cfg)
    model = random_model(cfg).to(torch.bfloat16).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    positions = arange_positions(2, 20)
    with torch.no_grad():
        ref, _ = ref_model(tokens, positions)
        out, _ = model(tokens.cuda(), positions.cuda())
        state = model.init_state(2)
        model(tokens[:, :19].cuda(), positions[:, :19].cuda(), state)
        last, _ = model(tokens[:, 19:].cuda(), positions[:, 19:].cuda(), state)
    scale = ref.abs().max().item()
    assert out.dtype == torch.bfloat16
    assert (out.float().cpu() - ref).abs().max().item() <= 0.05 * scale
    assert (last.float() - out[:, 19:].float()).abs().max().item() <= 0.02 * scale
