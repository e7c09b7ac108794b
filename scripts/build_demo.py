"""Installs a training run as rgemma's bundled demo model and writes its model card.

    python scripts/build_demo.py RUN_DIR [--dest DIR]

``scripts/train_demo.sh`` runs it after ``rgemma train``. It copies the
exported ``RUN_DIR/model`` into ``src/rgemma/demo/`` (or DIR), plots the
run's losses there (``loss.png``) and writes ``MODEL_CARD.md`` from the
run's summary, data statistics and metrics. The card's samples come from
``rgemma.inference.generate.generate`` called with the arguments that the
``rgemma generate`` command printed beside each sample parses to, so that
command reproduces it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
from typing import Any

from rgemma.io import demo

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_PROMPT = "def fibonacci(n):"
# The demo's sampling defaults, written into its generation_config.json (read as
# transformers reads it). A 14M model decoding greedily soon repeats itself; on prompts
# of Python code, sampling at 0.7 with a mild repetition penalty repeated the fewest
# 4-grams among the settings tried (the closing note of the demo issue has the figures).
GENERATION_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.7,
    "top_k": 40,
    "top_p": 0.95,
    "repetition_penalty": 1.1,
}
# (caption, rgemma generate's flags); the prompt follows the flags
SAMPLES = (
    (
        "The model's defaults (generation_config.json), seed 0",
        ["--device", "cpu", "--max-tokens", "64", "--seed", "0"],
    ),
    (
        "Greedy (--temp 0; the default repetition penalty 1.1 still applies)",
        ["--device", "cpu", "--max-tokens", "64", "--temp", "0"],
    ),
)


# --------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------


def generate_argv(flags: list[str], prompt: str, model_dir: str) -> list[str]:
    """``rgemma generate``'s arguments for a sample of the model in ``model_dir``
    (no ``--model`` for the bundled one: it is the default)."""
    bundled = os.path.realpath(model_dir) == os.path.realpath(os.fspath(demo._demo_dir()))
    return (["--model", model_dir] if not bundled else []) + flags + [prompt]


def run_generate(argv: list[str]) -> str:
    """The text ``rgemma generate ARGV`` prints (less its final newline).

    The verb's own parser reads ARGV (so its defaults apply); the model is
    loaded and the prompt encoded as the verb does.
    """
    from rgemma.cli import build_parser
    from rgemma.cli.common import check_sampling_args, load_model, sampling_kwargs
    from rgemma.inference.generate import generate

    args = build_parser().parse_args(["generate", *argv])
    check_sampling_args(args)
    model, tokenizer = load_model(args)
    ids = tokenizer.encode(args.prompt, add_bos=True)
    [completion] = generate(
        model, tokenizer, [ids], seed=args.seed, **sampling_kwargs(args, tokenizer)
    )
    return completion.text


def sample_lines(model_dir: str) -> list[str]:
    """The card's "Sample" section: each sample beside the command that reproduces it."""
    lines = [
        "## Sample",
        "",
        "`rgemma generate` prints the continuation; below, each follows its prompt.",
        "",
    ]
    for caption, flags in SAMPLES:
        argv = generate_argv(flags, SAMPLE_PROMPT, model_dir)
        text = run_generate(argv)
        lines += [
            f"{caption}:",
            "",
            "```sh",
            shlex.join(["rgemma", "generate", *argv]),
            "```",
            "",
            "```python",
            SAMPLE_PROMPT + text,
            "```",
            "",
        ]
    return lines


USE_LINES = [
    "## Use",
    "",
    "The demo model is the default `--model` of every `rgemma` verb:",
    "",
    "```sh",
    f"rgemma generate {shlex.quote(SAMPLE_PROMPT)}",
    "```",
    "",
    "```python",
    "from rgemma.inference.generate import generate",
    "from rgemma.io import demo",
    "",
    "model, tokenizer = demo.load()",
    f"print(generate(model, tokenizer, [{json.dumps(SAMPLE_PROMPT)}], max_new_tokens=64)[0].text)",
    "```",
    "",
]


# --------------------------------------------------------------------------
# What the run did
# --------------------------------------------------------------------------


def _latest_train_config(run_dir: str) -> dict[str, Any]:
    """The ``TrainConfig`` (a dict) of the run's latest checkpoint ({} without one)."""
    from rgemma.training import checkpoints

    found = checkpoints.list_checkpoints(run_dir)
    return checkpoints.read_checkpoint(found[-1])["train_config"] if found else {}


def _split_files(cfg: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """The corpus's (path, name) files as the run split them: {"train": ..., "eval": ...}."""
    from rgemma.io.documents import find_files
    from rgemma.training.data import is_held_out

    files = find_files(cfg["data"], extensions=tuple(cfg["extensions"]), exclude=cfg["exclude"])
    split: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
    for path, name in files:
        split["eval" if is_held_out(name, cfg["eval_fraction"]) else "train"].append((path, name))
    return split


def _corpus_bytes(cfg: dict[str, Any]) -> dict[str, int]:
    """Files and bytes of the corpus, train and held-out, as the run split them."""
    out = {"files": 0, "bytes": 0}
    for part, files in _split_files(cfg).items():
        out[f"{part}_files"] = len(files)
        out[f"{part}_bytes"] = sum(os.path.getsize(path) for path, _ in files)
        out["files"] += out[f"{part}_files"]
        out["bytes"] += out[f"{part}_bytes"]
    return out


THIRD_PARTY = ("httpx", "click", "jinja2")  # Python sources the model never saw


def bits_per_byte(model, tokenizer, files: list[tuple[str, str]]) -> tuple[float, int]:
    """(bits per byte, bytes) of the model on ``files`` ((path, name) pairs), scored as
    ``rgemma perplexity`` scores them: each file one document."""
    from rgemma.evaluation.perplexity import score_texts
    from rgemma.io.documents import read_documents

    docs, _ = read_documents(files)
    total = score_texts(model, tokenizer, [(d.name, d.text) for d in docs]).total
    return total.bits_per_byte, total.bytes


def third_party_files(packages: tuple[str, ...]) -> tuple[list[tuple[str, str]], list[str]]:
    """The .py files of the installed ``packages`` found, and "name version" of each."""
    import importlib.util
    from importlib import metadata

    from rgemma.io.documents import find_files

    files, found = [], []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = list(spec.submodule_search_locations)[0]
        files += [(p, f"{name}/{n}") for p, n in find_files([root], extensions=(".py",))]
        found.append(f"{name} {metadata.version(name)}")
    return files, found


def _command_of() -> str:
    """The training command, as the card quotes it: train_demo.sh itself."""
    with open(os.path.join(HERE, "train_demo.sh")) as f:
        return f.read()


def model_card(run_dir: str, model_dir: str) -> str:
    """MODEL_CARD.md text from a run folder's summary, data stats and metrics, with
    samples of the model installed in ``model_dir``."""
    import torch

    from rgemma.training.checkpoints import read_metrics

    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "data_stats.json")) as f:
        stats = json.load(f)
    cfg = summary.get("train_config") or _latest_train_config(run_dir)
    corpus = _corpus_bytes(cfg) if cfg else {}
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    mc = stats["model_config"]
    blocks = mc["block_types"]
    size = sum(os.path.getsize(os.path.join(model_dir, n)) for n in demo.FILES)
    unigram = summary.get("unigram_eval_loss")
    lines = [
        "# rgemma demo model",
        "",
        "A small RecurrentGemma (Griffin) model that rgemma trained itself, shipped so that",
        "loading and generation work without any download. It completes Python code in the",
        "style of the standard library; it knows nothing else and is not useful for real work.",
        "",
        "## Model",
        "",
        f"- architecture: Griffin / RecurrentGemma, {len(blocks)} residual blocks "
        f"({', '.join(b[:3] for b in blocks)}), width {mc['width']}, RG-LRU width "
        f"{mc['lru_width']}, MLP width {mc['mlp_width']}, {mc['num_heads']} heads "
        f"(head_dim {mc['width'] // mc['num_heads']}, one K/V head), local attention window "
        f"{mc['attention_window']}, logits soft-cap {mc['logits_soft_cap']}",
        f"- parameters: {stats['model_parameters']:,} (embeddings tied)",
        f"- tokenizer: SentencePiece BPE, {stats['vocab_size']} pieces, trained on the training "
        "files only; Gemma's special ids (pad 0, eos 1, bos 2, unk 3, `<start_of_turn>` 106, "
        "`<end_of_turn>` 107), byte fallback, whitespace kept verbatim",
        f"- files: {', '.join(demo.FILES)} (Hugging Face layout, weights in "
        f"{_weights_dtype(model_dir)}), {size / 2**20:.1f} MiB",
        "",
        "## Training data",
        "",
        f"The `.py` files of the CPython {platform.python_version()} standard library "
        "(Python Software Foundation License), without the test suites (`test/`, `tests/`, "
        "`idle_test/`), the codec tables (`encodings/`) and `pydoc_data/`.",
        "",
    ]
    if corpus:
        lines += [
            f"- {corpus['files']} files, {corpus['bytes']:,} bytes",
            f"- training: {corpus['train_files']} files, {corpus['train_bytes']:,} bytes, "
            f"{stats['train_tokens']:,} tokens",
            f"- held out (5% of the files, chosen by a hash of their path): "
            f"{corpus['eval_files']} files, {corpus['eval_bytes']:,} bytes, "
            f"{stats['eval_tokens']:,} tokens",
        ]
    epochs = summary["tokens"] / stats["train_tokens"]
    lines += [
        "",
        "## Training",
        "",
        "Exactly this command (`scripts/train_demo.sh`, run with the venv's python):",
        "",
        "```sh",
        _command_of().strip(),
        "```",
        "",
        f"- {summary['step']} steps of {cfg.get('batch_size', '?')} x {cfg.get('seq_len', '?')} "
        f"tokens: {summary['tokens']:,} tokens ({epochs:.2f} epochs)",
        f"- AdamW (beta2 {cfg.get('beta2')}, weight decay {cfg.get('weight_decay')}), peak lr "
        f"{cfg.get('lr')}, {cfg.get('warmup')} warmup steps, cosine to "
        f"{cfg.get('min_lr')} x lr, gradient clipping at {cfg.get('clip')}, float32, seed "
        f"{cfg.get('seed')}",
        f"- wall time: {summary['elapsed'] / 60:.1f} minutes of training loop (plus about a "
        f"minute of tokenizer training and tokenization) on {cfg.get('threads') or 1} CPU "
        "thread(s) "
        f"({platform.machine()}, a 2-core machine shared with other jobs; Python "
        f"{platform.python_version()}, torch {torch.__version__})",
        "",
        "![training and held-out loss](loss.png)",
        "",
        "## Evaluation (held-out files)",
        "",
        f"All {stats['eval_tokens']:,} held-out tokens (each file is one document, "
        "cut into rows of the training length):",
        "",
        "| model | loss (nats/token) | perplexity |",
        "|---|---|---|",
        f"| this model | {summary['eval_loss']:.3f} | {summary['eval_perplexity']:.1f} |",
    ]
    if unigram is not None:
        lines.append(
            f"| unigram baseline (training token frequencies) | {unigram:.3f} | "
            f"{math.exp(unigram):.1f} |"
        )
    lines += _bits_per_byte_lines(cfg, model_dir)
    if evals:
        lines += [
            "",
            "Held-out loss during training (subset of "
            f"{cfg.get('eval_tokens', 0):,} tokens): "
            + ", ".join(f"step {s}: {v:.3f}" for s, v in evals),
        ]
    lines += (
        [""]
        + sample_lines(model_dir)
        + USE_LINES
        + [
            "## Limitations",
            "",
            f"Trained on {summary['tokens'] / 1e6:.2f} million tokens for "
            f"{summary['elapsed'] / 60:.0f} minutes: it produces",
            "plausible-looking but mostly meaningless code, repeats itself (greedy decoding",
            "loops), and has seen no natural language beyond docstrings and comments. It is a",
            "test fixture and an example, not an assistant.",
            "",
        ]
    )
    return "\n".join(lines)


def _weights_dtype(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f).get("torch_dtype", "float32")


def _bits_per_byte_lines(cfg: dict[str, Any], model_dir: str) -> list[str]:
    """Bits per byte (``rgemma perplexity``'s measure, comparable across tokenizers)
    on the held-out files and on installed third-party packages' sources."""
    from rgemma.io import checkpoint

    model, tokenizer = checkpoint.load(model_dir)
    rows = []
    if cfg:
        bpb, n = bits_per_byte(model, tokenizer, _split_files(cfg)["eval"])
        rows.append(f"| held-out standard library files | {n:,} | {bpb:.3f} |")
    files, found = third_party_files(THIRD_PARTY)
    if files:
        bpb, n = bits_per_byte(model, tokenizer, files)
        rows.append(f"| third-party Python it never saw ({', '.join(found)}) | {n:,} | {bpb:.3f} |")
    if not rows:
        return []
    return [
        "",
        "Bits per byte (`rgemma perplexity DIR`, each file one document):",
        "",
        "| text | bytes | bits per byte |",
        "|---|---|---|",
        *rows,
    ]


def write_generation_defaults(path: str) -> None:
    """Adds GENERATION_DEFAULTS to the exported generation_config.json (token ids kept)."""
    with open(path) as f:
        config = json.load(f)
    config.update(GENERATION_DEFAULTS)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def install(run_dir: str, dest: str | None = None) -> str:
    """Copies ``run_dir/model`` into ``dest`` (default: the package's demo folder),
    plots the losses there and writes the model card; returns ``dest``."""
    from rgemma.training.checkpoints import plot_metrics

    dest = dest or os.fspath(demo._demo_dir())
    os.makedirs(dest, exist_ok=True)
    for name in demo.FILES:
        shutil.copyfile(os.path.join(run_dir, "model", name), os.path.join(dest, name))
    write_generation_defaults(os.path.join(dest, "generation_config.json"))
    with open(os.path.join(run_dir, "summary.json")) as f:
        baseline = json.load(f).get("unigram_eval_loss")
    plot_metrics(os.path.join(run_dir, "metrics.jsonl"), os.path.join(dest, "loss.png"), baseline)
    card = model_card(run_dir, dest)  # all of it first: a failure leaves the old card
    tmp = os.path.join(dest, demo.CARD + ".tmp")
    with open(tmp, "w") as f:
        f.write(card)
    os.replace(tmp, os.path.join(dest, demo.CARD))
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/build_demo.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", help="the --out folder of the demo's `rgemma train` run")
    parser.add_argument(
        "--dest",
        default=None,
        help="where to install (default: the package's demo folder, "
        "src/rgemma/demo in a source checkout)",
    )
    args = parser.parse_args(argv)
    try:
        print(install(args.run_dir, args.dest))
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # ResumeError: a bad checkpoint
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"build_demo: error: {text}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
