"""Training: learning, gradients through the scan, resume after SIGKILL, DDP, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import subprocess_env
from rgemma.config import GriffinConfig, griffin_pattern
from rgemma.io import documents
from rgemma.layers import RGLRU, Chunk
from rgemma.model import Griffin
from rgemma.scan import linear_scan_chunked, linear_scan_reference
from rgemma.training import checkpoints, data, train

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

pytestmark = pytest.mark.usefixtures("one_thread_per_test")


# --------------------------------------------------------------------------
# fixtures: a small corpus and its tokenizer, trained once
# --------------------------------------------------------------------------


def _module_text(i: int) -> str:
    return (
        f'"""Module {i}."""\n\nimport os\n\n\n'
        f"def func_{i}(x, y={i}):\n    if x > y:\n        return x - y\n"
        f"    return [x * k for k in range({i % 5 + 2})]\n\n\n"
        f"class Thing{i}:\n    def __init__(self):\n        self.value = {i * 3}\n\n"
        f"    def run(self):\n        return func_{i}(self.value)\n"
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        (root / f"mod{i:02d}.py").write_text(_module_text(i) * 2)
    tok = root.parent / "tok.model"
    texts = [p.read_text() for p in sorted(root.iterdir())]
    data.train_tokenizer(texts, str(tok), vocab_size=520)
    return str(root), str(tok)


def _cfg(corpus, out, **kw) -> train.TrainConfig:
    root, tok = corpus
    base = dict(
        data=[root],
        tokenizer=tok,
        preset="tiny",
        seq_len=32,
        batch_size=4,
        steps=20,
        warmup=2,
        lr=3e-3,
        eval_fraction=0.15,
        out=str(out),
        progress=False,
        plot=False,
        export=False,
        log_every=1000,
        seed=0,
    )
    base.update(kw)
    return train.TrainConfig(**base)


def _losses(out) -> list[float]:
    return [r["loss"] for r in checkpoints.read_metrics(os.path.join(out, "metrics.jsonl"))]


# --------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------


def test_loss_drops_on_a_repeat_task():
    """Sequences are a random 8-token pattern repeated: the repeats become predictable."""
    torch.manual_seed(0)
    cfg = GriffinConfig(
        vocab_size=32,
        width=64,
        mlp_width=128,
        num_heads=2,
        block_types=griffin_pattern(3),
        attention_window=32,
    )
    model = Griffin(cfg).init_weights(0).train()
    tcfg = train.TrainConfig(lr=1e-2, warmup=20, steps=150)
    opt = train.make_optimizer(model, tcfg)
    g = torch.Generator().manual_seed(0)
    T, period = 32, 8
    for step in range(tcfg.steps):
        pattern = torch.randint(3, 32, (8, period), generator=g)
        tokens = pattern.repeat(1, T // period)
        batch = {
            "tokens": tokens,
            "positions": torch.arange(T).repeat(8, 1),
            "targets": torch.roll(tokens, -1, dims=1),
            "weights": (torch.arange(T) >= period - 1).float().repeat(8, 1),
        }
        batch["weights"][:, -1] = 0
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, tcfg)
        loss = train.token_losses(model, batch).sum() / batch["weights"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step == 0:
            first = float(loss.detach())
    assert first > 3.0  # ~ log(29) at the start
    assert float(loss.detach()) < 0.2, float(loss.detach())


def test_lr_schedule():
    cfg = train.TrainConfig(lr=1.0, min_lr=0.1, warmup=10, steps=110)
    assert train.lr_at(0, cfg) == pytest.approx(0.1)
    assert train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.55)
    assert train.lr_at(110, cfg) == pytest.approx(0.1)


# --------------------------------------------------------------------------
# gradients through the scan and the RG-LRU
# --------------------------------------------------------------------------


def test_chunked_scan_gradients_equal_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    B, T, L = 2, 70, 8
    a = torch.rand(B, T, L, generator=g).requires_grad_()
    x = torch.randn(B, T, L, generator=g).requires_grad_()
    h0 = torch.randn(B, L, generator=g).requires_grad_()
    w_y, w_h = torch.randn(B, T, L, generator=g), torch.randn(B, L, generator=g)
    grads = []
    for scan in (linear_scan_reference, lambda *t: linear_scan_chunked(*t, chunk=9)):
        y, h = scan(a, x, h0)
        ((y * w_y).sum() + (h * w_h).sum()).backward()
        grads.append([t.grad.clone() for t in (a, x, h0)])
        for t in (a, x, h0):
            t.grad = None
    for ref, fast in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_scans_in_float64():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 11, 3, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(1, 11, 3, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(1, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: linear_scan_chunked(*t, chunk=4), (a, x, h0))
    assert torch.autograd.gradcheck(linear_scan_reference, (a, x, h0))


def _rglru_definition(x, wx, bx, wa, ba, param, reset, h0):
    """The RG-LRU from its definition, float64, with the plain loop."""
    B, T, L = x.shape
    H = wx.shape[0]
    xb = x.reshape(B, T, H, -1)
    gate_x = torch.sigmoid(torch.einsum("bthi,hij->bthj", xb, wx) + bx).reshape(B, T, L)
    gate_a = torch.sigmoid(torch.einsum("bthi,hij->bthj", xb, wa) + ba).reshape(B, T, L)
    log_a = -8.0 * gate_a * F.softplus(param)
    a = torch.exp(log_a)
    mult = torch.where(reset[..., None], torch.ones_like(a), torch.sqrt(1 - torch.exp(2 * log_a)))
    a = torch.where(reset[..., None], torch.zeros_like(a), a)
    y, _ = linear_scan_reference(a, x * gate_x * mult, h0)
    return y


def test_rglru_gradients_match_the_gradchecked_definition():
    torch.manual_seed(0)
    B, T, L, H = 2, 12, 8, 2
    layer = RGLRU(L, H)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(B, T, L, requires_grad=True)
    h0 = torch.randn(B, L)
    positions = torch.tensor([list(range(T)), [3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    reset = positions == 0
    params = [
        layer.input_gate_weight,
        layer.input_gate_bias,
        layer.recurrent_gate_weight,
        layer.recurrent_gate_bias,
        layer.recurrent_param,
    ]

    def definition(x64, wx, bx, wa, ba, param):
        return _rglru_definition(x64, wx, bx, wa, ba, param, reset, h0.double())

    inputs64 = [x.detach().double().requires_grad_()] + [
        p.detach().double().requires_grad_() for p in params
    ]
    assert torch.autograd.gradcheck(definition, inputs64)

    chunk = Chunk.build(
        positions, torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    )
    y, _ = layer(x, h0.clone(), chunk)
    w = torch.randn(B, T, L)
    (y * w).sum().backward()
    (definition(*inputs64) * w.double()).sum().backward()
    torch.testing.assert_close(x.grad, inputs64[0].grad.float(), rtol=1e-4, atol=1e-4)
    for p, ref in zip(params, inputs64[1:]):
        torch.testing.assert_close(p.grad, ref.grad.float(), rtol=1e-4, atol=1e-4)


def test_model_gradients_with_activation_checkpointing_are_the_same():
    cfg = GriffinConfig(
        vocab_size=40,
        width=32,
        mlp_width=64,
        num_heads=2,
        block_types=griffin_pattern(3),
        attention_window=8,
    )
    tokens = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(0))
    # rows that start inside a document (as packed rows do): the state matters
    batch = {
        "tokens": tokens,
        "positions": torch.arange(5, 25).repeat(2, 1),
        "targets": tokens.roll(-1, 1),
        "weights": torch.ones(2, 20),
    }
    grads = []
    for ckpt in (False, True):
        model = Griffin(cfg).init_weights(0).train()
        model.gradient_checkpointing = ckpt
        train.token_losses(model, batch).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# the training run: export, resume, DDP, LoRA fine-tuning, CLI
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """20 uninterrupted steps, checkpoint at 10 and 20, eval, export."""
    out = tmp_path_factory.mktemp("ref")
    cfg = _cfg(corpus, out, save_every=10, keep=0, eval_every=10, export=True, plot=True)
    summary = train.train(cfg)
    return cfg, summary


def test_training_run_outputs(reference_run):
    from rgemma.io import checkpoint

    cfg, summary = reference_run
    records = checkpoints.read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 21))
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20]
    assert records[-1]["loss"] < records[0]["loss"]
    assert summary["eval_loss"] < summary["unigram_eval_loss"] + 1.5
    assert math.isclose(summary["eval_perplexity"], math.exp(summary["eval_loss"]))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert summary["plot"] is False  # the plot is optional
    else:
        assert os.path.getsize(os.path.join(cfg.out, "loss.png")) > 1000
    ckpts = sorted(os.listdir(os.path.join(cfg.out, "checkpoints")))
    assert ckpts == ["step-00000010.pt", "step-00000020.pt"]
    model, tok = checkpoint.load(summary["export"])
    assert tok is not None and tok.vocab_size == model.config.vocab_size
    saved = torch.load(os.path.join(cfg.out, "checkpoints", ckpts[-1]), weights_only=False)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, saved["model"][name], rtol=0, atol=0)


_KILLER = """
import json, os, signal, sys
from rgemma.training import train
cfg = train.TrainConfig(**json.loads(sys.argv[1]))
def on_step(step, record):
    if step == 13:                         # after the checkpoint of step 10
        os.kill(os.getpid(), signal.SIGKILL)
train.train(cfg, on_step=on_step)
"""


def test_resume_after_sigkill_gives_identical_weights(corpus, reference_run, tmp_path):
    ref_cfg, _ = reference_run
    cfg = _cfg(corpus, tmp_path, save_every=10, keep=2, eval_every=10)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, json.dumps(dataclasses.asdict(cfg))],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000010.pt"]
    assert len(_losses(tmp_path)) == 13

    summary = train.train(dataclasses.replace(cfg, resume="latest"))
    assert summary["step"] == 20
    ours = torch.load(tmp_path / "checkpoints" / "step-00000020.pt", weights_only=False)
    ref = torch.load(
        os.path.join(ref_cfg.out, "checkpoints", "step-00000020.pt"), weights_only=False
    )
    for name, p in ref["model"].items():
        torch.testing.assert_close(ours["model"][name], p, rtol=0, atol=1e-6)
    assert _losses(tmp_path) == pytest.approx(_losses(ref_cfg.out), rel=1e-6)
    assert ours["tokens_seen"] == ref["tokens_seen"]


def test_resume_refuses_a_different_run(corpus, reference_run):
    ref_cfg, _ = reference_run
    cfg = dataclasses.replace(
        ref_cfg,
        lr=1e-3,
        resume=os.path.join(ref_cfg.out, "checkpoints", "step-00000010.pt"),
        steps=21,
    )
    with pytest.raises(train.TrainError, match="lr"):
        train.train(cfg)


@pytest.fixture(scope="module")
def five_steps(corpus, tmp_path_factory):
    """The single-process baseline: 5 steps of batch 4."""
    out = tmp_path_factory.mktemp("five")
    train.train(_cfg(corpus, out, steps=5))
    return _losses(out)


def test_grad_accumulation_equals_a_bigger_batch(corpus, five_steps, tmp_path):
    train.train(_cfg(corpus, tmp_path, batch_size=2, grad_accum=2, steps=5))
    assert _losses(tmp_path) == pytest.approx(five_steps, rel=1e-5)


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_torchrun_two_processes_match_one(corpus, five_steps, tmp_path):
    """DDP over gloo, 2 x batch 2 = the single-process run with batch 4."""
    root, tok = corpus
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "rgemma",
        "train",
        "--data",
        root,
        "--tokenizer",
        tok,
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "5",
        "--warmup",
        "2",
        "--lr",
        "3e-3",
        "--eval-fraction",
        "0.15",
        "--eval-every",
        "5",
        "--threads",
        "1",
        "--no-progress",
        "--no-export",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = checkpoints.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in records] == pytest.approx(five_steps, rel=1e-5)
    assert records[0]["tokens"] == 4 * 32
    assert "eval_loss" in records[-1]


def test_lora_fine_tuning_on_chat_jsonl_exports_a_merged_model(corpus, reference_run, tmp_path):
    from rgemma.io import checkpoint
    from rgemma.training import lora

    _, ref_summary = reference_run
    chats = tmp_path / "chat.jsonl"
    with open(chats, "w") as f:
        for i in range(12):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"write func_{i}"},
                            {"role": "assistant", "content": f"def func_{i}(x):\n    return x"},
                        ]
                    }
                )
                + "\n"
            )
    out = tmp_path / "ft"
    cfg = train.TrainConfig(
        data=[str(chats)],
        init=ref_summary["export"],
        lora_rank=2,
        lora_targets="attention,mlp",
        seq_len=32,
        batch_size=2,
        steps=4,
        warmup=1,
        lr=1e-2,
        eval_fraction=0.2,
        out=str(out),
        progress=False,
        plot=False,
    )
    summary = train.train(cfg)
    base, _ = checkpoint.load(ref_summary["export"])
    tuned, tok = checkpoint.load(summary["export"])
    assert not lora.has_lora(tuned) and tok is not None
    changed = {n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(
        n.endswith("weight")
        and any(
            t in n
            for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        )
        for n in changed
    )
    # the loss counts only the model's turns
    rows = data.PackedRows(data.tokenize(documents.find_documents([str(chats)])[0], tok), 32)
    w = rows.batch(range(len(rows)))
    trained = w["targets"][w["weights"] > 0]
    assert tok.start_of_turn_id not in trained and tok.end_of_turn_id in trained


def test_bfloat16_is_refused_clearly_without_hardware_support(corpus, tmp_path):
    if train.bf16_supported("cpu"):
        pytest.skip("this CPU has bf16 arithmetic")
    with pytest.raises(train.TrainError, match="no native bfloat16"):
        train.train(_cfg(corpus, tmp_path, dtype="bfloat16", steps=1, warmup=0))


def test_cli_help_explains_every_flag():
    from rgemma.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb").choices["train"]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 30
    for action in flags:
        assert action.help and len(action.help) > 10, action.option_strings
    names = {s for a in flags for s in a.option_strings}
    for flag in (
        "--data",
        "--init",
        "--preset",
        "--seq-len",
        "--batch-size",
        "--grad-accum",
        "--lr",
        "--warmup",
        "--steps",
        "--clip",
        "--dtype",
        "--grad-checkpointing",
        "--seed",
        "--lora-rank",
        "--lora-alpha",
        "--lora-targets",
        "--save-every",
        "--keep",
        "--resume",
        "--eval-every",
        "--out",
        "--fsdp",
    ):
        assert flag in names
    out = subprocess.run(
        [sys.executable, "-m", "rgemma", "train", "--help"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--lora-rank" in out.stdout
