"""OpenAI response bodies and stream chunks built from engine Events.

One :class:`ResponseFormatter` per HTTP request follows the Events of its
engine requests: ``apply`` updates the choices and returns what a stream
chunk should carry; ``response`` is the whole body of a non-streamed request.
Streams are Server-Sent Events (:class:`EventStream`, :func:`sse`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

from starlette.responses import StreamingResponse

from rgemma.inference.engine import ERROR, PROMPT


class TokenTexts:
    """Token id -> its text (for logprobs), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}  # at most one entry per vocabulary id

    def text(self, token_id: int) -> str:
        s = self._texts.get(token_id)
        if s is None:
            s = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special=False)
        return s

    def offsets(self, ids: list[int]) -> list[int]:
        """Character offset of each token in the (skip-special) decoded text of ``ids``."""
        decoder = self.tokenizer.stream_decoder()
        out, at = [], 0
        for t in ids:
            out.append(at)
            at += len(decoder.feed(t))
        return out


@dataclasses.dataclass
class _Choice:
    """One choice of the response as it builds up."""

    index: int
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    lp_tokens: list = dataclasses.field(default_factory=list)  # (id, logprob, top, offset)


class ResponseFormatter:
    """Turns engine Events into OpenAI JSON, for one endpoint, streamed or not."""

    def __init__(
        self,
        chat: bool,
        model: str,
        tokens: TokenTexts,
        prompts: list,
        n: int,
        *,
        echo: bool = False,
        logprobs: int | None = None,
        max_tokens: int = 1,
    ):
        self.chat, self.model, self.tok = chat, model, tokens
        self.max_tokens = max_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompts, self.n, self.echo, self.logprobs = prompts, n, echo, logprobs
        self.choices = [_Choice(i) for i in range(len(prompts) * n)]
        self.prompt_tokens = [len(ids) for ids, _ in prompts]
        self.cached_tokens = 0
        self.error: str | None = None
        # Echoed prompts' text offsets, computed here (off the event loop: ~50 ms per 8k
        # tokens) rather than when the prompt's event comes.
        self.prompt_offsets = (
            [tokens.offsets(ids) for ids, _ in prompts]
            if echo and logprobs is not None and not chat
            else None
        )

    # -- events
    def apply(self, p: int, event) -> list[dict]:
        """Updates the choices with ``event`` of prompt ``p``; returns stream chunk choices."""
        if event.kind == ERROR:
            self.error = event.error
            return []
        if event.kind == PROMPT:
            self.cached_tokens += event.cached_tokens
            return self._prompt_chunks(p, event) if (self.echo and not self.chat) else []
        c = self.choices[p * self.n + event.index]
        c.tokens += 1
        before = len(c.text)
        c.text += event.text
        entry = None
        if self.logprobs is not None and not isinstance(event.stop, int):
            entry = (event.token_id, event.logprob, event.top_logprobs, self._offset(p, before))
            c.lp_tokens.append(entry)
        if event.finish_reason:
            c.finish_reason = event.finish_reason
        if not (event.text or entry or event.finish_reason):
            return []
        return [
            self._chunk_choice(c.index, event.text, [entry] if entry else [], event.finish_reason)
        ]

    def _offset(self, p: int, before: int) -> int:
        return before + (len(self.prompts[p][1]) if self.echo else 0)

    def _prompt_chunks(self, p: int, event) -> list[dict]:
        """Echo: the prompt (and its logprobs) as the first text of each of p's choices."""
        ids, text = self.prompts[p]
        entries = []
        if self.logprobs is not None and event.prompt_logprobs is not None:
            offsets = self.prompt_offsets[p] if self.prompt_offsets else self.tok.offsets(ids)
            entries = list(zip(ids, event.prompt_logprobs, event.prompt_top_logprobs, offsets))
        out = []
        for j in range(self.n):
            c = self.choices[p * self.n + j]
            c.lp_tokens = entries + c.lp_tokens
            if self.max_tokens == 0:  # nothing follows the prompt
                c.finish_reason = "length"
            out.append(self._chunk_choice(c.index, text, entries, c.finish_reason))
        return out

    # -- pieces of JSON
    def _chunk_choice(self, index: int, text: str, entries: list, finish: str | None) -> dict:
        if self.chat:
            return {
                "index": index,
                "delta": {"content": text} if text else {},
                "logprobs": self._chat_logprobs(entries) if self.logprobs is not None else None,
                "finish_reason": finish,
            }
        return {
            "index": index,
            "text": text,
            "logprobs": self._legacy_logprobs(entries) if self.logprobs is not None else None,
            "finish_reason": finish,
        }

    def _legacy_logprobs(self, entries: list) -> dict:
        """OpenAI legacy completions logprobs (the sampled token is always in top_logprobs)."""
        tops = []
        for token, lp, top, _ in entries:
            if top is None:
                tops.append(None)
                continue
            d = {self.tok.text(t): v for t, v in top}
            d.setdefault(self.tok.text(token), lp)
            tops.append(d)
        return {
            "tokens": [self.tok.text(t) for t, *_ in entries],
            "token_logprobs": [lp for _, lp, _, _ in entries],
            "top_logprobs": tops,
            "text_offset": [o for *_, o in entries],
        }

    def _chat_logprobs(self, entries: list) -> dict:
        def item(t: int, lp: float) -> dict:
            s = self.tok.text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {
            "content": [
                {**item(t, lp), "top_logprobs": [item(a, b) for a, b in top or []]}
                for t, lp, top, _ in entries
            ]
        }

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens)
        done = sum(c.tokens for c in self.choices)
        usage = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    def role_chunk(self) -> dict:
        return self.chunk(
            [
                {
                    "index": c.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for c in self.choices
            ]
        )

    def response(self) -> dict:
        """The whole (non-streamed) response."""
        choices = []
        for c in self.choices:
            p = c.index // self.n
            entries = c.lp_tokens
            if self.chat:
                choices.append(
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": self._chat_logprobs(entries)
                        if self.logprobs is not None
                        else None,
                        "finish_reason": c.finish_reason,
                    }
                )
            else:
                text = (self.prompts[p][1] if self.echo else "") + c.text
                choices.append(
                    {
                        "index": c.index,
                        "text": text,
                        "logprobs": self._legacy_logprobs(entries)
                        if self.logprobs is not None
                        else None,
                        "finish_reason": c.finish_reason,
                    }
                )
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }


class EventStream(StreamingResponse):
    """A Server-Sent Events response that calls ``on_close`` however it ends: done, the
    client gone before or while streaming, or the server stopping."""

    media_type = "text/event-stream"

    def __init__(self, body, on_close):
        super().__init__(body, headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(data: dict | str) -> bytes:
    """One SSE event: ``data: <JSON or text>``."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
