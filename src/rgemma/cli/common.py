"""What the verbs share: the model and sampling flags, loading, and one-line errors.

Nothing heavy is imported at module level: ``rgemma --help`` builds every
verb's parser without importing torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from rgemma.dtypes import DTYPE_NAMES
from rgemma.errors import one_line


class CLIError(Exception):
    """A problem reported as one line ``rgemma VERB: error: ...`` (exit status ``code``)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def report_error(verb: str, e: BaseException, code: int | None = None) -> int:
    """Prints ``rgemma VERB: error: ...`` on one line; returns the exit status."""
    print(f"rgemma {verb}: error: {one_line(e)}", file=sys.stderr)
    return code if code is not None else getattr(e, "code", 1)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (default 0: one per physical core); 1 is often fastest "
        "for small models or on a busy machine",
    )


def physical_cores() -> int:
    """Physical cores of this machine (hyper-threads share a core's arithmetic units)."""
    pairs, physical = set(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (s.strip() for s in line.partition(":"))
                if key == "physical id":
                    physical = value
                elif key == "core id":
                    pairs.add((physical, value))
    except OSError:
        pass
    return len(pairs) or os.cpu_count() or 1


def set_threads(args) -> None:
    """Applies ``--threads`` (0: one per physical core; CLIError for a negative count)."""
    threads = getattr(args, "threads", 0) or 0
    if threads < 0:
        raise CLIError(f"--threads must be >= 0, got {threads}", 2)
    import torch

    torch.set_num_threads(threads or physical_cores())


def read_stdin_text(what: str) -> str:
    """Standard input as UTF-8 text; CLIError naming the first bad byte otherwise."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(
            f"{what} read from stdin is not UTF-8 text (byte 0x{data[e.start]:02x} "
            f"at offset {e.start}); convert it first, e.g. iconv -t UTF-8",
            2,
        ) from None


def check_writable(path: str, flag: str) -> None:
    """CLIError now, before any work, if ``path`` cannot be written later."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path}: is a directory; give a file name", 2)
    if not os.path.isdir(directory):
        raise CLIError(f"{flag} {path}: the directory {directory} does not exist", 2)
    if not os.access(directory, os.W_OK):
        raise CLIError(f"{flag} {path}: the directory {directory} is not writable", 2)


def resolve_device(device: str | None) -> str:
    """``--device`` (default: cuda if available, else cpu), checked against this PyTorch."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device!r} is not a device; use cpu or cuda", 2) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CLIError(
            f"--device {device}: this PyTorch has no CUDA device (a CPU-only build, "
            "or no GPU visible); use --device cpu",
            2,
        )
    return device


def add_model_args(p: argparse.ArgumentParser, model_help: str | None = None) -> None:
    """The flags of every verb that loads a model: what to load, how, and where it runs."""
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help=model_help
        or "checkpoint: a Hugging Face directory, an official .pt "
        "file, an Orbax directory, or a Hugging Face Hub id ORG/NAME "
        "(downloaded into the Hugging Face cache; HF_TOKEN for gated models) "
        "(default: the bundled demo model)",
    )
    p.add_argument(
        "--revision",
        default=None,
        metavar="REV",
        help="with a Hub id: the branch, tag or commit (default: main)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="parameter dtype (default: the checkpoint's)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="tokenizer directory or file (tokenizer.model / tokenizer.json), for "
        "a checkpoint without one beside it (default: the checkpoint's)",
    )
    p.add_argument(
        "--quantize",
        type=int,
        choices=[8, 4],
        default=None,
        help="quantize the weights to int8 / int4 at load time (CPU decode reads "
        "2-4x fewer bytes per token; with --compile, int4 is the fastest)",
    )
    p.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="activation dtype (default: float32 on the CPU for bfloat16 / float16 "
        "weights, which stay held in their dtype; else the weights' dtype)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_threads_arg(p)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument(
        "-m",
        "--max-tokens",
        type=int,
        default=max_tokens,
        help=f"maximum tokens to generate (default {max_tokens})",
    )
    # Unset sampling flags take the checkpoint's generation_config.json, else greedy.
    model_default = "default: the model's generation_config.json, else"
    p.add_argument(
        "--temp", type=float, default=None, help=f"temperature; 0 = greedy ({model_default} 0)"
    )
    p.add_argument(
        "--top-k", type=int, default=None, help=f"top-k sampling; 0 = off ({model_default} 0)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help=f"nucleus sampling, in (0, 1]; 1 = off ({model_default} 1)",
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=None,
        help=f"min-p sampling, in [0, 1]; 0 = off ({model_default} 0)",
    )
    p.add_argument("--repeat-penalty", "--repetition-penalty", dest="repeat_penalty",
                   type=float, default=None,
                   help=f"CTRL repetition penalty (> 0); 1 = off ({model_default} 1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop string (repeatable); cut from the output",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step: the first tokens wait for the compiler "
        "(a minute or more), then small models decode several times faster",
    )


_SAMPLING_ARGS = {  # SamplingParams field -> (flag, argparse dest)
    "temperature": ("--temp", "temp"),
    "top_k": ("--top-k", "top_k"),
    "top_p": ("--top-p", "top_p"),
    "min_p": ("--min-p", "min_p"),
    "repetition_penalty": ("--repeat-penalty", "repeat_penalty"),
}


def _given_sampling(args) -> dict:
    """The sampling flags given on the command line, as SamplingParams fields."""
    given = {name: getattr(args, dest) for name, (_, dest) in _SAMPLING_ARGS.items()}
    return {name: value for name, value in given.items() if value is not None}


def check_sampling_args(args) -> None:
    """Raises CLIError (exit 2) for out-of-range sampling flags."""
    from rgemma.inference.sampling import SamplingError, SamplingParams

    if getattr(args, "threads", 0) < 0:
        raise CLIError(f"--threads must be >= 0, got {args.threads}", 2)
    if args.max_tokens <= 0:
        raise CLIError(f"--max-tokens must be > 0, got {args.max_tokens}", 2)
    try:
        SamplingParams(**_given_sampling(args))
    except SamplingError as e:
        msg = str(e)
        for name, (flag, _) in _SAMPLING_ARGS.items():
            if msg.startswith(name + " "):
                msg = flag + msg[len(name) :]
                break
        raise CLIError(msg, 2) from None
    if any(not s for s in args.stop):
        raise CLIError("--stop needs a non-empty string", 2)


def model_sampling_defaults(tokenizer) -> dict:
    """The sampling defaults of the checkpoint's generation_config.json (read with the
    tokenizer); CLIError for out-of-range values."""
    from rgemma.inference.sampling import SamplingError, generation_defaults

    try:
        return generation_defaults(getattr(tokenizer, "generation_config", {}))
    except SamplingError as e:
        raise CLIError(str(e)) from None


def sampling_kwargs(args, tokenizer) -> dict:
    """``rgemma.inference.generate.stream`` keyword arguments: the flags given, else the
    checkpoint's generation_config.json, else greedy."""
    return dict(
        max_new_tokens=args.max_tokens,
        **{**model_sampling_defaults(tokenizer), **_given_sampling(args)},
        stop_strings=list(args.stop),
        compile=args.compile,
    )


def resolve_model_path(path: str | None, revision: str | None = None) -> str:
    """``--model`` (a local path, or a Hub id resolved to its cached snapshot) or the
    bundled demo model."""
    if path:
        from rgemma.io import hub

        if hub.is_hub_id(path):
            try:
                return hub.snapshot(path, revision)
            except hub.HubError as e:
                raise CLIError(str(e)) from None
        if revision is not None:
            raise CLIError(f"--revision needs a Hugging Face Hub id as --model, not {path!r}", 2)
        return path
    from rgemma.io import demo

    try:
        return demo.path()
    except OSError as e:  # demo.DemoMissingError is a FileNotFoundError
        raise CLIError(
            f"no --model given and the bundled demo model is unavailable "
            f"({one_line(e)}); pass --model PATH (a Hugging Face RecurrentGemma "
            "directory)"
        ) from None


def load_model(args):
    """(model, tokenizer) for ``--model`` / ``--dtype`` / ``--compute-dtype`` / ``--device`` /
    ``--quantize`` / ``--threads``; CLIError on failure."""
    import torch

    from rgemma.dtypes import as_dtype
    from rgemma.io import checkpoint

    path = resolve_model_path(getattr(args, "model", None), getattr(args, "revision", None))
    if not os.path.exists(path):
        raise CLIError(
            f"model {path!r} not found: pass --model PATH to a checkpoint directory or file"
        )
    set_threads(args)
    device = resolve_device(getattr(args, "device", None))
    try:
        model, tokenizer = checkpoint.load(
            path,
            dtype=as_dtype(getattr(args, "dtype", None)),
            device=device,
            quantize=getattr(args, "quantize", None),
        )
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise CLIError(f"cannot load model {path!r}: {one_line(e)}") from None
    if getattr(args, "tokenizer", None):
        tokenizer = _load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise CLIError(
            f"{path}: no tokenizer (tokenizer.model or tokenizer.json) next to "
            "the checkpoint; pass --tokenizer PATH"
        )
    compute_dtype = getattr(args, "compute_dtype", None)
    if compute_dtype:
        model.set_compute_dtype(as_dtype(compute_dtype))
    elif model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16):
        # half-width weights, float32 activations: what rgemma's CPU kernels and the
        # step plan take (the weights are widened exactly in registers)
        model.set_compute_dtype(torch.float32)
    return model, tokenizer


def _load_tokenizer(path: str):
    """The tokenizer at ``path`` (a directory or a tokenizer.model / tokenizer.json file)."""
    from rgemma.io.tokenizer import Tokenizer

    try:
        return Tokenizer.from_dir(path) if os.path.isdir(path) else Tokenizer.from_file(path)
    except (ValueError, OSError) as e:
        raise CLIError(f"--tokenizer {path}: {one_line(e)}") from None


def print_stats(stats, file=None) -> None:
    """Speed and state size of a generation (``GenerationStats``), on stderr."""
    file = file or sys.stderr
    print("=" * 10, file=file)
    print(f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec", file=file)
    print(
        f"Generation: {stats.generated_tokens} tokens, {stats.decode_tps:.3f} tokens-per-sec",
        file=file,
    )
    if stats.compile_seconds:
        print(
            f"Compile: {stats.compile_seconds:.1f} s (the first decode step; not in the "
            "tokens-per-sec)",
            file=file,
        )
    print(f"State: {stats.state_nbytes / 1e6:.3f} MB (fixed, whatever the length)", file=file)
