"""A multi-turn conversation on a live, fixed-size state.

Each turn feeds ONLY the new tokens on top of the state (the history is never
re-prefilled), in the tokenizer's chat format (Gemma's by default):

    <bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n
    ... the model answers until <end_of_turn> (or <eos>) ...
    <end_of_turn>\\n<start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n

After an answer, the state holds everything but the answer's last token
(``pending``, see ``rgemma.inference.generate``). The next turn starts by
closing the answer (``Tokenizer.next_turn_ids``): the pending token unless it
is ``<eos>``, then the end of turn as the template writes it (unless the
pending token was it), then the new user turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from rgemma.inference.generate import Delta, GenerationError, stream


class ChatSession:
    """A conversation on a live State.

    Args:
      model, tokenizer: the model and its tokenizer.
      sampling: keyword arguments for ``rgemma.inference.generate.stream``
        (max_new_tokens, temperature, top_k, ...).
      seed: seeds the first answer's sampling; later answers continue the
        same generator.
      system: optional system text, folded into the first user turn.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        sampling: dict | None = None,
        seed: int | None = None,
        system: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = dict(sampling or {})
        self.seed = seed
        self.system = system
        self.stop_ids = sorted(
            set(tokenizer.stop_ids) | {tokenizer.eos_id, tokenizer.end_of_turn_id}
        )
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation."""
        self.state = None
        self.pending: list[int] = []  # the last answer's token not yet in the state
        self.history_ids: list[int] = []  # every token in the state, in order
        self.messages: list[dict] = []
        self.rng_state = None
        self.last = None  # the last Completion

    @property
    def num_tokens(self) -> int:
        return 0 if self.state is None else int(self.state.num_tokens[0])

    def turn_ids(self, text: str) -> list[int]:
        """The tokens that a new user turn feeds on top of the state."""
        if self.state is None:
            messages = [{"role": "user", "content": text}]
            if self.system:
                messages.insert(0, {"role": "system", "content": self.system})
            return self.tokenizer.encode_chat(messages)
        return self.tokenizer.next_turn_ids(self.pending, text)

    def ask(self, text: str, should_stop: Callable[[], bool] | None = None) -> Iterator[Delta]:
        """Streams the model's answer to ``text``; updates the conversation at the end."""
        ids = self.turn_ids(text)
        context = self.history_ids
        last = None
        for delta in stream(
            self.model,
            self.tokenizer,
            [ids],
            state=self.state,
            seed=self.seed,
            rng_states=[self.rng_state],
            context_ids=[context],
            stop_token_ids=self.stop_ids,
            should_stop=should_stop,
            add_bos=False,
            **self.sampling,
        ):
            if delta.completion is not None:
                last = delta.completion
            yield delta
        self.state, self.last = last.state, last
        self.history_ids = context + ids + last.token_ids[:-1]
        self.pending = last.pending_ids
        self.rng_state = last.rng_state
        self.messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": last.text},
        ]

    def save(self, path: str) -> None:
        """Writes the conversation (state, ids, messages) to ``path``."""
        from rgemma.io.snapshot import Conversation, save_conversation

        if self.state is None:
            raise GenerationError("nothing to save yet: the conversation is empty")
        save_conversation(
            path,
            Conversation(
                self.state,
                self.history_ids,
                self.pending,
                self.rng_state,
                {"kind": "chat", "messages": self.messages, "system": self.system},
            ),
            model_config=self.model.config,
        )

    def load(self, path: str) -> None:
        """Continues a conversation saved by ``save`` (or ``rgemma generate --save-state``)."""
        from rgemma.io.snapshot import load_conversation

        saved = load_conversation(path, self.model)
        self.reset()
        self.state, self.pending, self.history_ids = (
            saved.state,
            saved.pending_ids,
            saved.history_ids,
        )
        self.messages = list(saved.extra.get("messages", []))
        self.system = saved.extra.get("system", self.system)
        self.rng_state = saved.rng_state
