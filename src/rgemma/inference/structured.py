"""Structured output: JSON mode and JSON Schema, enforced token by token with masks.

    spec = json_schema_spec({"type": "object", "properties": {"n": {"type": "integer"}}})
    grammar = compile_grammar(spec, tokenizer, vocab_size)    # cached per tokenizer + schema
    matcher = grammar.matcher()                               # one per sequence
    mask = token_mask([(row, matcher)], vocab_size)           # -> Sampler.sample(..., mask=)
    matcher.accept(token)                                     # StopChecker does this
    matcher.is_terminated()                                   # the JSON is complete and closed

Where the pieces go: ``parse_response_format`` reads OpenAI's ``response_format`` (the
server), ``json_schema_spec`` a raw schema (``rgemma generate --json-schema``). A
``Grammar`` is compiled once per (tokenizer, vocabulary size, schema text) and shared
(immutable); each sequence gets a ``GrammarMatcher``. Each decode step, ``token_mask``
fills the bit masks of the rows that have a matcher (rows without one are untouched)
and the sampler sets the forbidden logits to -inf BEFORE the repetition penalty,
temperature, top-k, top-p and min-p (``sampling.apply_token_mask``): truncating first
could keep only forbidden tokens and leave nothing to sample, and the nucleus must be
taken over the tokens that may actually be picked. The sampled token goes to
``StopChecker.add``, which feeds the matcher and ends the choice ("stop") once the
grammar has terminated, so there is one stop path for stop tokens, stop strings,
lengths and grammars. Log-probabilities stay those of the raw model.

The output is compact JSON (``json.dumps``' separators ", " and ": ", no newlines): a
grammar that allows any whitespace lets a weak model emit blanks until ``max_tokens``.
Properties come in the schema's order. An object may hold properties its schema does
not list unless it says ``"additionalProperties": false`` (JSON Schema's rule, which
OpenAI's strict mode makes every schema spell out; a weak model may otherwise go on
writing keys). Keywords the engine cannot enforce (``not``, ``uniqueItems``...) are
refused (``Unimplemented keys: ["not"]``), as are schemas no text satisfies; ``strict``
is accepted and changes nothing.

Grammar engine: llguidance, chosen for its weight at a measured cost that fits. It has
no dependencies (7.6 MB installed); xgrammar, the fastest per token, pulls
``transformers`` and, on x86-64 Linux, ``triton`` (~1 GB) into every install of this
CPU-first package. The cost: filling one row's mask and accepting the sampled token,
the work added to each decode step of a constrained row, on this project's 2-core CPU
(busy with other jobs: load ~3.4), over 20 JSON documents (~60 tokens each) tokenized
by a SentencePiece vocabulary, compact JSON as generated here, for
``{"type": "object"}`` (JSON mode) and a 7-property schema (enum, bounds, bounded
strings, nested object, array; ``bench/structured.py``'s SCHEMA). Microseconds per
token, median / mean / p99, and compile seconds; medians of 3 runs::

    vocab   engine                json_object            schema                 compile s
    4096    llguidance 1.9.1       5.5 /   7.9 /  45      7.7 /  10.5 /   60     0.002
    256000  llguidance            9.4 /  17.9 /  74     24.6 / 223   / 3317     0.009
    before the switch (xgrammar installed; SCHEMA without "additionalProperties": false;
    llguidance with a new matcher per document):
    4096    xgrammar 0.2.9         4.2 /   4.6 /   7.9    2.6 /   3.9 /    9.2   0.003
    4096    llguidance 1.9.1       4.5 /   8.0 /  55     10.8 /  20.3 /  129     0.001
    4096    outlines-core 0.2.14   3.8 /   2.5 /   5.9    0.7 /   2.3 /    8.8   5.5 (obj)
    256000  xgrammar               8.2 /   9.9 /  26      2.8 /   9.5 /   50     0.1
    256000  llguidance            11.9 /  18   /  98     36.9 / 226   / 3180     0.001
    256000  outlines-core        354   / 307   / 785      1.9 / 161   /  751    22 / 13

4096 is the bundled demo model's tokenizer; 256000 (Gemma's size) a synthetic
SentencePiece model extending the demo's with 252k pieces (fragments of Python
standard-library words; Latin, Cyrillic, CJK, Arabic and kana strings); building the
engine's view of it (``Vocabulary``) takes 1.5 s, once per tokenizer. Reproduce:
``python bench/structured.py --engines`` (xgrammar and outlines-core are measured too
when installed). xgrammar precomputes the masks of context-independent tokens when it
compiles, so a step mostly copies a stored mask; llguidance compiles nothing (ms) and
computes each mask from its token trie and lexer: ~2x xgrammar's mean in JSON mode, and
inside length-bounded strings at 256000 pieces up to ~3 ms per row (the schema's mean
and p99). A matcher's first mask costs 0.4-1.2 ms when built from the grammar, so each
``Grammar`` keeps one at the start and sequences get copies (first mask 20-50 us).
Through the engine (``python bench/structured.py --rounds 9``, demo model, three runs),
schema / plain decode tok/s is 0.95-0.99 at batch 1 and 0.91-0.93 at batch 16, where the
grammar work is ~0.9 ms of a ~20 ms step (filling 0.63-0.76 ms; isolated, 16 rows take
~0.2 ms: what runs between steps, the forward pass or other jobs, leaves the caches
cold). With random 2B weights and the 256000-piece tokenizer
(``--shape 2b --new-tokens 16 --rounds 3``) it is 1.5 ms of a ~500 ms step at batch 1
and 12 ms of ~850 ms at batch 16 (ratios 0.84 and 0.95 in one run, 1.07 and 0.97 in
another: the forward pass's own spread, 475-620 ms between identical steps, decides
them). Batch filling: one ``LLExecutor`` call with one thread; a second thread did not
pay on 2 busy cores (16 rows: 0.15 ms either way at 4096, 2.9 ms at 256000) and a loop
of single-row calls costs about the same. Everything engine-specific is in this module.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
import sys
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rgemma.inference.sampling import TokenMask

JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"
MAX_SCHEMA_CHARS = 64 * 1024  # a schema's JSON text; compile time grows with it
MAX_CACHED_GRAMMARS = 64  # compiled grammars kept per vocabulary (LRU)
_SEPARATORS = (", ", ": ")  # json.dumps' defaults: what models have seen most
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback
# llguidance's JSON options: compact JSON, json.dumps' separators
_JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": _SEPARATORS[0],
    "key_separator": _SEPARATORS[1],
}
_SPECIAL_MARK = b"\xff"  # llguidance's first byte of tokens that are not text
_FILL_THREADS = 1  # llguidance.LLExecutor threads filling a batch's masks
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class StructuredOutputError(ValueError):
    """A response format or schema that cannot be enforced (the message names why), or a
    token the grammar rejects."""


# ===================================================================== specs
@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """What to enforce, before any tokenizer is involved (hashable: a cache key).

    kind: JSON_OBJECT (any JSON object) or JSON_SCHEMA.
    schema: the JSON Schema as compact JSON text, key order kept (properties are
      generated in the schema's order).
    name: the schema's name (``response_format.json_schema.name``), if any.
    strict: OpenAI's ``strict`` flag, if given (every schema is enforced alike).
    """

    kind: str
    schema: str
    name: str | None = None
    strict: bool | None = None

    def check(self) -> None:
        """Raises StructuredOutputError if the schema cannot be turned into a grammar (cheap:
        no tokenizer; the result is cached)."""
        _schema_grammar(self.schema)


def json_object_spec() -> GrammarSpec:
    """JSON mode: any JSON object."""
    return GrammarSpec(JSON_OBJECT, '{"type": "object"}')


def json_schema_spec(
    schema: Mapping[str, Any] | str, name: str | None = None, strict: bool | None = None
) -> GrammarSpec:
    """A JSON Schema (a dict, or its JSON text), checked; StructuredOutputError if invalid."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise StructuredOutputError(f"the schema is not valid JSON: {e}") from None
    if not isinstance(schema, Mapping):
        raise StructuredOutputError(
            f"the schema must be a JSON object, got {_json_type_name(schema)}"
        )
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StructuredOutputError(f"the schema is not JSON data: {e}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise StructuredOutputError(
            f"the schema is {len(text)} characters of JSON, over the limit of {MAX_SCHEMA_CHARS}"
        )
    spec = GrammarSpec(JSON_SCHEMA, text, name, strict)
    spec.check()
    return spec


def parse_response_format(value: Any) -> GrammarSpec | None:
    """OpenAI's ``response_format`` -> a checked GrammarSpec (None for ``{"type": "text"}``).

    ``{"type": "json_object"}``; ``{"type": "json_schema", "json_schema": {"name": ...,
    "schema": {...}, "strict": ...}}``. StructuredOutputError names what is wrong.
    """
    if not isinstance(value, Mapping):
        raise StructuredOutputError(f"must be an object, got {_json_type_name(value)}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == JSON_OBJECT:
        return json_object_spec()
    if kind != JSON_SCHEMA:
        raise StructuredOutputError(
            f"unknown type {kind!r} (expected 'text', 'json_object' or 'json_schema')"
            if kind is not None
            else "'type' is required ('text', 'json_object' or 'json_schema')"
        )
    body = value.get("json_schema")
    if not isinstance(body, Mapping):
        raise StructuredOutputError("'json_schema' must be an object holding 'name' and 'schema'")
    name, strict = body.get("name"), body.get("strict")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StructuredOutputError(
            "'json_schema.name' must be a string of 1 to 64 letters, digits, '_' or '-'"
        )
    if strict is not None and not isinstance(strict, bool):
        raise StructuredOutputError("'json_schema.strict' must be a boolean")
    if "schema" not in body:
        raise StructuredOutputError("'json_schema.schema' is required")
    try:
        return json_schema_spec(body["schema"], name, strict)
    except StructuredOutputError as e:
        raise StructuredOutputError(f"'json_schema.schema': {e}") from None


def _json_type_name(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


@functools.lru_cache(maxsize=MAX_CACHED_GRAMMARS)
def _schema_grammar(schema: str) -> str:
    """The engine's grammar of a schema text (llguidance's JSON text of it), checked
    without a tokenizer."""
    import llguidance

    try:  # overrides: compact JSON even if the schema's "x-guidance" asks otherwise
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise StructuredOutputError(f"invalid JSON schema: {_engine_message(e)}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar, limits=_limits())
    if error:
        raise StructuredOutputError(f"invalid JSON schema: {_engine_message(error)}")
    return grammar


def _engine_message(error: BaseException | str) -> str:
    """An engine error on one line (its lines joined; regex carets dropped)."""
    lines = [line.strip() for line in str(error).splitlines()]
    return " ".join(line for line in lines if line.strip("^ ")) or type(error).__name__


@functools.lru_cache(maxsize=1)
def _limits():
    """Errors without the parser state and grammar dump (llguidance's default adds them)."""
    import llguidance

    return llguidance.LLParserLimits(verbose_errors=False)


# ================================================================ vocabulary
def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """The bytes each token id adds to the text; None for ids that are not text (control
    and turn tokens, unk, ids past the tokenizer's own vocabulary).

    SentencePiece pieces spell a space "▁" and unknown bytes "<0xNN>" (byte fallback),
    as Gemma's tokenizer.model and tokenizer.json do.
    """
    special = set(tokenizer.special_ids) | {tokenizer.unk_id}
    out: list[bytes | None] = []
    for i in range(vocab_size):
        if i >= tokenizer.vocab_size or i in special:
            out.append(None)
            continue
        piece = tokenizer.id_to_piece(i)
        byte = _BYTE_PIECE.fullmatch(piece)
        out.append(bytes([int(byte.group(1), 16)]) if byte else piece.replace("▁", " ").encode())
    return out


class _Pieces:
    """A tokenizer as ``llguidance.TokenizerWrapper`` reads it: every id's bytes, ids that
    are not text spelled 0xFF + their name (llguidance's mark for special tokens: no
    text grammar can produce them), and an encoder."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        pieces = token_bytes(tokenizer, vocab_size)
        self.tokens = [
            piece if piece is not None else _SPECIAL_MARK + _special_name(tokenizer, i).encode()
            for i, piece in enumerate(pieces)
        ]
        self.special_token_ids = [i for i, piece in enumerate(pieces) if piece is None]
        self.eos_token_id = stop_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False)


def _special_name(tokenizer, i: int) -> str:
    return tokenizer.id_to_piece(i) if i < tokenizer.vocab_size else f"<id_{i}>"


class Vocabulary:
    """One tokenizer's vocabulary as the grammar engine sees it, with the grammars
    compiled for it (LRU, at most MAX_CACHED_GRAMMARS). Built once per tokenizer and
    vocabulary size (``vocabulary()``); thread-safe.

    stop_ids: the tokens that may end a completed JSON text (the tokenizer's stop ids).
    """

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self.vocab_size = vocab_size
        self.stop_ids = sorted(t for t in tokenizer.stop_ids if t < vocab_size)
        if not self.stop_ids:
            raise StructuredOutputError("the tokenizer has no stop token within the vocabulary")
        self._stop_set = frozenset(self.stop_ids)
        wrapper = llguidance.TokenizerWrapper(_Pieces(tokenizer, vocab_size, self.stop_ids))
        self.ll_tokenizer = llguidance.LLTokenizer(  # the token trie masks are computed on
            wrapper, n_vocab=vocab_size, eos_token=self.stop_ids
        )
        self._grammars: collections.OrderedDict[GrammarSpec, Grammar] = collections.OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The Grammar of ``spec`` (compiled once, then from the cache)."""
        import llguidance

        key = dataclasses.replace(spec, name=None, strict=None)  # same schema, same grammar
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        start = llguidance.LLMatcher(
            self.ll_tokenizer, _schema_grammar(spec.schema), log_level=0, limits=_limits()
        )
        if start.is_error():
            raise StructuredOutputError(
                f"invalid JSON schema: {_engine_message(start.get_error())}"
            )
        grammar = Grammar(spec, self, start)
        first = grammar.matcher().allowed()
        first[self.stop_ids] = False
        if not bool(first.any()):  # only the empty text (e.g. "anyOf": []): nothing to write
            raise StructuredOutputError("the schema admits no JSON text that can be generated")
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return grammar

    def __len__(self) -> int:
        return len(self._grammars)


_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_VOCABULARIES_LOCK = threading.Lock()


def vocabulary(tokenizer, vocab_size: int | None = None) -> Vocabulary:
    """The (cached) Vocabulary of ``tokenizer`` over ``vocab_size`` ids (default: the
    tokenizer's size; pass the model's, whose logits may be wider)."""
    vocab_size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    with _VOCABULARIES_LOCK:
        per_size = _VOCABULARIES.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            per_size[vocab_size] = Vocabulary(tokenizer, vocab_size)
        return per_size[vocab_size]


def compile_grammar(spec: GrammarSpec, tokenizer, vocab_size: int | None = None) -> Grammar:
    """``spec`` compiled for ``tokenizer`` and the model's ``vocab_size`` (cached)."""
    return vocabulary(tokenizer, vocab_size).compile(spec)


# =================================================================== grammars
class Grammar:
    """A grammar compiled for one vocabulary: immutable, shared by all its matchers.

    ``compiled``: an engine matcher at the start of the text, never advanced; each
    sequence's matcher is a copy of it."""

    def __init__(self, spec: GrammarSpec, vocab: Vocabulary, compiled):
        self.spec = spec
        self.vocab = vocab
        self.vocab_size = vocab.vocab_size
        self._compiled = compiled

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the text (one per sequence)."""
        return GrammarMatcher(self, self._compiled.deep_copy())

    def __repr__(self) -> str:
        return f"Grammar({self.spec.kind}, {self.spec.schema[:60]!r}, vocab={self.vocab_size})"


class GrammarMatcher:
    """Where one sequence is in its grammar: the tokens it may take next, and its end."""

    def __init__(self, grammar: Grammar, handle):
        self.grammar = grammar
        self._handle = handle
        self._terminated = False

    def fill_mask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Writes the allowed next tokens into ``bitmask[row]`` (int32 [R, ceil(V / 32)] on
        the CPU; bit j of word w = token 32 w + j)."""
        _check_bitmask(bitmask, self.grammar.vocab_size)
        bits = bitmask[row]
        self._handle.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)

    def allowed(self) -> torch.Tensor:
        """The allowed next tokens: bool [V]."""
        bits = _new_bitmask(1, self.grammar.vocab_size)
        self.fill_mask(bits, 0)
        return unpack_bitmask(bits, self.grammar.vocab_size)[0]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [..., V] with the tokens not allowed next at -inf (a new tensor)."""
        return logits.masked_fill(~self.allowed().to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advances past ``token``; StructuredOutputError if the grammar does not allow it
        (the matcher is then unusable: the engine ends the sequence)."""
        token = int(token)
        try:
            ok = 0 <= token < self.grammar.vocab_size and self._handle.consume_token(token)
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            raise StructuredOutputError(
                f"token {token} does not fit the {self.grammar.spec.kind} grammar here"
            )
        if token in self.grammar.vocab._stop_set:  # allowed only once the text is complete
            self._terminated = True

    def is_terminated(self) -> bool:
        """True once the text is complete and a stop token ended it."""
        return self._terminated

    def is_completed(self) -> bool:
        """True when the text so far is a complete value (a stop token may come next)."""
        return self._handle.is_accepting()

    def fork(self) -> GrammarMatcher:
        """An independent copy at the same point (cheap: the compiled grammar is shared)."""
        copy = GrammarMatcher(self.grammar, self._handle.deep_copy())
        copy._terminated = self._terminated
        return copy


# ===================================================================== masks
def _new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.empty((rows, (vocab_size + 31) // 32), dtype=torch.int32)


def _check_bitmask(bitmask: torch.Tensor, vocab_size: int) -> None:
    """The engine writes through a raw pointer: the buffer must be what it assumes."""
    if (
        bitmask.dtype != torch.int32
        or bitmask.device.type != "cpu"
        or bitmask.dim() != 2
        or bitmask.shape[1] != (vocab_size + 31) // 32
        or not bitmask.is_contiguous()
    ):
        raise ValueError(
            f"the bit mask must be a contiguous int32 CPU tensor [R, {(vocab_size + 31) // 32}],"
            f" got {bitmask.dtype} {tuple(bitmask.shape)} on {bitmask.device}"
        )


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bit masks [R, ceil(V / 32)] -> bool [R, V] (True = allowed)."""
    if sys.byteorder == "little":  # the words' bytes are in bit order: one numpy pass
        flat = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(flat[:, :vocab_size]).view(torch.bool)
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab_size]


def token_mask(
    matchers: Sequence[tuple[int, GrammarMatcher]],
    vocab_size: int,
    device: torch.device | str = "cpu",
) -> TokenMask | None:
    """The ``sampling.TokenMask`` of the batch rows that have a matcher.

    Args:
      matchers: (row in the batch, its matcher) for the constrained rows only.
      vocab_size: V, the width of the logits.
      device: where the logits are.
    Returns:
      None when no row is constrained, else rows [R] and allowed bool [R, V].
    """
    if not matchers:
        return None
    bits = _bitmask_buffer(len(matchers), vocab_size)
    if len(matchers) == 1:
        matchers[0][1].fill_mask(bits, 0)
    else:
        rows = [(m._handle, i) for i, (_, m) in enumerate(matchers)]
        _executor().unsafe_compute_mask_ptr(rows, bits.data_ptr(), bits.shape[1] * 4, len(rows))
    allowed = unpack_bitmask(bits, vocab_size)
    if torch.device(device).type != "cpu":
        allowed = allowed.to(device, non_blocking=True)
    return TokenMask([row for row, _ in matchers], allowed)


_local = threading.local()


@functools.lru_cache(maxsize=1)
def _executor():
    """llguidance's batch filler: one call fills every row. One thread: see the module
    docstring."""
    import llguidance

    return llguidance.LLExecutor(num_threads=_FILL_THREADS)


def _bitmask_buffer(rows: int, vocab_size: int) -> torch.Tensor:
    """A reused int32 [rows, ceil(V / 32)] buffer of this thread (unpacking copies it)."""
    words = (vocab_size + 31) // 32
    buf = getattr(_local, "bits", None)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != words:
        buf = _local.bits = _new_bitmask(max(rows, 16), vocab_size)
    return buf[:rows]
