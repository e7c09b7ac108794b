"""Gemma tokenizer: encode/decode, streaming decode and the chat template.

:class:`Tokenizer` wraps Gemma's SentencePiece model (``tokenizer.model``) or,
when a checkpoint only ships ``tokenizer.json``, a Hugging Face ``tokenizers``
tokenizer.  Special token ids are read from the model files and the optional
``tokenizer_config.json`` / ``special_tokens_map.json`` /
``generation_config.json``; Gemma's well-known ids are only used where the
files say nothing.

Text written with control tokens (``<bos>``, ``<start_of_turn>``...) encodes
to their single ids, as in ``transformers``, so a rendered chat prompt can be
encoded as it is.

:class:`IncrementalDecoder` turns a stream of token ids into text pieces that
are always whole characters and that concatenate to exactly
``Tokenizer.decode(all_ids)``.

The chat format itself is ``rgemma.io.chat_template``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rgemma.io.chat_template import ChatTemplateError, next_turn_text, render_chat  # noqa: F401

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

# Piece names and ids of Gemma's tokenizer.model, used where files say nothing.
DEFAULT_PIECES = {
    "pad": PAD,
    "eos": EOS,
    "bos": BOS,
    "unk": UNK,
    "start_of_turn": START_OF_TURN,
    "end_of_turn": END_OF_TURN,
}
DEFAULT_IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "start_of_turn": 106, "end_of_turn": 107}

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZERS_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable or invalid, or a bad token id."""


# ---------------------------------------------------------------------------
# Backends: the minimal interface Tokenizer needs from a tokenizer library.
# ---------------------------------------------------------------------------


class _SentencePieceBackend:
    """A SentencePiece model (``tokenizer.model``)."""

    def __init__(self, path: str):
        import sentencepiece

        data = _read_bytes(path)
        if not data:
            raise TokenizerError(f"{path}: file is empty, expected a SentencePiece model")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError, ValueError) as exc:
            raise TokenizerError(f"{path}: not a valid SentencePiece model ({exc})") from exc
        if self._sp.get_piece_size() == 0:
            raise TokenizerError(f"{path}: SentencePiece model has no pieces")
        self.path = path
        self.control_ids = frozenset(
            i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)
        )
        self._control_pattern = _alternation([self._sp.id_to_piece(i) for i in self.control_ids])

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model."""
        return self._sp.get_piece_size()

    def piece_to_id(self, piece: str) -> int | None:
        """The id of ``piece``, or None when the model has no such piece."""
        piece_id = self._sp.piece_to_id(piece)
        return piece_id if self._sp.id_to_piece(piece_id) == piece else None

    def id_to_piece(self, piece_id: int) -> str:
        """The piece string of ``piece_id``."""
        return self._sp.id_to_piece(piece_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; control pieces written literally map to their ids."""
        if self._control_pattern is None:
            return self._sp.encode(text)
        ids: list[int] = []
        for index, segment in enumerate(self._control_pattern.split(text)):
            if index % 2:  # the split keeps matched control pieces at odd indices
                ids.append(self._sp.piece_to_id(segment))
            elif segment:
                ids.extend(self._sp.encode(segment))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; control pieces (which SentencePiece drops) are written out."""
        parts: list[str] = []
        run: list[int] = []
        for piece_id in ids:
            if piece_id in self.control_ids:
                parts.append(self._sp.decode(run))
                parts.append(self._sp.id_to_piece(piece_id))
                run = []
            else:
                run.append(piece_id)
        parts.append(self._sp.decode(run))
        return "".join(parts)


class _TokenizersBackend:
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no such file")
        tokenizers = _import_tokenizers(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises plain Exception on bad files
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({exc})") from exc
        self.path = path
        self.control_ids = frozenset(
            piece_id
            for piece_id, token in self._tok.get_added_tokens_decoder().items()
            if token.special
        )

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def piece_to_id(self, piece: str) -> int | None:
        """The id of ``piece``, or None when the vocabulary has no such token."""
        return self._tok.token_to_id(piece)

    def id_to_piece(self, piece_id: int) -> str:
        """The token string of ``piece_id``."""
        return self._tok.id_to_token(piece_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the post-processor's BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens written out."""
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _import_tokenizers(path: str):
    """Import the optional ``tokenizers`` package, explaining how to get it."""
    try:
        import tokenizers
    except ImportError as exc:
        raise TokenizerError(
            f"{path}: reading a tokenizer.json needs the `tokenizers` package "
            "(pip install tokenizers), or provide tokenizer.model instead"
        ) from exc
    return tokenizers


def _alternation(strings: Iterable[str]) -> re.Pattern | None:
    """A regex capturing any of ``strings`` (longest first), or None if there are none."""
    strings = sorted({s for s in strings if s}, key=len, reverse=True)
    if not strings:
        return None
    return re.compile("(" + "|".join(re.escape(s) for s in strings) + ")")


# ---------------------------------------------------------------------------
# File reading
# ---------------------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    """The bytes of ``path``, or a TokenizerError saying why not."""
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: no such file")
    if os.path.isdir(path):
        raise TokenizerError(f"{path}: is a directory (use Tokenizer.from_dir)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read ({exc})") from exc


def _read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    try:
        data = json.loads(_read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_text(path: str) -> str | None:
    """The UTF-8 text in ``path``, or None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: not UTF-8 text ({exc})") from exc


def _token_content(value: Any) -> str | None:
    """A special token's text from a config value: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _configured_pieces(*configs: Mapping[str, Any] | None) -> dict[str, str]:
    """Piece names for pad/eos/bos/unk from config files; later configs win."""
    pieces = dict(DEFAULT_PIECES)
    for config in configs:
        for name in ("pad", "eos", "bos", "unk"):
            content = _token_content((config or {}).get(f"{name}_token"))
            if content:
                pieces[name] = content
    return pieces


def _id_list(value: Any) -> list[int]:
    """An id or list of ids from generation_config.json, as a list."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chat_template_from_config(config: Mapping[str, Any] | None, path: str) -> str | None:
    """The chat template in a tokenizer_config.json: a string or the "default" named one."""
    template = (config or {}).get("chat_template")
    if isinstance(template, list):
        defaults = [e for e in template if isinstance(e, Mapping) and e.get("name") == "default"]
        if not defaults:
            raise TokenizerError(f"{path}: chat_template list has no entry named 'default'")
        template = defaults[0].get("template")
    if template is None or isinstance(template, str):
        return template
    raise TokenizerError(f"{path}: chat_template must be a string or a list of {{name, template}}")


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


class Tokenizer:
    """Gemma tokenizer over a SentencePiece or ``tokenizers`` backend.

    Build it with :meth:`from_dir` (a checkpoint directory) or
    :meth:`from_file` (one ``tokenizer.model`` / ``tokenizer.json``).
    """

    def __init__(
        self,
        backend: _SentencePieceBackend | _TokenizersBackend,
        *,
        tokenizer_config: Mapping[str, Any] | None = None,
        special_tokens_map: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ):
        self._backend = backend
        self.chat_template = chat_template
        pieces = _configured_pieces(special_tokens_map, tokenizer_config)
        generation_config = generation_config or {}
        self.generation_config = dict(generation_config)  # sampling defaults live here too
        self._ids = {
            name: self._resolve_id(pieces[name], generation_config.get(f"{name}_token_id"), name)
            for name in DEFAULT_PIECES
        }
        self._present = {
            name: backend.piece_to_id(piece) is not None for name, piece in pieces.items()
        }
        self._piece_names = pieces
        self._generation_eos_ids = frozenset(_id_list(generation_config.get("eos_token_id")))
        self._special_ids = self._collect_special_ids()

    # -- construction -------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` (by its ``.json`` suffix) or a SentencePiece model."""
        path = os.fspath(path)
        if path.endswith(".json"):
            return cls(_TokenizersBackend(path))
        return cls(_SentencePieceBackend(path))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a checkpoint directory: ``tokenizer.model`` (preferred) or ``tokenizer.json``,
        plus ``tokenizer_config.json``, ``special_tokens_map.json``,
        ``generation_config.json`` and ``chat_template.jinja`` when present."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise TokenizerError(f"{path}: not a directory")
        backend = cls._backend_in_dir(path)
        config_path = os.path.join(path, TOKENIZER_CONFIG_FILE)
        tokenizer_config = _read_json(config_path)
        chat_template = _chat_template_from_config(tokenizer_config, config_path)
        if chat_template is None:
            chat_template = _read_text(os.path.join(path, CHAT_TEMPLATE_FILE))
        return cls(
            backend,
            tokenizer_config=tokenizer_config,
            special_tokens_map=_read_json(os.path.join(path, SPECIAL_TOKENS_MAP_FILE)),
            generation_config=_read_json(os.path.join(path, GENERATION_CONFIG_FILE)),
            chat_template=chat_template,
        )

    @staticmethod
    def _backend_in_dir(path: str) -> _SentencePieceBackend | _TokenizersBackend:
        """The backend for the tokenizer file found in directory ``path``."""
        sp_path = os.path.join(path, SENTENCEPIECE_FILE)
        if os.path.isfile(sp_path):
            return _SentencePieceBackend(sp_path)
        json_path = os.path.join(path, TOKENIZERS_FILE)
        if os.path.isfile(json_path):
            return _TokenizersBackend(json_path)
        raise TokenizerError(
            f"{path}: no tokenizer file (expected {SENTENCEPIECE_FILE} or {TOKENIZERS_FILE})"
        )

    def _resolve_id(self, piece: str, generation_value: Any, name: str) -> int:
        """Id of a special token: its piece in the vocabulary, else generation_config,
        else Gemma's."""
        piece_id = self._backend.piece_to_id(piece)
        if piece_id is not None:
            return piece_id
        generation_ids = _id_list(generation_value)
        if generation_ids:
            return generation_ids[0]
        return DEFAULT_IDS[name]

    def _collect_special_ids(self) -> frozenset[int]:
        """Ids dropped by ``decode(skip_special=True)``: the model's control tokens and the
        present pad/eos/bos/turn markers.  ``<unk>`` is kept so unknown text stays visible."""
        named = {self._ids[name] for name, present in self._present.items() if present}
        return frozenset((named | self._backend.control_ids) - {self.unk_id})

    # -- vocabulary ---------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return self._backend.vocab_size

    def _special_id(name: str):
        return property(
            lambda self: self._ids[name],
            doc=f"Id of ``{DEFAULT_PIECES[name]}`` (as the tokenizer files say).",
        )

    pad_id = _special_id("pad")
    eos_id = _special_id("eos")
    bos_id = _special_id("bos")
    unk_id = _special_id("unk")
    start_of_turn_id = _special_id("start_of_turn")
    end_of_turn_id = _special_id("end_of_turn")
    del _special_id

    @property
    def bos_token(self) -> str:
        """Text of the BOS token, as written in chat prompts."""
        return self._piece_names["bos"]

    @property
    def eos_token(self) -> str:
        """Text of the EOS token."""
        return self._piece_names["eos"]

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS, ``<end_of_turn>`` when the vocabulary has it, and
        any EOS ids listed in generation_config.json."""
        stop = {self.eos_id} | self._generation_eos_ids
        if self._present["end_of_turn"]:
            stop.add(self.end_of_turn_id)
        return frozenset(stop)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that ``decode(skip_special=True)`` leaves out."""
        return self._special_ids

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a piece/token string, or None if the vocabulary lacks it."""
        return self._backend.piece_to_id(piece)

    def id_to_piece(self, token_id: int) -> str:
        """The piece/token string of ``token_id``."""
        return self._backend.id_to_piece(self._checked_ids([token_id])[0])

    # -- encode / decode ----------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS first when ``add_bos``.

        Special tokens written literally (``<bos>``, ``<start_of_turn>``...) become
        their single ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        return [self.bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; with ``skip_special`` the ids in :attr:`special_ids` are left out.

        Byte pieces that do not form valid UTF-8 decode to U+FFFD.
        """
        ids = self._checked_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self._backend.decode(ids)

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as a list of ints, each within the vocabulary."""
        ids = [int(i) for i in ids]
        size = self.vocab_size
        for i in ids:
            if not 0 <= i < size:
                raise TokenizerError(f"token id {i} is out of range [0, {size})")
        return ids

    def stream_decoder(self, skip_special: bool = True) -> IncrementalDecoder:
        """A fresh :class:`IncrementalDecoder` over this tokenizer."""
        return IncrementalDecoder(self, skip_special=skip_special)

    # -- chat ---------------------------------------------------------------

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The chat prompt for ``messages``: the checkpoint's chat template when it has one,
        else the built-in Gemma format (see :func:`render_chat`)."""
        return render_chat(
            messages,
            add_generation_prompt,
            chat_template=self.chat_template,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of :meth:`render_chat`; the rendered text carries its own ``<bos>``."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)

    def next_turn_ids(self, pending: Sequence[int], text: str) -> list[int]:
        """The ids to feed a live conversation state for one more user turn ``text``.

        ``pending``: the last answer's final token, not yet in the state (see
        ``rgemma.inference.generate``). It is fed first unless it is ``<eos>``;
        the answer is then closed as the chat template closes one (unless the
        pending token already did), and the new turn follows.
        """
        close, turn = next_turn_text(
            text,
            chat_template=self.chat_template,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        ids = [t for t in pending if t != self.eos_id]
        end_piece = self.id_to_piece(self.end_of_turn_id)
        if ids and ids[-1] == self.end_of_turn_id and close.startswith(end_piece):
            close = close[len(end_piece) :]
        return ids + self.encode(close + turn, add_bos=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self._backend.path!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------
# Streaming decode
# ---------------------------------------------------------------------------


class IncrementalDecoder:
    """Decode a stream of token ids into text, a piece at a time.

    :meth:`feed` returns only text that is complete: nothing while byte-fallback
    pieces still form an unfinished UTF-8 character.  The pieces returned by
    :meth:`feed` and :meth:`flush` concatenate to ``tokenizer.decode(all_ids)``.

    It keeps a small window of ids: the ids of the last emitted text (context,
    so that leading-space handling is the same as in a full decode) and the
    ids not yet emitted.  Each step decodes the window and emits what the new
    ids added after the context's text.  Text ending in U+FFFD is held back as
    an unfinished character until the next id or :meth:`flush`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._window: list[int] = []
        self._context_len = 0  # ids at the start of the window already emitted
        self._context_text = ""  # decode(window[:context_len])

    def feed(self, token_id: int) -> str:
        """Add one token id; return the new complete text (possibly "")."""
        self._window.append(int(token_id))
        text = self._decode(self._window)
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(self._context_text):
            return ""  # an unfinished character, or nothing visible yet
        return self._emit(text)

    def flush(self) -> str:
        """Return whatever text is left (an unfinished character as U+FFFD) and reset."""
        text = self._decode(self._window)
        new_text = text[len(self._context_text) :]
        self._window, self._context_len, self._context_text = [], 0, ""
        return new_text

    def _emit(self, text: str) -> str:
        """Return the text after the context and make the new ids the next context."""
        new_text = text[len(self._context_text) :]
        self._window = self._window[self._context_len :]
        self._context_len = len(self._window)
        self._context_text = self._decode(self._window)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens that ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
