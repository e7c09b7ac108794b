"""How rgemma words an error for a person: one line, whatever the exception held."""

from __future__ import annotations


def one_line(e: BaseException) -> str:
    """The exception's message on one line (its type's name if it has none)."""
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())
