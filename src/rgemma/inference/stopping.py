"""When a row of generation ends: the one stop checker every generation path uses.

A row ends at a stop token, at a stop string (which may span several
tokens, and is never shown), at its token limit, or when its grammar
(structured output) has terminated. ``StopChecker`` decides
it, token by token, and hands back the text that may be shown so far:
whole UTF-8 characters only, with text that could still become a stop
string held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

FINISH_STOP = "stop"


FINISH_LENGTH = "length"


FINISH_INTERRUPTED = "interrupted"


class TextStream:
    """The text of one row, a token at a time: whole UTF-8 characters only, and
    text that could be the start of a stop string held back until it is known
    not to be one; a stop string found (even across tokens) ends the text there.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.stop_strings = [s for s in stop_strings if s]
        self.held = ""
        self.stopped_on: str | None = None

    def push(self, token_id: int) -> str:
        """New safe text after ``token_id``; sets ``stopped_on`` if a stop string appeared."""
        return self._scan(self.decoder.feed(token_id))

    def finish(self) -> str:
        """The text still held or buffered (at the end of the row)."""
        text = self._scan(self.decoder.flush())
        if self.stopped_on is None:
            text, self.held = text + self.held, ""
        return text

    def _scan(self, new: str) -> str:
        if self.stopped_on is not None:
            return ""
        buf = self.held + new
        found = [(buf.find(s), s) for s in self.stop_strings if s in buf]
        if found:
            at, self.stopped_on = min(found)
            self.held = ""
            return buf[:at]
        keep = _longest_stop_prefix_suffix(buf, self.stop_strings)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class StopChecker:
    """The stop decision for one row.

    Args:
      tokenizer: decodes the row's tokens (``stream_decoder``).
      stop_ids: token ids that end the row (the token is kept in the ids, its
        text is not shown).
      stop_strings: strings that end the row; cut from the text.
      max_tokens: tokens the row may generate.
      grammar: a ``structured.GrammarMatcher`` the row's tokens must follow: ``add``
        feeds it each token (raising ``StructuredOutputError`` for one it rejects)
        and ends the row once it has terminated (the text is complete and a stop
        token closed it), whatever ``stop_ids`` say.
    After ``add`` returns, ``finish_reason`` is None while the row goes on,
    else FINISH_STOP / FINISH_LENGTH (``stop``: the stop id or string).
    """

    def __init__(
        self,
        tokenizer,
        stop_ids: frozenset[int],
        stop_strings: Sequence[str],
        max_tokens: int,
        grammar=None,
    ):
        self.text = TextStream(tokenizer, stop_strings)
        self.grammar = grammar
        self.stop_ids = stop_ids
        self.max_tokens = max_tokens
        self.count = 0
        self.finish_reason: str | None = None
        self.stop: str | int | None = None

    def add(self, token: int) -> str:
        """Records a generated token; returns the text it lets through (may be "")."""
        self.count += 1
        if self.grammar is not None:
            self.grammar.accept(token)
        if token in self.stop_ids or (self.grammar is not None and self.grammar.is_terminated()):
            self.finish_reason, self.stop = FINISH_STOP, token
            return self.text.finish()
        text = self.text.push(token)
        if self.text.stopped_on is not None:
            self.finish_reason, self.stop = FINISH_STOP, self.text.stopped_on
        elif self.count >= self.max_tokens:
            self.finish_reason = FINISH_LENGTH
            text += self.text.finish()
        return text

    def interrupt(self) -> str:
        """Ends the row from outside (Ctrl-C); returns the text still held back."""
        self.finish_reason = FINISH_INTERRUPTED
        return self.text.finish()
