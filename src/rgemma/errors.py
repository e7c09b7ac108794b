"""How rgemma words an error for a person: one line, whatever the exception held."""

from __future__ import annotations


def one_line(e: BaseException, limit: int | None = None) -> str:
    """The exception's message on one line (its type's name if it has none), cut to
    ``limit`` characters (ending in "...") when given."""
    text = " ".join(str(e).split()) or type(e).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
