"""Streamed perplexity scores equal teacher forcing and the training stack's eval loss."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from rgemma.cli import perplexity as cli_perplexity
from rgemma.evaluation.perplexity import score_texts, sum_logprobs

TEXT = (
    "def add(a, b):\n    return a + b\n\nimport os\nfor name in os.listdir(path):\n"
    "    print(name)\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    "the quick brown fox jumps over the lazy dog. question: what is the answer? yes.\n"
)
TOKENIZER_TEXTS = [TEXT * 20]  # for conftest's tokenizer, model and checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def direct_nll(model, ids: list[int]) -> float:
    """Sum of -log p(ids[t] | ids[:t]), t >= 1, from ONE teacher-forced call."""
    if len(ids) < 2:
        return 0.0
    x = torch.tensor([ids])
    logits, _ = model(x, torch.arange(len(ids))[None])
    logprobs = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    return -float(logprobs.gather(1, x[0, 1:, None]).sum())


@pytest.mark.parametrize("chunk_size, batch_size", [(2, 1), (7, 3), (16, 2), (1000, 4)])
def test_streamed_logprobs_equal_teacher_forcing(model, chunk_size, batch_size):
    gen = torch.Generator().manual_seed(0)
    docs = [
        [2] + torch.randint(4, model.config.vocab_size, (n,), generator=gen).tolist()
        for n in (0, 1, 5, 40, 90, 17)
    ]
    got = sum_logprobs(model, docs, chunk_size=chunk_size, batch_size=batch_size)
    for doc, total in zip(docs, got):
        assert -total == pytest.approx(direct_nll(model, doc), abs=1e-4)


def test_long_document_runs_in_fixed_size_calls(model):
    """Streaming never feeds the model more than chunk_size tokens per row."""
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, tokens, positions, state=None, **kw):
            seen.append(tuple(tokens.shape))
            return self.inner(tokens, positions, state, **kw)

    doc = [2] + [5 + i % 200 for i in range(600)]
    sum_logprobs(Spy(model), [doc], chunk_size=64)
    assert max(t for _, t in seen) == 64 and len(seen) == math.ceil(600 / 64)


def test_score_texts_reports_perplexity_and_bits_per_byte(model, tokenizer):
    texts = [("a", TEXT), ("b", "naïve café ünïcode"), ("empty", "")]
    result = score_texts(model, tokenizer, texts, chunk_size=9, batch_size=2)
    for (name, text), doc in zip(texts, result.documents):
        ids = tokenizer.encode(text, add_bos=True)
        assert doc.name == name and doc.tokens == len(ids) - 1
        assert doc.bytes == len(text.encode("utf-8"))
        assert doc.nll == pytest.approx(direct_nll(model, ids), abs=1e-4)
    total = result.total
    assert total.tokens == sum(d.tokens for d in result.documents)
    assert total.perplexity == pytest.approx(math.exp(total.nll / total.tokens))
    assert total.bits_per_byte == pytest.approx(total.nll / math.log(2) / total.bytes)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rgemma")
    cli_perplexity.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_on_held_out_files_matches_direct_computation(
    checkpoint, model, tokenizer, tmp_path, capsys
):
    held = tmp_path / "held_out.txt"
    held.write_text(TEXT * 3, encoding="utf-8")
    lines = tmp_path / "more.jsonl"
    lines.write_text(
        json.dumps({"text": "the lazy dog"}) + "\n" + json.dumps({"text": TEXT[:50]}) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "ppl.json"
    assert (
        run_cli(
            [
                "perplexity",
                str(held),
                str(lines),
                "--model",
                str(checkpoint),
                "--chunk-size",
                "32",
                "--batch-size",
                "2",
                "--json",
                "--no-progress",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    texts = [TEXT * 3, "the lazy dog", TEXT[:50]]
    ids = [tokenizer.encode(t, add_bos=True) for t in texts]
    nll = sum(direct_nll(model, d) for d in ids)
    tokens = sum(len(d) - 1 for d in ids)
    total = printed["total"]
    assert total["tokens"] == tokens and len(printed["documents"]) == 3
    assert total["nll_per_token"] == pytest.approx(nll / tokens, abs=1e-5)
    assert total["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / sum(len(t.encode()) for t in texts), abs=1e-5
    )


def test_cli_reports_missing_file(checkpoint, tmp_path, capsys):
    assert run_cli(["perplexity", str(tmp_path / "nope.txt"), "--model", str(checkpoint)]) == 2
    assert "rgemma perplexity: error" in capsys.readouterr().err


def test_matches_training_eval_loss(model, tokenizer):
    """With --append-eos the mean NLL is the training stack's eval loss on the same text
    (one document packed into one row, so the training eval sees it whole)."""
    from rgemma.io.documents import Document
    from rgemma.training import data, train
    from rgemma.training.distributed import Dist

    text = TEXT * 2
    corpus = data.tokenize([Document(name="held.txt", text=text)], tokenizer)
    rows = data.PackedRows(corpus, seq_len=corpus.num_tokens - 1)
    cfg = train.TrainConfig(seq_len=rows.seq_len, batch_size=1, device="cpu", dtype="float32")
    train_loss = train.evaluate(model, rows, cfg, Dist(), max_tokens=None)
    ours = score_texts(model, tokenizer, [text], append_eos=True, chunk_size=13).total
    assert ours.tokens == corpus.num_tokens - 1
    assert ours.nll_per_token == pytest.approx(train_loss, abs=1e-5)


def test_demo_model_held_out_perplexity():
    try:
        from rgemma.io import demo

        demo_dir = demo.path()
    except (ImportError, FileNotFoundError) as e:  # demo.DemoMissingError is a FileNotFoundError
        pytest.skip(f"the bundled demo model is not there yet ({type(e).__name__})")
    from pathlib import Path

    from rgemma.io.checkpoint import load

    demo_model, demo_tokenizer = load(demo_dir, dtype=torch.float32)
    held = Path(__file__).parent / "data" / "local_text.jsonl"
    texts = [json.loads(line)["text"] for line in held.read_text().splitlines()]
    result = score_texts(demo_model, demo_tokenizer, texts, chunk_size=128)
    one_call = sum(direct_nll(demo_model, demo_tokenizer.encode(t, add_bos=True)) for t in texts)
    assert result.total.nll == pytest.approx(one_call, rel=1e-4)
    print(
        f"demo model, tests/data/local_text.jsonl: token perplexity "
        f"{result.total.perplexity:.3f}, bits per byte {result.total.bits_per_byte:.3f}"
    )
