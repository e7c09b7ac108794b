"""``rgemma chat``: a multi-turn chat in the terminal (or through a pipe) on a live state.

Commands: /save FILE, /load FILE, /reset, /help, /quit. Ctrl-C during an
answer ends that answer (the state stays consistent); Ctrl-D / EOF exits.
When stdin is not a terminal there are no prompts: one turn per line, the
answers on stdout (one per turn, followed by a newline), messages on stderr.
"""

from __future__ import annotations

import signal
import sys

from rgemma.cli.common import (
    CLIError,
    add_model_args,
    add_sampling_args,
    check_sampling_args,
    load_model,
    print_stats,
    report_error,
    sampling_kwargs,
)

HELP = """commands:
  /save FILE   save the conversation state (continue it later with /load)
  /load FILE   continue a conversation saved with /save
  /reset       start a new conversation
  /help        this help
  /quit        exit (also Ctrl-D)
Ctrl-C stops the current answer."""


def register(subparsers) -> None:
    """Adds the ``chat`` verb."""
    p = subparsers.add_parser(
        "chat",
        help="interactive multi-turn chat (Gemma chat format)",
        description="Chat with the model. Each turn is fed on top of the live state. "
        "Commands: /save FILE, /load FILE, /reset, /help, /quit.",
    )
    add_model_args(p)
    add_sampling_args(p, max_tokens=512)
    p.add_argument("--system", default=None, help="system text, put in the first user turn")
    p.add_argument(
        "--load-state",
        metavar="FILE",
        default=None,
        help="continue a conversation saved with /save",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print speed and state size after each answer (stderr)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    """``rgemma chat``: returns the exit status."""
    from rgemma.inference.chat import ChatSession
    from rgemma.io.snapshot import SnapshotError

    try:
        check_sampling_args(args)
        model, tokenizer = load_model(args)
        session = ChatSession(
            model,
            tokenizer,
            sampling=sampling_kwargs(args, tokenizer),
            seed=args.seed,
            system=args.system,
        )
        if args.load_state:
            session.load(args.load_state)
    except (CLIError, SnapshotError) as e:
        return report_error("chat", e)
    return Repl(session, verbose=args.verbose).loop()


class Repl:
    """The read-answer loop (terminal or pipe)."""

    def __init__(self, session, *, verbose: bool = False, stdin=None, stdout=None, stderr=None):
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
                    self.say(
                        f"(loaded {arg}: {self.session.num_tokens} tokens, "
                        f"{len(self.session.messages) // 2} turns)"
                    )
            else:
                raise CLIError(f"unknown command {name}; /help lists them")
        except (CLIError, ValueError) as e:  # SnapshotError, GenerationError
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
        except ValueError as e:  # GenerationError, ChatTemplateError
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
    except ValueError:  # not the main thread
        return None


def _restore_sigint(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
