"""Training data: split documents, train a tokenizer, tokenize once, pack rows.

The pipeline, nanoGPT style, in small functions; the documents come from
``rgemma.io.documents.find_documents`` (a text file or a JSONL line each):

1. ``split_documents``: a deterministic held-out split *by file*: a file is
   held out iff a hash of its relative path falls below ``eval_fraction``,
   so the split does not depend on the order or on the other files.
2. ``train_tokenizer``: a SentencePiece BPE model with Gemma's special
   pieces at Gemma's ids (pad 0, eos 1, bos 2, unk 3, placeholders 4..105,
   ``<start_of_turn>`` 106, ``<end_of_turn>`` 107), byte fallback, and
   whitespace kept as it is (code).
3. ``tokenize`` -> ``TokenizedCorpus``: one flat token stream with document
   offsets and a per-token loss mask, cached as ``.npz`` keyed by a hash of
   the contents and of the tokenizer.
4. ``PackedRows``: the stream cut into fixed rows of ``seq_len`` inputs.
   Segment positions restart at 0 at each document start, so documents
   packed in one row do not see each other (the model resets its
   recurrence, conv and attention at position 0).
5. ``BatchSampler``: which rows make global batch number ``k``: a seeded
   permutation per epoch, so the data position is one integer (resumable).
6. ``prepare_data``: all of the above for one training run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from rgemma.io.chat_template import CHAT_ROLES, ChatTemplateError
from rgemma.io.documents import DataError, Document, find_files, read_documents
from rgemma.training.distributed import Dist

# Characters per tokenizer-training sentence: a longer line is cut (SentencePiece's
# max_sentence_length is 1 << 16 bytes, and a character takes at most 4).
MAX_PIECE_CHARS = 8192

# Gemma's ids 4..105 (placeholders here, never produced by encoding text).
GEMMA_PLACEHOLDERS = ("<mask>", "<2mass>", "[@BOS@]") + tuple(f"<unused{i}>" for i in range(99))


# --------------------------------------------------------------------------
# 1. Held-out split
# --------------------------------------------------------------------------


def is_held_out(key: str, eval_fraction: float) -> bool:
    """True for the fraction ``eval_fraction`` of keys, decided by their SHA-256."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < eval_fraction


def split_documents(
    docs: Sequence[Document], eval_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, held out): by file for text files, by line for JSONL."""
    train = [d for d in docs if not is_held_out(d.split_key, eval_fraction)]
    held = [d for d in docs if is_held_out(d.split_key, eval_fraction)]
    return train, held


# --------------------------------------------------------------------------
# 2. Tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str], path: str, vocab_size: int = 8000, max_sentences: int = 2_000_000
) -> str:
    """Trains a SentencePiece BPE tokenizer with Gemma's special ids; writes ``path``.

    Special pieces: pad 0, eos 1, bos 2, unk 3, ``GEMMA_PLACEHOLDERS`` at
    4..105 (control pieces), ``<start_of_turn>`` 106, ``<end_of_turn>`` 107
    and a newline piece; then the 256 byte pieces (byte fallback), then the
    learned pieces. Whitespace is kept verbatim (no normalisation, no dummy
    prefix, whitespace-only pieces allowed: indentation becomes few tokens).
    Training is single-threaded, so the model is reproducible.
    """
    import sentencepiece as spm

    n_special = 4 + len(GEMMA_PLACEHOLDERS) + 3 + 256
    if vocab_size <= n_special + 100:
        raise DataError(
            f"vocab_size {vocab_size} is too small: the special and byte pieces "
            f"alone take {n_special}"
        )

    def lines() -> Iterator[str]:
        # SentencePiece drops sentences longer than max_sentence_length bytes: a long
        # line (minified code, a JSONL document without newlines) is cut into pieces
        n = 0
        for text in texts:
            for line in text.split("\n"):
                for start in range(0, len(line), MAX_PIECE_CHARS):
                    if n >= max_sentences:
                        return
                    n += 1
                    yield line[start : start + MAX_PIECE_CHARS]

    model = io.BytesIO()
    try:
        _train_sentencepiece(spm, lines(), model, vocab_size)
    except RuntimeError as e:  # SentencePiece's own checks, e.g. no text at all
        raise DataError(
            f"cannot train a tokenizer on this data ({' '.join(str(e).split())}); "
            "pass --tokenizer, or give more text"
        ) from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)
    return path


def _train_sentencepiece(spm, sentences: Iterator[str], model, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        control_symbols=list(GEMMA_PLACEHOLDERS),
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n"],
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        max_sentence_length=1 << 16,
        character_coverage=0.9999,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )


# --------------------------------------------------------------------------
# 3. Tokenize (once, cached)
# --------------------------------------------------------------------------


@dataclasses.dataclass
class TokenizedCorpus:
    """A flat stream of documents.

    tokens: [N] token ids; positions: [N] segment position of each token
    (0 at each document start); loss_mask: [N] 1 where the token is a
    training target (0 for user turns of chats); offsets: [D + 1] document
    boundaries in the stream.
    """

    tokens: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(
            tmp,
            tokens=self.tokens,
            positions=self.positions,
            loss_mask=self.loss_mask,
            offsets=self.offsets,
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> TokenizedCorpus:
        with np.load(path) as z:
            return cls(
                tokens=z["tokens"],
                positions=z["positions"],
                loss_mask=z["loss_mask"],
                offsets=z["offsets"],
            )


def encode_document(doc: Document, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one document.

    Text: ``<bos> text <eos>``, every token a target. Chat: the tokenizer's
    chat template; only the model's turns (their text and ``<end_of_turn>``)
    are targets.
    """
    if doc.messages is None:
        ids = tokenizer.encode(doc.text, add_bos=True) + [tokenizer.eos_id]
        return ids, [1] * len(ids)
    return encode_chat(doc.messages, tokenizer, where=doc.name)


def encode_chat(
    messages: list[dict], tokenizer, where: str = "chat"
) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a chat: loss only on the assistant turns.

    The conversation is rendered once; the character spans of each assistant
    turn are found by rendering the prefixes (the prompt up to
    ``<start_of_turn>model\\n`` and the same plus the answer), and each span
    is encoded separately so its tokens are exactly the turn's.
    """
    try:
        return _encode_chat(messages, tokenizer, where)
    except ChatTemplateError as e:
        raise DataError(f"{where}: {e}") from None


def _encode_chat(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    full = tokenizer.render_chat(messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        turn = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(turn) and turn.startswith(prompt)):
            raise DataError(
                f"{where}: the chat template does not render prefixes of the "
                "conversation as prefixes; cannot find the model's turns"
            )
        spans.append((len(prompt), len(turn)))
    if not spans:
        raise DataError(f"{where}: a chat without assistant messages has nothing to learn")
    ids: list[int] = []
    mask: list[int] = []
    cursor = 0
    for start, end in spans + [(len(full), len(full))]:
        for text, target in ((full[cursor:start], 0), (full[start:end], 1)):
            if text:
                piece = tokenizer.encode(text, add_bos=False)
                ids += piece
                mask += [target] * len(piece)
        cursor = end
    return ids, mask


def tokenize(docs: Sequence[Document], tokenizer) -> TokenizedCorpus:
    """Encodes documents into one stream (positions restart at 0 per document)."""
    all_ids: list[np.ndarray] = []
    all_mask: list[np.ndarray] = []
    lengths = []
    for doc in docs:
        ids, mask = encode_document(doc, tokenizer)
        all_ids.append(np.asarray(ids, dtype=np.int32))
        all_mask.append(np.asarray(mask, dtype=np.uint8))
        lengths.append(len(ids))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n = int(offsets[-1])
    tokens = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int32)
    mask = np.concatenate(all_mask) if all_mask else np.zeros(0, np.uint8)
    positions = np.arange(n, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    return TokenizedCorpus(
        tokens=tokens.astype(dtype),
        positions=positions.astype(np.int32),
        loss_mask=mask,
        offsets=offsets,
    )


def corpus_key(docs: Sequence[Document], tokenizer_path: str) -> str:
    """A hash of the documents' names and contents and of the tokenizer file."""
    h = hashlib.sha256()
    with open(tokenizer_path, "rb") as f:
        h.update(f.read())
    for d in docs:
        h.update(d.name.encode())
        h.update(b"\0")
        payload = d.text if d.messages is None else json.dumps(d.messages, sort_keys=True)
        h.update(payload.encode("utf-8", "surrogatepass"))
        h.update(b"\1")
    return h.hexdigest()[:16]


def tokenize_cached(
    docs: Sequence[Document], tokenizer, tokenizer_path: str, cache_dir: str, name: str
) -> TokenizedCorpus:
    """``tokenize`` with the result cached as ``cache_dir/{name}-{key}.npz``."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{name}-{corpus_key(docs, tokenizer_path)}.npz")
    if os.path.exists(path):
        return TokenizedCorpus.load(path)
    corpus = tokenize(docs, tokenizer)
    corpus.save(path)
    return corpus


def unigram_loss(train: TokenizedCorpus, held: TokenizedCorpus, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the held-out targets under the training
    set's unigram distribution (add-one smoothed): the baseline any language
    model must beat. Targets are as in ``PackedRows`` (no document-start token)."""
    counts = (
        np.bincount(
            train.tokens[train.loss_mask > 0].astype(np.int64), minlength=vocab_size
        ).astype(np.float64)
        + 1.0
    )
    logp = np.log(counts / counts.sum())
    is_target = (held.loss_mask > 0) & (held.positions != 0)
    return float(-logp[held.tokens[is_target].astype(np.int64)].mean())


# --------------------------------------------------------------------------
# 4. Packing
# --------------------------------------------------------------------------


class PackedRows:
    """Row ``i`` is the stream slice [i*T, i*T + T + 1): inputs, targets, weights.

    ``row(i)`` returns int64 arrays ``tokens``, ``positions`` [T] (inputs and
    their segment positions), ``targets`` [T] (the next tokens) and float32
    ``weights`` [T]: 1 where the target is trained on. A target that starts
    a new document (its position is 0) has weight 0: nothing predicts it.
    A document cut by a row boundary continues in the next row with its
    positions continuing (the model starts that row from an empty state).
    """

    def __init__(self, corpus: TokenizedCorpus, seq_len: int):
        if corpus.num_tokens < seq_len + 1:
            raise DataError(
                f"the data has {corpus.num_tokens} tokens, fewer than one row of "
                f"seq_len + 1 = {seq_len + 1}; use a smaller --seq-len or more data"
            )
        self.corpus = corpus
        self.seq_len = seq_len
        self.num_rows = (corpus.num_tokens - 1) // seq_len

    def __len__(self) -> int:
        return self.num_rows

    def row(self, i: int) -> dict[str, np.ndarray]:
        T = self.seq_len
        a, b = i * T, i * T + T + 1
        c = self.corpus
        tokens = c.tokens[a:b].astype(np.int64)
        positions = c.positions[a:b].astype(np.int64)
        weights = (c.loss_mask[a + 1 : b] > 0) & (positions[1:] != 0)
        return {
            "tokens": tokens[:-1],
            "positions": positions[:-1],
            "targets": tokens[1:],
            "weights": weights.astype(np.float32),
        }

    def batch(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """The rows stacked: each entry [len(rows), T]."""
        items = [self.row(int(i)) for i in rows]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}


# --------------------------------------------------------------------------
# 5. Which rows make each batch
# --------------------------------------------------------------------------


class BatchSampler:
    """Global batch ``k`` -> its ``batch_size`` row indices, deterministically.

    Epoch ``e`` visits the rows in the order of a permutation seeded by
    (seed, e); global batches are consecutive slices of the concatenated
    epochs. So the data position is just ``k`` (the step), which makes resuming
    exact, and data-parallel ranks can each take their own share of batch k.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._epoch = epoch
        return self._perm

    def rows(self, k: int) -> np.ndarray:
        out = []
        for j in range(k * self.batch_size, (k + 1) * self.batch_size):
            epoch, i = divmod(j, self.num_rows)
            out.append(self._permutation(epoch)[i])
        return np.asarray(out, dtype=np.int64)

    def epoch_of(self, k: int) -> float:
        return k * self.batch_size / self.num_rows


# --------------------------------------------------------------------------
# 6. One run's data
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """What a training run trains and evaluates on."""

    train: PackedRows
    eval: PackedRows | None
    tokenizer: Any
    tokenizer_files: list[str]  # to ship next to the exported model
    stats: dict[str, Any]


def tokenizer_source(cfg) -> str | None:
    """The tokenizer file or folder to use (None: train one into ``out``)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.init and os.path.isdir(cfg.init):
        return cfg.init
    return None


def load_tokenizer(src: str):
    """The tokenizer at ``src`` (a file or a folder); DataError if it cannot be read."""
    from rgemma.io.tokenizer import Tokenizer

    try:
        return Tokenizer.from_dir(src) if os.path.isdir(src) else Tokenizer.from_file(src)
    except (ValueError, OSError, RuntimeError) as e:
        raise DataError(f"tokenizer {src}: {' '.join(str(e).split())}") from None


def check_chat(doc: Document) -> None:
    """DataError naming the document for a chat that is not a list of messages with a
    known string ``role`` and a string ``content``."""
    for i, m in enumerate(doc.messages or ()):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(
                f"{doc.name}: message {i}: expected an object with a 'role' and a string "
                f"'content', got {json.dumps(m)[:80]}"
            )
        if m.get("role") not in CHAT_ROLES:
            raise DataError(
                f"{doc.name}: message {i}: unknown role {m.get('role')!r} (expected one of "
                f"{', '.join(CHAT_ROLES)})"
            )
    if not any(m["role"] == "assistant" for m in doc.messages or ()):
        raise DataError(f"{doc.name}: a chat without assistant messages has nothing to learn")


def read_corpus(cfg) -> tuple[list[Document], int]:
    """The documents of ``cfg.data`` and the number of files skipped (see
    ``read_documents``); chats are checked."""
    files = find_files(cfg.data, extensions=tuple(cfg.extensions), exclude=cfg.exclude)
    docs, skipped = read_documents(files)
    for doc in docs:
        if doc.messages is not None:
            check_chat(doc)
    return docs, skipped


def tokenizer_files(src: str) -> list[str]:
    """Files of a tokenizer to ship next to an exported model."""
    if os.path.isfile(src):
        return [src]
    names = (
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    )
    return [os.path.join(src, n) for n in names if os.path.isfile(os.path.join(src, n))]


def prepare_data(cfg, dist: Dist, log: Callable[[str], None]) -> Data:
    """Reads the documents, gets a tokenizer, tokenizes (cached) and packs rows.

    ``cfg`` is the run's ``TrainConfig`` (its data, tokenizer, init, out and
    seq_len fields). The main process does the work; the others wait and
    read its caches.
    """
    docs, skipped = read_corpus(cfg)
    if not docs:
        raise DataError(f"no documents found in {', '.join(cfg.data) or '(no --data)'}")
    train_docs, held_docs = split_documents(docs, cfg.eval_fraction)
    if not train_docs:
        raise DataError("every document is held out; lower --eval-fraction")
    eval_every = getattr(cfg, "eval_every", 0)
    if eval_every and not held_docs:
        raise DataError(
            f"--eval-every {eval_every}: --eval-fraction {cfg.eval_fraction} holds out none of "
            f"the {len(docs)} documents (the split is by a hash of each file's path, each "
            "JSONL line's); raise --eval-fraction, or drop --eval-every"
        )
    src = tokenizer_source(cfg)
    if src is None and cfg.init:
        raise DataError(
            f"--init {cfg.init}: a checkpoint file carries no tokenizer; pass "
            "--tokenizer (its tokenizer.model or folder)"
        )
    if src is not None and not tokenizer_files(src):
        raise DataError(f"{src}: no tokenizer.model or tokenizer.json there; pass --tokenizer")
    if src is None:
        src = os.path.join(cfg.out, "tokenizer.model")
        if dist.is_main and not os.path.exists(src):
            log(f"training a {cfg.vocab_size}-piece tokenizer on {len(train_docs)} documents")
            texts = (
                d.text
                if d.messages is None
                else "\n".join(str(m.get("content", "")) for m in d.messages)
                for d in train_docs
            )
            train_tokenizer(texts, src, vocab_size=cfg.vocab_size)
        dist.barrier()
    tokenizer = load_tokenizer(src)
    tok_file = src if os.path.isfile(src) else tokenizer_files(src)[0]
    cache = os.path.join(cfg.out, "data")
    corpora = {}
    for rank_turn in range(2):  # main process first, then the others read the cache
        if (rank_turn == 0) == dist.is_main:
            for name, subset in (("train", train_docs), ("eval", held_docs)):
                if subset:
                    corpora[name] = tokenize_cached(subset, tokenizer, tok_file, cache, name)
        dist.barrier()
    train_rows = PackedRows(corpora["train"], cfg.seq_len)
    eval_rows = None
    if "eval" in corpora and corpora["eval"].num_tokens > cfg.seq_len:
        eval_rows = PackedRows(corpora["eval"], cfg.seq_len)
    elif eval_every:
        held_tokens = corpora["eval"].num_tokens if "eval" in corpora else 0
        raise DataError(
            f"--eval-every {eval_every}: the held-out documents have {held_tokens} tokens, "
            f"fewer than one row (--seq-len + 1 = {cfg.seq_len + 1}); raise --eval-fraction "
            "or lower --seq-len, or drop --eval-every"
        )
    stats = {
        "documents": len(docs),
        "skipped_files": skipped,
        "train_documents": len(train_docs),
        "eval_documents": len(held_docs),
        "train_chars": sum(len(d.text or "") for d in train_docs),
        "eval_chars": sum(len(d.text or "") for d in held_docs),
        "train_tokens": corpora["train"].num_tokens,
        "eval_tokens": corpora["eval"].num_tokens if "eval" in corpora else 0,
        "vocab_size": tokenizer.vocab_size,
    }
    if "eval" in corpora:
        stats["unigram_eval_loss"] = unigram_loss(
            corpora["train"], corpora["eval"], tokenizer.vocab_size
        )
    return Data(
        train=train_rows,
        eval=eval_rows,
        tokenizer=tokenizer,
        tokenizer_files=tokenizer_files(src),
        stats=stats,
    )
