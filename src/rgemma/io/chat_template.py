"""The chat format: Gemma's turns, or a checkpoint's Jinja2 chat template rendered as
``transformers`` renders it.

``render_chat`` writes a whole conversation; ``next_turn_text`` gives what a
live state needs to go on with one more user turn after a model answer (the
end of the answer, then the new turn), derived from the same template so the
two never disagree.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

BOS, EOS = "<bos>", "<eos>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
CHAT_ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """Chat messages that the chat template cannot render."""


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    *,
    chat_template: str | None = None,
    bos_token: str = BOS,
    eos_token: str = EOS,
) -> str:
    """Render ``messages`` (dicts with "role" and "content") as a prompt string.

    With ``chat_template`` (Jinja2 source, e.g. from tokenizer_config.json) it is
    rendered as ``transformers`` does.  Otherwise the Gemma format is written::

        <bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{text}<end_of_turn>\\n...

    ending with ``<start_of_turn>model\\n`` when ``add_generation_prompt``.  As in
    Gemma's official template, each message's content is stripped of surrounding
    whitespace and "assistant" is written "model".  An optional first "system"
    message is folded into the first user turn as ``system + "\\n\\n" + user``
    (system text verbatim, like Gemma 3's template).  After it, roles must
    alternate user/assistant starting with user.
    """
    if chat_template is not None:
        return _render_template(
            chat_template, messages, add_generation_prompt, bos_token, eos_token
        )
    turns = _gemma_turns(messages)
    parts = [bos_token]
    parts += [f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n" for role, text in turns]
    if add_generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return "".join(parts)


def _gemma_turns(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Validate ``messages`` and return (gemma_role, text) turns, system folded in."""
    _check_messages(messages)
    system = None
    rest = list(enumerate(messages))
    if rest and rest[0][1]["role"] == "system":
        system = rest.pop(0)[1]["content"]
        if not rest:
            raise ChatTemplateError(
                "message 0: a system message must be followed by a user message"
            )
    turns = []
    for position, (index, message) in enumerate(rest):
        role = message["role"]
        if role == "system":
            raise ChatTemplateError(
                f"message {index}: role 'system' is only allowed as the first message"
            )
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise ChatTemplateError(
                f"message {index}: role {role!r} where {expected!r} was expected; "
                "roles must alternate user/assistant/user/... starting with user"
            )
        text = message["content"].strip()
        if system is not None and position == 0:
            text = f"{system}\n\n{text}"
        turns.append(("model" if role == "assistant" else "user", text))
    return turns


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Every message is a mapping with a known role and string content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatTemplateError(f"message {index}: expected a dict with 'role' and 'content'")
        role = message["role"]
        if role not in CHAT_ROLES:
            raise ChatTemplateError(
                f"message {index}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})"
            )
        if not isinstance(message["content"], str):
            raise ChatTemplateError(
                f"message {index} ({role}): content must be a string, "
                f"got {type(message['content']).__name__}"
            )


def _render_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
) -> str:
    """Render a Jinja2 chat template; template errors become ChatTemplateError."""
    import jinja2

    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    try:
        return _compile_template(source).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    """Compile a chat template in a sandboxed Jinja2 environment set up like transformers'."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def _raise_template_exception(message: str):
    """``raise_exception(msg)`` inside a template."""
    import jinja2

    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    """``strftime_now(fmt)`` inside a template: the current local time formatted."""
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """``tojson`` filter without HTML escaping (Jinja's default escapes for HTML)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def next_turn_text(
    text: str, *, chat_template: str | None = None, bos_token: str = BOS, eos_token: str = EOS
) -> tuple[str, str]:
    """(close, turn): the text that ends a model answer, and the user turn ``text``
    followed by the generation prompt, as the template writes them after an answer.

    Found by rendering a conversation with placeholder contents twice, with
    and without the new turn; a template that does not extend the shorter
    rendering (one that rewrites earlier turns) cannot continue a live state.
    """
    user, answer = "\x00user\x00", "\x00answer\x00"
    kw = dict(chat_template=chat_template, bos_token=bos_token, eos_token=eos_token)
    before = render_chat(
        [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], False, **kw
    )
    after = render_chat(
        [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": text},
        ],
        True,
        **kw,
    )
    if not after.startswith(before) or answer not in before:
        raise ChatTemplateError(
            "the chat template rewrites earlier turns when a turn is added, "
            "so a conversation cannot go on from a saved state"
        )
    return before[before.index(answer) + len(answer) :], after[len(before) :]
