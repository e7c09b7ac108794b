"""Data pipeline: documents, held-out split, tokenizer, tokenization, packing, batches."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rgemma.config import GriffinConfig, griffin_pattern
from rgemma.io import documents
from rgemma.model import Griffin
from rgemma.training import data

CODE = '''def add(a, b):
    """Adds two numbers."""
    return a + b


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5
'''


def _corpus_texts(n: int = 40) -> list[str]:
    out = []
    for i in range(n):
        out.append(
            CODE.replace("add", f"add_{i}").replace("Point", f"Point{i % 7}")
            + f"\n# file {i}: value = {i * 37}\nprint(add_{i}({i}, {i + 1}))\n"
        )
    return out


TOKENIZER_TEXTS = _corpus_texts()  # for conftest's tokenizer


def test_tokenizer_has_gemma_special_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.start_of_turn_id == 106 and tokenizer.end_of_turn_id == 107
    assert tokenizer.id_to_piece(4) == "<mask>" and tokenizer.id_to_piece(105) == "<unused98>"
    assert tokenizer.id_to_piece(0) == "<pad>" and tokenizer.id_to_piece(1) == "<eos>"
    assert 500 <= tokenizer.vocab_size <= 600


def test_tokenizer_round_trips_code_and_unseen_bytes(tokenizer):
    text = CODE + "\tx = 'ünïcode ✓ 漢字'\n\n\n        deep = 1\n"
    ids = tokenizer.encode(text, add_bos=False)
    assert tokenizer.decode(ids) == text
    # indentation is a few tokens, not one per space
    indent_ids = tokenizer.encode("        return x", add_bos=False)
    assert len(indent_ids) <= 4
    assert tokenizer.encode("<start_of_turn>", add_bos=False) == [106]


def test_tokenizer_training_is_deterministic(tmp_path):
    a, b = tmp_path / "a.model", tmp_path / "b.model"
    data.train_tokenizer(_corpus_texts(), str(a), vocab_size=520)
    data.train_tokenizer(_corpus_texts(), str(b), vocab_size=520)
    assert a.read_bytes() == b.read_bytes()


def test_find_and_split_documents(tmp_path):
    for i in range(30):
        sub = tmp_path / ("pkg" if i % 2 else "lib")
        sub.mkdir(exist_ok=True)
        (sub / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "junk.py").write_text("no\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("no\n")
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe\x00 not utf-8")
    (tmp_path / "notes.bin").write_text("ignored")
    docs, skipped = documents.find_documents([str(tmp_path)], exclude=["tests"])
    assert skipped == 1
    assert len(docs) == 30 and all(d.name.endswith(".py") for d in docs)
    assert not any("__pycache__" in d.name or d.name.startswith("tests/") for d in docs)
    train, held = data.split_documents(docs, 0.2)
    assert 0 < len(held) < 15 and len(train) + len(held) == 30
    # deterministic, by name, independent of order and of the other files
    train2, held2 = data.split_documents(list(reversed(docs[:20])), 0.2)
    assert {d.name for d in held2} == {d.name for d in held if d in docs[:20]}


def test_jsonl_text_and_chat_documents(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "x = 1"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "y = 2"},
    ]
    path.write_text(
        json.dumps({"text": "print(1)\n"}) + "\n\n" + json.dumps({"messages": chat}) + "\n"
    )
    docs, _ = documents.find_documents([str(path)])
    assert [d.text is not None for d in docs] == [True, False]
    ids, mask = data.encode_document(docs[1], tokenizer)
    assert ids == tokenizer.encode_chat(chat, add_generation_prompt=False)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert trained == "x = 1<end_of_turn>\ny = 2<end_of_turn>\n"
    ids, mask = data.encode_document(docs[0], tokenizer)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and all(mask)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\n')
    with pytest.raises(documents.DataError, match="bad.jsonl:1"):
        documents.find_documents([str(bad)])


def test_tokenize_cache_and_packing(tmp_path, tokenizer):
    docs = [documents.Document(name=f"d{i}", text=t) for i, t in enumerate(_corpus_texts(6))]
    tok_file = tokenizer._backend.path
    corpus = data.tokenize_cached(docs, tokenizer, tok_file, str(tmp_path), "train")
    again = data.tokenize_cached(docs, tokenizer, tok_file, str(tmp_path), "train")
    assert len(os.listdir(tmp_path)) == 1
    np.testing.assert_array_equal(corpus.tokens, again.tokens)
    assert corpus.num_documents == 6
    starts = corpus.offsets[:-1]
    assert (corpus.positions[starts] == 0).all() and (corpus.tokens[starts] == 2).all()
    assert (np.diff(corpus.positions)[np.diff(corpus.positions) != 1] < 0).all()

    rows = data.PackedRows(corpus, seq_len=32)
    assert len(rows) == (corpus.num_tokens - 1) // 32
    stream = np.concatenate([rows.row(i)["tokens"] for i in range(len(rows))])
    np.testing.assert_array_equal(stream, corpus.tokens[: len(stream)])
    for i in range(len(rows)):
        r = rows.row(i)
        np.testing.assert_array_equal(r["targets"][:-1], r["tokens"][1:])
        # a target that starts a new document is not trained on
        next_pos = np.append(r["positions"][1:], corpus.positions[(i + 1) * 32])
        np.testing.assert_array_equal(r["weights"] == 0, next_pos == 0)
    batch = rows.batch([0, 3])
    assert batch["tokens"].shape == (2, 32) and batch["weights"].dtype == np.float32


def test_batch_sampler_is_a_seeded_permutation_per_epoch():
    s = data.BatchSampler(num_rows=10, batch_size=4, seed=3)
    first = np.concatenate([s.rows(k) for k in range(5)])  # 2 epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert not np.array_equal(first[:10], first[10:20])
    again = data.BatchSampler(num_rows=10, batch_size=4, seed=3)
    np.testing.assert_array_equal(again.rows(3), s.rows(3))  # random access = resumable
    assert not np.array_equal(data.BatchSampler(10, 4, seed=4).rows(0), s.rows(0))


def test_unigram_baseline_is_the_cross_entropy_of_frequencies():
    train = data.TokenizedCorpus(
        tokens=np.array([2, 5, 5, 6, 1], np.uint16),
        positions=np.arange(5, dtype=np.int32),
        loss_mask=np.ones(5, np.uint8),
        offsets=np.array([0, 5]),
    )
    held = data.TokenizedCorpus(
        tokens=np.array([2, 5, 6], np.uint16),
        positions=np.arange(3, dtype=np.int32),
        loss_mask=np.ones(3, np.uint8),
        offsets=np.array([0, 3]),
    )
    vocab = 8
    counts = np.bincount(train.tokens, minlength=vocab) + 1.0
    p = counts / counts.sum()
    expected = -(np.log(p[5]) + np.log(p[6])) / 2  # the bos at position 0 is no target
    assert data.unigram_loss(train, held, vocab) == pytest.approx(expected)


def test_packed_documents_get_the_same_logits_as_alone():
    """A row holding two documents (positions restarting at 0) = each document alone."""
    torch.manual_seed(0)
    cfg = GriffinConfig(
        vocab_size=50,
        width=32,
        mlp_width=64,
        num_heads=2,
        block_types=griffin_pattern(3),
        attention_window=8,
    )
    model = Griffin(cfg).init_weights(1).eval()
    a = torch.randint(3, 50, (1, 13))
    b = torch.randint(3, 50, (1, 11))
    with torch.no_grad():
        la, _ = model(a, torch.arange(13)[None])
        lb, _ = model(b, torch.arange(11)[None])
        row = torch.cat([a, b], dim=1)
        pos = torch.cat([torch.arange(13), torch.arange(11)])[None]
        lab, _ = model(row, pos)
    torch.testing.assert_close(lab[:, :13], la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lab[:, 13:], lb, atol=1e-5, rtol=1e-5)
