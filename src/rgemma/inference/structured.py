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
JSON Schema keywords xgrammar does not implement (``not``, ``allOf``...) are ignored, so
those constraints are not guaranteed; ``strict`` is accepted and changes nothing.

Grammar engine: xgrammar. Chosen by measured per-token cost: filling one row's mask and
accepting the sampled token, the work added to each decode step of a constrained row,
on this project's 2-core CPU, over 20 JSON documents (~60 tokens each) tokenized by a
SentencePiece vocabulary, compact JSON as generated here, for ``{"type": "object"}``
(JSON mode) and a 7-property schema (enum, bounds, nested object, array). Microseconds
per token, median / mean / p99, and compile seconds; medians of 3 runs::

    vocab   engine                json_object            schema                 compile s
    4096    xgrammar 0.2.9         4.2 /   4.6 /   7.9    2.6 /   3.9 /    9.2   0.003
    4096    llguidance 1.9.1       4.5 /   8.0 /  55     10.8 /  20.3 /  129     0.001
    4096    outlines-core 0.2.14   3.8 /   2.5 /   5.9    0.7 /   2.3 /    8.8   5.5 (obj)
    256000  xgrammar               8.2 /   9.9 /  26      2.8 /   9.5 /   50     0.1
    256000  llguidance            11.9 /  18   /  98     36.9 / 226   / 3180     0.001
    256000  outlines-core        354   / 307   / 785      1.9 / 161   /  751    22 / 13

4096 is the bundled demo model's tokenizer; 256000 (Gemma's size) a synthetic
SentencePiece model extending the demo's with 252k pieces (fragments of Python
standard-library words; Latin, Cyrillic, CJK, Arabic and kana strings). Reproduce:
``pip install llguidance outlines-core; python bench/structured.py --engines``.
xgrammar precomputes the masks of context-independent tokens when it compiles, so a
step mostly copies a stored mask: the lowest mean at 256000 for both grammars and a
bounded tail. llguidance compiles nothing but computes masks lazily: 1.7-24x the mean
and ~60x the p99 (schema, 256000). outlines-core is fast at 4096 but compiles a
whole-vocabulary automaton per schema (5.5 s for JSON mode at 4096; 13-22 s at
256000, where its masks also cost 160-300 us). The price of xgrammar is its
dependencies (``transformers``, and ``triton`` on x86-64 Linux, ~1 GB installed);
everything engine-specific is in this module.
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
_ENGINE_NOISE = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
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
def _schema_grammar(schema: str):
    """The engine's grammar of a schema text (no tokenizer involved)."""
    import xgrammar

    try:
        return xgrammar.Grammar.from_json_schema(
            schema, any_whitespace=False, separators=_SEPARATORS, strict_mode=True
        )
    except (RuntimeError, ValueError, TypeError) as e:
        raise StructuredOutputError(f"invalid JSON schema: {_engine_message(e)}") from None


def _engine_message(e: BaseException) -> str:
    """An engine error without its source location prefix, on one line."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return _ENGINE_NOISE.sub("", lines[0] if lines else type(e).__name__)


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


class Vocabulary:
    """One tokenizer's vocabulary as the grammar engine sees it, with the grammars
    compiled for it (LRU, at most MAX_CACHED_GRAMMARS). Built once per tokenizer and
    vocabulary size (``vocabulary()``); thread-safe.

    stop_ids: the tokens that may end a completed JSON text (the tokenizer's stop ids).
    """

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar

        self.vocab_size = vocab_size
        self.stop_ids = sorted(t for t in tokenizer.stop_ids if t < vocab_size)
        if not self.stop_ids:
            raise StructuredOutputError("the tokenizer has no stop token within the vocabulary")
        encoded = [b or b"" for b in token_bytes(tokenizer, vocab_size)]  # b"": not text
        self.info = xgrammar.TokenizerInfo(
            encoded, xgrammar.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=self.stop_ids
        )
        # Our own LRU below keys by schema text; the engine's cache would be unbounded.
        self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self._grammars: collections.OrderedDict[GrammarSpec, Grammar] = collections.OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The Grammar of ``spec`` (compiled once, then from the cache)."""
        key = dataclasses.replace(spec, name=None, strict=None)  # same schema, same grammar
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        grammar = Grammar(spec, self, self._compiler.compile_grammar(_schema_grammar(spec.schema)))
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
    """A grammar compiled for one vocabulary: immutable, shared by all its matchers."""

    def __init__(self, spec: GrammarSpec, vocab: Vocabulary, compiled):
        self.spec = spec
        self.vocab = vocab
        self.vocab_size = vocab.vocab_size
        self._compiled = compiled

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the text (one per sequence)."""
        import xgrammar

        return GrammarMatcher(self, xgrammar.GrammarMatcher(self._compiled))

    def __repr__(self) -> str:
        return f"Grammar({self.spec.kind}, {self.spec.schema[:60]!r}, vocab={self.vocab_size})"


class GrammarMatcher:
    """Where one sequence is in its grammar: the tokens it may take next, and its end."""

    def __init__(self, grammar: Grammar, handle):
        self.grammar = grammar
        self._handle = handle

    def fill_mask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Writes the allowed next tokens into ``bitmask[row]`` (int32 [R, ceil(V / 32)] on
        the CPU; bit j of word w = token 32 w + j)."""
        self._handle.fill_next_token_bitmask(bitmask, row)

    def allowed(self) -> torch.Tensor:
        """The allowed next tokens: bool [V]."""
        bits = _new_bitmask(1, self.grammar.vocab_size)
        self.fill_mask(bits, 0)
        return unpack_bitmask(bits, self.grammar.vocab_size)[0]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [..., V] with the tokens not allowed next at -inf (a new tensor)."""
        return logits.masked_fill(~self.allowed().to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advances past ``token``; StructuredOutputError if the grammar does not allow it."""
        if not self._handle.accept_token(int(token)):
            raise StructuredOutputError(
                f"token {token} does not fit the {self.grammar.spec.kind} grammar here"
            )

    def is_terminated(self) -> bool:
        """True once the text is complete and a stop token ended it."""
        return self._handle.is_terminated()

    def is_completed(self) -> bool:
        """True when the text so far is a complete value (a stop token may come next)."""
        return self._handle.is_completed()

    def fork(self) -> GrammarMatcher:
        """An independent copy at the same point (cheap: the compiled grammar is shared)."""
        return GrammarMatcher(self.grammar, self._handle.fork())


# ===================================================================== masks
def _new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.empty((rows, (vocab_size + 31) // 32), dtype=torch.int32)


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
    _batch_filler().batch_fill_next_token_bitmask([m._handle for _, m in matchers], bits)
    allowed = unpack_bitmask(bits, vocab_size)
    if torch.device(device).type != "cpu":
        allowed = allowed.to(device, non_blocking=True)
    return TokenMask([row for row, _ in matchers], allowed)


_local = threading.local()


def _batch_filler():
    """This thread's xgrammar BatchGrammarMatcher: one call fills every row (R separate
    calls cost ~1.5x as much). One thread: on a busy CPU more threads cost more than the
    ~2-20 us per row they would share (measured: 16 rows, 46 us with 1, 230-360 with 2)."""
    filler = getattr(_local, "filler", None)
    if filler is None:
        import xgrammar

        filler = _local.filler = xgrammar.BatchGrammarMatcher(max_threads=1)
    return filler


def _bitmask_buffer(rows: int, vocab_size: int) -> torch.Tensor:
    """A reused int32 [rows, ceil(V / 32)] buffer of this thread (unpacking copies it)."""
    words = (vocab_size + 31) // 32
    buf = getattr(_local, "bits", None)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != words:
        buf = _local.bits = _new_bitmask(max(rows, 16), vocab_size)
    return buf[:rows]
