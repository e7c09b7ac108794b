"""``rgemma generate PROMPT``: stream a completion to stdout; save and continue states."""

from __future__ import annotations

import os
import sys

from rgemma.cli.common import (
    CLIError,
    add_model_args,
    add_sampling_args,
    check_sampling_args,
    check_writable,
    load_model,
    print_stats,
    read_stdin_text,
    report_error,
    sampling_kwargs,
)


def register(subparsers) -> None:
    """Adds the ``generate`` verb."""
    p = subparsers.add_parser(
        "generate",
        help="generate text from a prompt, streamed to stdout",
        description="Generate text from a prompt (streamed to stdout). "
        "Use - as the prompt to read it from stdin.",
    )
    p.add_argument("prompt", nargs="?", default=None, help="the prompt, or - to read stdin")
    p.add_argument(
        "-p",
        "--prompt",
        dest="prompt_flag",
        default=None,
        metavar="PROMPT",
        help="the prompt (same as the positional argument)",
    )
    add_model_args(p)
    add_sampling_args(p, max_tokens=256)
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap the prompt as one user turn of the chat format",
    )
    p.add_argument(
        "--save-state",
        metavar="FILE",
        default=None,
        help="write the final state (and history) to FILE to continue later",
    )
    p.add_argument(
        "--load-state",
        metavar="FILE",
        default=None,
        help="continue from a state saved with --save-state (or chat's /save); "
        "the prompt is optional then",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print prompt / generation speed and the state size to stderr",
    )
    structured = p.add_mutually_exclusive_group()
    structured.add_argument(
        "--json-schema",
        metavar="FILE",
        default=None,
        help="structured output: the text is JSON valid under the JSON Schema in FILE "
        "(generation stops when the JSON is complete)",
    )
    structured.add_argument(
        "--json", action="store_true", help="structured output: the text is a JSON object"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    """``rgemma generate``: returns the exit status."""
    try:
        return _generate(args)
    except CLIError as e:
        return report_error("generate", e)


def _read_prompt(args) -> str | None:
    """The prompt text; None when there is none and a loaded state is continued."""
    if args.prompt is not None and args.prompt_flag is not None:
        raise CLIError("give the prompt once (positional or --prompt)", 2)
    prompt = args.prompt if args.prompt is not None else args.prompt_flag
    if prompt == "-":
        prompt = read_stdin_text("the prompt")
    if prompt is None or (args.load_state and not prompt.strip()):
        if args.load_state:
            return None  # continue the saved state as it is
        raise CLIError("no prompt given (pass PROMPT, or - to read stdin)", 2)
    if not prompt.strip():
        raise CLIError("the prompt is empty" if not prompt else "the prompt is only whitespace", 2)
    return prompt


def _grammar_spec(args):
    """The structured-output spec of ``--json`` / ``--json-schema`` (None without them),
    read and checked before the model loads."""
    from rgemma.inference.structured import (
        StructuredOutputError,
        json_object_spec,
        json_schema_spec,
    )

    if args.json:
        return json_object_spec()
    path = args.json_schema
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CLIError(f"--json-schema {path}: no such file", 2) from None
    except UnicodeDecodeError as e:
        raise CLIError(f"--json-schema {path}: not UTF-8 text ({e.reason})", 2) from None
    except OSError as e:
        raise CLIError(f"--json-schema {path}: cannot read it ({e.strerror})", 2) from None
    try:
        return json_schema_spec(text)
    except StructuredOutputError as e:
        raise CLIError(f"--json-schema {path}: {e}", 2) from None


def _generate(args) -> int:
    from rgemma.inference.generate import GenerationError, stream
    from rgemma.inference.sampling import SamplingError
    from rgemma.io.snapshot import Conversation, SnapshotError, load_conversation, save_conversation

    check_sampling_args(args)
    prompt = _read_prompt(args)
    grammar = _grammar_spec(args)
    if args.load_state and not os.path.isfile(args.load_state):
        raise CLIError(f"state file {args.load_state!r} not found")
    if args.save_state:
        check_writable(args.save_state, "--save-state")
    model, tokenizer = load_model(args)

    saved = None
    if args.load_state:
        try:
            saved = load_conversation(args.load_state, model)
        except SnapshotError as e:
            raise CLIError(str(e)) from None
    history = saved.history_ids if saved else []
    ids = list(saved.pending_ids) if saved else []
    if prompt is not None:
        if args.chat_template and saved is not None:  # a new turn after the saved one
            ids = tokenizer.next_turn_ids(saved.pending_ids, prompt)
        elif args.chat_template:
            ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        else:
            ids += tokenizer.encode(prompt, add_bos=saved is None)
    if not ids:
        raise CLIError(f"{args.load_state}: nothing to continue from; give a prompt", 2)
    rng = [saved.rng_state] if saved is not None and args.seed is None else None

    completion = None
    try:
        for delta in stream(
            model,
            tokenizer,
            [ids],
            state=saved.state if saved else None,
            seed=args.seed,
            rng_states=rng,
            context_ids=[history],
            grammar=grammar,
            **sampling_kwargs(args, tokenizer),
        ):
            if delta.text:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            if delta.completion is not None:
                completion = delta.completion
    except (GenerationError, SamplingError) as e:
        raise CLIError(str(e)) from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    if grammar is not None and completion.finish_reason == "length":
        print(
            f"rgemma generate: warning: the output reached --max-tokens {args.max_tokens} "
            "before the JSON was complete, so it is not valid JSON; raise --max-tokens",
            file=sys.stderr,
        )
    if args.save_state:
        save_conversation(
            args.save_state,
            Conversation(
                completion.state,
                history + completion.prompt_ids + completion.token_ids[:-1],
                completion.pending_ids,
                completion.rng_state,
                {"kind": "generate"},
            ),
            model_config=model.config,
        )
    if args.verbose:
        print_stats(completion.stats)
    return 0
