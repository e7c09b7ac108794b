"""The demo model bundled with rgemma: a small RecurrentGemma trained by rgemma itself.

    import rgemma.io.demo
    model, tokenizer = rgemma.demo.load()
    print(rgemma.demo.complete(model, tokenizer, "def fibonacci(n):"))

It is a ~6M-parameter Griffin (recurrent, recurrent, attention blocks)
trained for about half an hour on one CPU core on the Python standard
library's own sources; see ``demo/MODEL_CARD.md``. It writes Python-looking
code, nothing more: a working example of the whole pipeline (tokenizer
training, training, export, loading, generation) without downloads.

``scripts/train_demo.sh`` rebuilds it: it runs ``rgemma train``, then
``python -m rgemma.demo install RUN_DIR`` (copies the exported model here and
writes the model card).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import shutil
import sys
from typing import Any

FILES = ("config.json", "model.safetensors", "tokenizer.model", "generation_config.json")
CARD = "MODEL_CARD.md"
SAMPLE_PROMPT = "def fibonacci(n):"


class DemoMissingError(FileNotFoundError):
    """The bundled demo model is not in this installation."""


def _demo_dir():
    return importlib.resources.files("rgemma").joinpath("demo")


def path() -> str:
    """The directory of the bundled demo model (Hugging Face layout).

    Raises DemoMissingError naming the missing files and how to rebuild them.
    """
    directory = _demo_dir()
    missing = [name for name in FILES if not directory.joinpath(name).is_file()]
    if missing:
        raise DemoMissingError(
            f"the bundled demo model is missing from {directory} ({', '.join(missing)} not "
            "found): this rgemma installation was built without its package data. Reinstall "
            "rgemma from a complete source tree, or rebuild the model with "
            "scripts/train_demo.sh (about 30 minutes on a CPU)")
    return os.fspath(directory)


def load(**kwargs):
    """(model, tokenizer) of the demo model; keyword arguments go to ``checkpoint.load``."""
    from rgemma.io import checkpoint
    model, tokenizer = checkpoint.load(path(), **kwargs)
    if tokenizer is None:
        from rgemma.io.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(path())
    return model.eval(), tokenizer


def greedy(model, prompt_ids: list[int], max_new_tokens: int, stop_ids=(),
           temperature: float = 0.0, top_k: int = 40, seed: int = 0) -> list[int]:
    """Greedy decoding (or top-k sampling at ``temperature`` > 0, seeded) with the
    model's state: one prefill call, then one token per call."""
    import torch
    out: list[int] = []
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tokens = torch.tensor([prompt_ids])
        logits, state = model(tokens, torch.arange(len(prompt_ids))[None], logits="last")
        position = len(prompt_ids)
        for _ in range(max_new_tokens):
            if temperature > 0:
                top = torch.topk(logits[0].float() / temperature, top_k)
                pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)
                token = int(top.indices[pick])
            else:
                token = int(logits[0].argmax())
            if token in stop_ids:
                break
            out.append(token)
            logits, state = model(torch.tensor([[token]]), torch.tensor([[position]]), state,
                                  logits="last")
            position += 1
    return out


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0) -> str:
    """The prompt followed by its continuation (greedy unless ``temperature`` > 0;
    stops at ``<eos>``)."""
    ids = greedy(model, tokenizer.encode(prompt, add_bos=True), max_new_tokens,
                 stop_ids=tokenizer.stop_ids, temperature=temperature, seed=seed)
    return prompt + tokenizer.decode(ids)


# --------------------------------------------------------------------------
# Installing a trained run as the bundled model
# --------------------------------------------------------------------------

def _latest_train_config(run_dir: str) -> dict[str, Any]:
    import glob

    import torch
    ckpts = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step-*.pt")))
    if not ckpts:
        return {}
    return torch.load(ckpts[-1], map_location="cpu", weights_only=False)["train_config"]


def _corpus_bytes(cfg: dict[str, Any]) -> dict[str, int]:
    """Files and bytes of the corpus, train and held-out, as the run split them."""
    from rgemma.training import data
    files = data.find_files(cfg["data"], extensions=tuple(cfg["extensions"]),
                            exclude=cfg["exclude"])
    out = {"files": 0, "bytes": 0, "train_files": 0, "train_bytes": 0, "eval_files": 0,
           "eval_bytes": 0}
    for p, name in files:
        size = os.path.getsize(p)
        part = "eval" if data.is_held_out(name, cfg["eval_fraction"]) else "train"
        out["files"] += 1
        out["bytes"] += size
        out[f"{part}_files"] += 1
        out[f"{part}_bytes"] += size
    return out


def _command_of(cfg: dict[str, Any]) -> str:
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "scripts",
                           "train_demo.sh")) as f:
        return f.read()


def model_card(run_dir: str, sample: str, sampled: str) -> str:
    """MODEL_CARD.md text from a run folder's summary, data stats and metrics."""
    import torch

    from rgemma.training.train import read_metrics
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
    size = sum(os.path.getsize(os.path.join(run_dir, "model", n)) for n in FILES
               if os.path.exists(os.path.join(run_dir, "model", n)))
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
        f"- files: {', '.join(FILES)} (Hugging Face layout, float32), {size / 2**20:.1f} MiB",
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
        _command_of(cfg).strip(),
        "```",
        "",
        f"- {summary['step']} steps of {cfg.get('batch_size', '?')} x {cfg.get('seq_len', '?')} "
        f"tokens: {summary['tokens']:,} tokens ({epochs:.2f} epochs)",
        f"- AdamW (beta2 {cfg.get('beta2')}, weight decay {cfg.get('weight_decay')}), peak lr "
        f"{cfg.get('lr')}, {cfg.get('warmup')} warmup steps, cosine to "
        f"{cfg.get('min_lr')} x lr, gradient clipping at {cfg.get('clip')}, float32, seed "
        f"{cfg.get('seed')}",
        f"- wall time: {summary['elapsed'] / 60:.1f} minutes of training loop (plus about a "
        "minute of tokenizer training and tokenization) on one CPU thread "
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
        import math
        lines.append(f"| unigram baseline (training token frequencies) | {unigram:.3f} | "
                     f"{math.exp(unigram):.1f} |")
    if evals:
        lines += ["", "Held-out loss during training (subset of "
                  f"{cfg.get('eval_tokens', 0):,} tokens): "
                  + ", ".join(f"step {s}: {v:.3f}" for s, v in evals)]
    lines += [
        "",
        "## Sample",
        "",
        f"Greedy completion of `{SAMPLE_PROMPT}` (64 new tokens at most):",
        "",
        "```python",
        sample,
        "```",
        "",
        "Sampled (temperature 0.8, top-k 40, seed 0):",
        "",
        "```python",
        sampled,
        "```",
        "",
        "## Use",
        "",
        "```python",
        "import rgemma.demo",
        "model, tokenizer = rgemma.demo.load()",
        f"print(rgemma.demo.complete(model, tokenizer, {SAMPLE_PROMPT!r}))",
        "```",
        "",
        "## Limitations",
        "",
        f"Trained on {summary['tokens'] / 1e6:.2f} million tokens for "
        f"{summary['elapsed'] / 60:.0f} minutes: it produces",
        "plausible-looking but mostly meaningless code, repeats itself (greedy decoding",
        "loops), and has seen no natural language beyond docstrings and comments. It is a",
        "test fixture and an example, not an assistant.",
        "",
    ]
    return "\n".join(lines)


def install(run_dir: str, dest: str | None = None) -> str:
    """Copies ``run_dir/model`` into the package's demo folder and writes the card."""
    from rgemma.io import checkpoint
    src = os.path.join(run_dir, "model")
    dest = dest or os.fspath(_demo_dir())
    os.makedirs(dest, exist_ok=True)
    for name in FILES:
        shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))
    model, tokenizer = checkpoint.load(dest)
    if tokenizer is None:
        from rgemma.io.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(dest)
    sample = complete(model.eval(), tokenizer, SAMPLE_PROMPT)
    sampled = complete(model, tokenizer, SAMPLE_PROMPT, temperature=0.8, seed=0)
    from rgemma.training.train import plot_metrics
    with open(os.path.join(run_dir, "summary.json")) as f:
        baseline = json.load(f).get("unigram_eval_loss")
    plot_metrics(os.path.join(run_dir, "metrics.jsonl"), os.path.join(dest, "loss.png"), baseline)
    with open(os.path.join(dest, CARD), "w") as f:
        f.write(model_card(run_dir, sample, sampled))
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rgemma.demo",
                                     description="The bundled demo model.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install", help="copy a training run's exported model here + card")
    p.add_argument("run_dir")
    p = sub.add_parser("complete", help="greedy completion of a prompt")
    p.add_argument("prompt", nargs="?", default=SAMPLE_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; else top-k 40 sampling at this temperature")
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("path", help="print the demo model's directory")
    args = parser.parse_args(argv)
    if args.cmd == "install":
        print(install(args.run_dir))
    elif args.cmd == "complete":
        model, tokenizer = load()
        print(complete(model, tokenizer, args.prompt, args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed))
    else:
        try:
            print(path())
        except DemoMissingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
