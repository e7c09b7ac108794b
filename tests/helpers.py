"""Helpers the test modules share; the fixtures built from them are in conftest.py.

Random weights mapped into rgemma and the reference implementations, tiny
Gemma-layout tokenizers and models, and small utilities for the engine, server
and training tests. Test modules import these (``from helpers import ...``),
never from one another.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import time

import torch

from rgemma.config import GriffinConfig, griffin_pattern
from rgemma.io.tokenizer import Tokenizer
from rgemma.model import Griffin
from rgemma.weights import official_config

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


# ================================================== random weights, official reference
def official_model(cfg: GriffinConfig, seed: int = 0, noise: float = 0.1):
    """A random official torch Griffin; zero-initialised tensors (norms, biases) get noise too."""
    from recurrentgemma.torch import griffin

    torch.manual_seed(seed)
    model = griffin.Griffin(official_config(cfg), gradient_checkpointing=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.eval()


def official_pair(cfg: GriffinConfig, seed: int = 0):
    """(official model, rgemma model) holding the same random weights."""
    official = official_model(cfg, seed)
    ours = Griffin.from_official_state_dict(official.state_dict(), cfg).eval()
    return official, ours


def random_model(cfg: GriffinConfig, seed: int = 0, noise: float = 0.05) -> Griffin:
    """An rgemma model with random weights (paper init plus noise on the zero tensors)."""
    model = Griffin(cfg).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model.eval()


def tiny_config(**overrides) -> GriffinConfig:
    base = dict(
        vocab_size=97,
        width=64,
        mlp_width=192,
        num_heads=4,
        block_types=("recurrent", "recurrent", "attention") * 2,
        attention_window=8,
        logits_soft_cap=30.0,
    )
    return GriffinConfig(**{**base, **overrides})


def arange_positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length)[None].repeat(batch, 1)


def assert_compiled_decode_matches(
    eager: Griffin, compiled: Griffin, prompt: torch.Tensor, steps: int, rtol: float
) -> None:
    """Prefills ``prompt`` [B, T] into both models, then decodes ``steps`` greedy tokens
    (the eager model's) through both: each step's logits agree within ``rtol`` of the
    largest eager logit."""
    B, T = prompt.shape
    with torch.inference_mode():
        s1, s2 = eager.init_state(B), compiled.init_state(B)
        a, _ = eager(prompt, arange_positions(B, T), s1, logits="last")
        compiled(prompt, arange_positions(B, T), s2, logits="last")
        for i in range(steps):
            tok = a.argmax(-1, keepdim=True)
            a, _ = eager(tok, torch.full((B, 1), T + i), s1, logits="last")
            b, _ = compiled(tok, torch.full((B, 1), T + i), s2, logits="last")
            assert (a - b).abs().max().item() <= rtol * a.abs().max().item(), i


# ============================================= a tokenizer and a model to generate with
GEMMA_SPECIALS = [f"<unused{i}>" for i in range(102)] + ["<start_of_turn>", "<end_of_turn>"]


def training_lines(n: int = 300, cjk: bool = True) -> list[str]:
    """Lines of a few common words; with ``cjk`` every fifth one ends in Chinese."""
    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over a lazy dog hello world model user token "
        "stream griffin gemma recurrent state once upon time there was"
    ).split()
    lines = []
    for i in range(n):
        line = [rng.choice(words) for _ in range(rng.randint(3, 10))]
        if cjk and i % 5 == 0:
            line.append("你好世界")
        lines.append(" ".join(line))
    return lines


def sentencepiece_model(
    path,
    lines,
    *,
    vocab_size: int,
    user_symbols=GEMMA_SPECIALS,
    pad=0,
    eos=1,
    bos=2,
    unk=3,
    dummy_prefix=False,
    **options,
):
    """Train a Gemma-style BPE SentencePiece model (byte fallback, identity normalization)
    on ``lines`` and write it to ``path`` (a file); ``options`` go to the trainer."""
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=pad,
        eos_id=eos,
        bos_id=bos,
        unk_id=unk,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=user_symbols,
        add_dummy_prefix=dummy_prefix,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    path.write_bytes(buf.getvalue())
    return path


def train_tokenizer(path, vocab_size: int = 512, cjk: bool = True) -> Tokenizer:
    """A Gemma-layout SentencePiece model (pad 0, eos 1, bos 2, unk 3, turn
    markers 106/107, byte fallback) written to ``path`` (a directory)."""
    sentencepiece_model(path / "tokenizer.model", training_lines(cjk=cjk), vocab_size=vocab_size)
    return Tokenizer.from_dir(path)


def small_config(
    vocab_size: int, *, width: int = 32, layers: int = 3, window: int = 16
) -> GriffinConfig:
    """Two heads, MLP twice the width, the Griffin block pattern."""
    return GriffinConfig(
        vocab_size=vocab_size,
        width=width,
        mlp_width=2 * width,
        num_heads=2,
        block_types=griffin_pattern(layers),
        attention_window=window,
    )


def small_model(config: GriffinConfig, seed: int = 0) -> Griffin:
    """Random weights, with every parameter (norms and biases too) non-trivial."""
    torch.manual_seed(seed)
    model = Griffin(config).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        model.embed_tokens.weight.mul_(3.0)  # well separated logits
    return model.eval()


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` intra-op torch threads, then restore the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ==================================================================== engine and server
WINDOW = 16  # the attention window of conftest's ``model``
PROMPTS = [
    "the quick brown fox",
    "hello",
    "once upon a time there was a lazy dog",
    "stream griffin gemma",
    "a model",
    "jumps over the lazy dog hello world",
    "token state",
    "there was a time",
]
MAX_PROMPT_TOKENS = 300
MAX_BODY = 64 * 1024


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def teacher_forced_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from one full forward pass."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), torch.arange(len(ids))[None])
    lsm = torch.log_softmax(logits[0].float(), dim=-1)
    return [lsm[i - 1, ids[i]].item() for i in range(1, len(ids))]


def server_config(**kw):
    """The ``ServerConfig`` of the server tests, with ``kw`` changed."""
    from rgemma.serving.app import ServerConfig

    base = dict(
        model_name="tiny",
        max_tokens_limit=512,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_body_bytes=MAX_BODY,
    )
    return ServerConfig(**{**base, **kw})


def metrics(url: str) -> dict[str, float]:
    """The server's Prometheus samples, by name with labels."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ============================================================================ training
def subprocess_env() -> dict[str, str]:
    """The environment for a training subprocess: rgemma from src, one thread, no torchrun."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env
