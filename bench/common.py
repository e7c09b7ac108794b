"""Shared pieces of the benchmarks: identical random weights in every system,
timing helpers, tables, JSON and plots. Benchmarks are run by hand; they are
not tests (``--smoke`` only checks that they still run)."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rgemma.config import GriffinConfig
from rgemma.model import Griffin

SHAPES = {
    "2b": lambda: GriffinConfig.from_preset("recurrentgemma-2b"),
    "demo": lambda: _demo_config(),
    "tiny": lambda: GriffinConfig(
        vocab_size=512,
        width=128,
        mlp_width=384,
        num_heads=2,
        block_types=("recurrent", "recurrent", "attention") * 2,
        attention_window=64,
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _demo_config() -> GriffinConfig:
    from rgemma.io import demo
    from rgemma.io.files import read_config

    return read_config(os.path.join(demo.path(), "config.json"))


def random_rgemma(cfg: GriffinConfig, dtype: torch.dtype, seed: int = 0) -> Griffin:
    """The reference weights of a run: rgemma's init (+ noise on zero tensors), built
    directly in ``dtype`` layer by layer (no float32 copy of a 2B model)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Griffin(cfg, dtype=dtype)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1] if p.ndim > 1 else cfg.width
            p.copy_(torch.randn(p.shape, dtype=torch.float32).mul_(fan_in**-0.5).to(dtype))
            if "recurrent_param" in name:
                p.copy_(torch.full(p.shape, 2.0, dtype=dtype))
    return model.eval()


def transformers_from(model: Griffin, dtype: torch.dtype):
    """transformers' RecurrentGemmaForCausalLM holding the same weights."""
    import transformers

    from rgemma import weights

    cfg = {
        k: v
        for k, v in model.config.to_hf_dict().items()
        if k not in ("model_type", "architectures", "torch_dtype")
    }
    with torch.device("meta"):
        hf = transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(**cfg))
    sd = weights.add_hf_prefix({k: v.to(dtype) for k, v in model.state_dict().items()})
    hf.load_state_dict(sd, strict=False, assign=True)
    hf.lm_head.weight = hf.model.embed_tokens.weight
    # buffers built on the meta device (RoPE frequencies, the embedding normalizer): rebuild
    rebuild_rotary_embeddings(hf, "cpu")
    hf.model.normalizer = torch.tensor(model.config.width**0.5, dtype=torch.bfloat16)
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def rebuild_rotary_embeddings(hf, device) -> None:
    """A transformers model built on the meta device has no RoPE frequencies:
    replace each rotary-embedding module by a fresh one on ``device``."""
    for name, module in list(hf.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = name.rpartition(".")
            setattr(hf.get_submodule(parent), attr, type(module)(hf.config).to(device))


def official_from(model: Griffin, dtype: torch.dtype):
    """The official recurrentgemma.torch.Griffin holding the same weights."""
    from recurrentgemma.torch import griffin

    from rgemma import weights

    ocfg = weights.official_config(model.config)
    with torch.device("meta"):
        om = griffin.Griffin(ocfg, gradient_checkpointing=False, dtype=dtype)
    sd = {k: v.to(dtype) for k, v in weights.hf_to_official(model.state_dict()).items()}
    om.load_state_dict(sd, assign=True)
    return om.eval()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of fn() (waiting for the GPU, if one is in use)."""
    gc.collect()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@dataclass
class Result:
    system: str
    metric: str  # e.g. "decode b=1 ctx=16"
    unit: str  # "tok/s"
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def table(results: list[Result], baseline_prefix: str = "rgemma") -> str:
    """Medians per metric and system, with rgemma / peer ratios."""
    metrics = list(dict.fromkeys(r.metric for r in results))
    systems = list(dict.fromkeys(r.system for r in results))
    by = {(r.metric, r.system): r for r in results}
    ours = [s for s in systems if s.startswith(baseline_prefix)]
    peers = [s for s in systems if not s.startswith(baseline_prefix)]
    head = ["metric"] + systems + [f"{o}/{p}" for o in ours for p in peers]
    rows = [head]
    for m in metrics:
        row = [m]
        for s in systems:
            row.append(f"{by[(m, s)].median:.2f}" if (m, s) in by else "-")
        for o in ours:
            for p in peers:
                if (m, o) in by and (m, p) in by and by[(m, p)].median > 0:
                    row.append(f"{by[(m, o)].median / by[(m, p)].median:.2f}x")
                else:
                    row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> dict:
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def write_json(path: str, data: dict) -> None:
    """``data`` as JSON at ``path`` (its folder made; complete or absent: a temp file, renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


def save(results: list[Result], path: str, meta: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = {
        "meta": {**machine(), **meta},
        "results": [
            {
                "system": r.system,
                "metric": r.metric,
                "unit": r.unit,
                "median": r.median,
                "samples": r.samples,
            }
            for r in results
        ],
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def bar_plot(results: list[Result], path: str, title: str) -> None:
    """Grouped bars: one group per metric, one bar per system (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    metrics = list(dict.fromkeys(r.metric for r in results))
    systems = list(dict.fromkeys(r.system for r in results))
    by = {(r.metric, r.system): r.median for r in results}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics)), 4))
    w = 0.8 / len(systems)
    for i, s in enumerate(systems):
        xs = [j + i * w for j, m in enumerate(metrics) if (m, s) in by]
        ys = [by[(m, s)] for m in metrics if (m, s) in by]
        ax.bar(xs, ys, width=w, label=s)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(metrics))])
    ax.set_xticklabels(metrics, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(results[0].unit)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
