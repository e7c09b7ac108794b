"""`rgemma chat`: multi-turn chat on a live, fixed-size state.

Each turn feeds ONLY the new tokens on top of the state (the history is never
re-prefilled), in the Gemma chat format:

    <bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n
    ... the model answers until <end_of_turn> (or <eos>) ...
    <end_of_turn>\\n<start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n

After an answer, the state holds everything but the answer's last token
(``pending``, see ``rgemma.generate``). The next turn starts by closing the
answer: the pending token if it was ``<end_of_turn>`` or a content token (cut
by the length limit or Ctrl-C) followed by ``<end_of_turn>``, never ``<eos>``
(replaced by ``<end_of_turn>``); then ``\\n`` and the new user turn.

Commands: /save FILE, /load FILE, /reset, /help, /quit. Ctrl-C during an
answer ends that answer (the state stays consistent); Ctrl-D / EOF exits.
When stdin is not a terminal there are no prompts: one turn per line, the
answers on stdout (one per turn, followed by a newline), messages on stderr.
"""

from __future__ import annotations

import signal
import sys
from typing import Callable, Iterator

from .generate import (CLIError, Delta, GenerationError, add_model_args, add_sampling_args,
                       check_sampling_args, close_answer_ids, load_model, print_stats,
                       report_error, sampling_kwargs, stream, user_turn_ids)

HELP = """commands:
  /save FILE   save the conversation state (continue it later with /load)
  /load FILE   continue a conversation saved with /save
  /reset       start a new conversation
  /help        this help
  /quit        exit (also Ctrl-D)
Ctrl-C stops the current answer."""


class ChatSession:
    """A Gemma-format conversation on a live State.

    Args:
      model, tokenizer: the model and its tokenizer.
      sampling: keyword arguments for ``rgemma.generate.stream`` (max_new_tokens,
        temperature, top_k, ...).
      seed: seeds the first answer's sampling; later answers continue the
        same generator.
      system: optional system text, folded into the first user turn.
    """

    def __init__(self, model, tokenizer, *, sampling: dict | None = None, seed: int | None = None,
                 system: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = dict(sampling or {})
        self.seed = seed
        self.system = system
        self.stop_ids = sorted(set(tokenizer.stop_ids) | {tokenizer.eos_id,
                                                           tokenizer.end_of_turn_id})
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation."""
        self.state = None
        self.pending: list[int] = []       # the last answer's token not yet in the state
        self.history_ids: list[int] = []   # every token in the state, in order
        self.messages: list[dict] = []
        self.rng_state = None
        self.last = None                   # the last Completion

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
        return (close_answer_ids(self.tokenizer, self.pending)
                + user_turn_ids(self.tokenizer, text))

    def ask(self, text: str, should_stop: Callable[[], bool] | None = None) -> Iterator[Delta]:
        """Streams the model's answer to ``text``; updates the conversation at the end."""
        ids = self.turn_ids(text)
        context = self.history_ids
        last = None
        for delta in stream(self.model, self.tokenizer, [ids], state=self.state,
                            seed=self.seed, rng_states=[self.rng_state],
                            context_ids=[context], stop_token_ids=self.stop_ids,
                            should_stop=should_stop, add_bos=False, **self.sampling):
            if delta.completion is not None:
                last = delta.completion
            yield delta
        self.state, self.last = last.state, last
        self.history_ids = context + ids + last.token_ids[:-1]
        self.pending = last.pending_ids
        self.rng_state = last.rng_state
        self.messages += [{"role": "user", "content": text},
                          {"role": "assistant", "content": last.text}]

    def save(self, path: str) -> None:
        from .snapshot import save_state
        if self.state is None:
            raise CLIError("nothing to save yet: the conversation is empty")
        save_state(path, self.state, model_config=self.model.config,
                   rng_states=[self.rng_state],
                   extra={"kind": "chat", "messages": self.messages,
                          "token_ids": self.history_ids + self.pending,
                          "pending_ids": self.pending, "system": self.system})

    def load(self, path: str) -> None:
        from .snapshot import SnapshotError, load_state
        try:
            state, meta = load_state(path, self.model)
        except SnapshotError as e:
            raise CLIError(str(e)) from None
        if state.batch_size != 1:
            raise CLIError(f"{path}: holds {state.batch_size} conversations, chat continues one")
        pending = [int(t) for t in meta.get("pending_ids", [])]
        history = [int(t) for t in meta.get("token_ids", [])]
        self.reset()
        self.state, self.pending = state, pending
        self.history_ids = history[:len(history) - len(pending)]
        self.messages = list(meta.get("messages", []))
        self.system = meta.get("system", self.system)
        self.rng_state = (meta.get("rng_states") or [None])[0]


# ======================================================================= CLI
def register(subparsers) -> None:
    """Adds the ``chat`` verb."""
    p = subparsers.add_parser(
        "chat", help="interactive multi-turn chat (Gemma chat format)",
        description="Chat with the model. Each turn is fed on top of the live state. "
                    "Commands: /save FILE, /load FILE, /reset, /help, /quit.")
    add_model_args(p)
    add_sampling_args(p, max_tokens=512)
    p.add_argument("--system", default=None, help="system text, put in the first user turn")
    p.add_argument("--load-state", metavar="FILE", default=None,
                   help="continue a conversation saved with /save")
    p.add_argument("--verbose", action="store_true",
                   help="print speed and state size after each answer (stderr)")
    p.set_defaults(func=run)


def run(args) -> int:
    """``rgemma chat``: returns the exit status."""
    try:
        check_sampling_args(args)
        model, tokenizer = load_model(args)
        session = ChatSession(model, tokenizer, sampling=sampling_kwargs(args), seed=args.seed,
                              system=args.system)
        if args.load_state:
            session.load(args.load_state)
    except CLIError as e:
        return report_error("chat", e)
    return Repl(session, verbose=args.verbose).loop()


class Repl:
    """The read-answer loop (terminal or pipe)."""

    def __init__(self, session: ChatSession, *, verbose: bool = False,
                 stdin=None, stdout=None, stderr=None):
        self.session = session
        self.verbose = verbose
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.tty = self.stdin.isatty()
        self.failed = False
        self._interrupted = False

    def say(self, text: str) -> None:
        """A message for the user: stdout in a terminal, stderr in a pipe."""
        print(text, file=self.stdout if self.tty else self.stderr, flush=True)

    def error(self, text: str) -> None:
        self.failed = True
        print(f"rgemma chat: error: {' '.join(text.split())}", file=self.stderr, flush=True)

    def read(self) -> str | None:
        """The next input line (None at EOF)."""
        if self.tty:
            while True:
                try:
                    return input(">>> ")
                except EOFError:
                    print(file=self.stdout)
                    return None
                except KeyboardInterrupt:
                    print("\n(/quit or Ctrl-D to exit)", file=self.stdout)
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\r\n")

    def loop(self) -> int:
        if self.tty:
            self.say("rgemma chat: /help for commands, Ctrl-D to exit")
        while True:
            line = self.read()
            if line is None:
                break
            if not line.strip():
                continue
            if line.startswith("/"):
                if self.command(line.strip()) == "quit":
                    break
                continue
            self.answer(line)
        return 1 if (self.failed and not self.tty) else 0

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name in ("/quit", "/exit", "/bye"):
                return "quit"
            if name == "/help":
                self.say(HELP)
            elif name == "/reset":
                self.session.reset()
                self.say("(new conversation)")
            elif name in ("/save", "/load"):
                if not arg:
                    raise CLIError(f"{name} needs a file name: {name} FILE")
                if name == "/save":
                    self.session.save(arg)
                    self.say(f"(saved {self.session.num_tokens} tokens of state to {arg})")
                else:
                    self.session.load(arg)
                    self.say(f"(loaded {arg}: {self.session.num_tokens} tokens, "
                             f"{len(self.session.messages) // 2} turns)")
            else:
                raise CLIError(f"unknown command {name}; /help lists them")
        except CLIError as e:
            self.error(str(e))
        except OSError as e:
            self.error(f"{arg}: {e.strerror or e}")
        return None

    def answer(self, text: str) -> None:
        self._interrupted = False
        previous = _install_sigint(self._on_sigint)
        try:
            for delta in self.session.ask(text, should_stop=lambda: self._interrupted):
                if delta.text:
                    self.stdout.write(delta.text)
                    self.stdout.flush()
        except GenerationError as e:
            self.error(str(e))
            return
        finally:
            _restore_sigint(previous)
        self.stdout.write("\n")
        self.stdout.flush()
        if self._interrupted:
            self.say("(answer stopped)")
        if self.verbose and self.session.last is not None:
            print_stats(self.session.last.stats, file=self.stderr)

    def _on_sigint(self, signum, frame) -> None:
        self._interrupted = True


def _install_sigint(handler):
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:          # not the main thread
        return None


def _restore_sigint(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
