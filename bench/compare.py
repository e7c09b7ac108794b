"""Decode and prefill speed: rgemma vs transformers vs the official recurrentgemma.torch,
on identical random weights, runs interleaved round by round.

    python bench/compare.py --shape 2b --dtype bfloat16            # true 2B shape
    python bench/compare.py --shape demo --peers transformers official
    python bench/compare.py --smoke                                  # seconds, for CI

Systems: ``rgemma`` (weights held in --dtype, multiplied in float32),
``rgemma-int8`` / ``rgemma-int4`` (weight-only quantized), ``transformers``
(RecurrentGemmaForCausalLM in --dtype, driven by its own ``generate``) and
``official`` (recurrentgemma.torch.Griffin with its cache, in --official-dtype).
Prints a table of medians with rgemma/peer ratios; writes JSON and a PNG plot.

Decode is bound by reading the weights: a step of batch B reads every weight
once, so B x (read bandwidth / weight bytes) tok/s is the most a system can
do. The read bandwidth is measured in the same run (CPU: ``x.sum()`` over 1 GiB;
GPU: a device-to-device copy of 1 GiB, bytes read plus written; best of 3) and
each decode row gets the fraction of that bound it reached.
With int8 in the run, a W8A8 quality line follows: the int8 model with every
product forced to W8A8 against the unquantized one (max logit error on the
bench's random weights; held-out perplexity of the demo model on Python files
of an installed third-party package).

Prefill is bound by the products: with ``--floor`` each round also times the
model's linear products alone, in the weights' dtype, at each prefill length
(column "linear products alone"), the prefill speed that no system holding these
weights and multiplying in their dtype can pass.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DTYPES,
    SHAPES,
    Result,
    bar_plot,
    official_from,
    random_rgemma,
    save,
    table,
    timed,
    transformers_from,
)
from rgemma import autotune  # noqa: E402
from rgemma.model import Griffin  # noqa: E402
from rgemma.quantize import Int8Linear, quantize_model, quantized_bytes  # noqa: E402


def quantized_copy(base: Griffin, bits: int) -> Griffin:
    """A quantized model sharing the base model's unquantized tensors (no float copy)."""
    with torch.device("meta"):
        model = Griffin(base.config, dtype=base.dtype)
    model.load_state_dict(base.state_dict(), assign=True)
    return quantize_model(model, bits=bits, group_size=128 if base.config.width % 128 == 0 else 64)


def _compiled_twin(model: Griffin) -> Griffin:
    """The same model (the same modules, weights and tuned paths) with a compiled decode
    step: a shallow copy, so the eager and compiled systems hold the weights once."""
    return copy.copy(model).compile_step()


# ----------------------------------------------------------------- drivers
# Each driver returns (prefill seconds, decode seconds) for a greedy run of
# `new` tokens after a prompt of shape [B, T].


def drive_rgemma(model: Griffin, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    B, T = prompt.shape
    state = model.init_state(B)
    out = {}

    def prefill():
        positions = torch.arange(T, device=prompt.device).expand(B, T)
        out["logits"], _ = model(prompt, positions, state, logits="last")

    def decode():
        logits = out["logits"]
        pos = torch.full((B, 1), T, device=prompt.device)
        for _ in range(new):
            tok = logits.argmax(-1, keepdim=True)
            logits, _ = model(tok, pos, state, logits="last")
            pos += 1

    with torch.inference_mode():
        return timed(prefill), timed(decode)


def drive_transformers(hf, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        one = timed(lambda: hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs))
        full = timed(
            lambda: hf.generate(prompt, max_new_tokens=new + 1, min_new_tokens=new + 1, **kwargs)
        )
    return one, max(full - one, 1e-9)


def drive_official(om, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    B, T = prompt.shape
    out = {}

    def prefill():
        out["logits"], out["cache"] = om(prompt, torch.arange(T, device=prompt.device).expand(B, T))

    def decode():
        logits, cache = out["logits"][:, -1], out["cache"]
        for i in range(new):
            tok = logits.argmax(-1, keepdim=True)
            logits, cache = om(tok, torch.full((B, 1), T + i, device=prompt.device), cache)
            logits = logits[:, -1]

    with torch.inference_mode():
        return timed(prefill), timed(decode)


# ------------------------------------------------------- the memory bound
def read_bandwidth(gib: float = 1.0, device: str = "cpu") -> float:
    """Bytes per second memory moves, best of 3: on the CPU what summing a large
    float32 tensor reads; on a GPU what copying one reads plus writes (its HBM
    rate, the ceiling a GPU decode step's weight reads are held to)."""
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    if device == "cpu":
        return x.numel() * 4 / min(timed(lambda: x.sum()) for _ in range(3))
    y = torch.empty_like(x)
    copies = 10  # one copy is well under a millisecond: time several, after a warm-up
    y.copy_(x)
    seconds = min(timed(lambda: [y.copy_(x) for _ in range(copies)]) for _ in range(3))
    return 2 * x.numel() * 4 * copies / seconds


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight once (the tied table serves the logits)."""
    if isinstance(model, Griffin):
        return quantized_bytes(model)
    params = {p.data_ptr(): p for p in model.parameters()}  # tied weights once
    return sum(p.numel() * p.element_size() for p in params.values())


def bound_table(results: list[Result], systems: dict, bandwidth: float) -> str:
    """Per decode row and system: measured tok/s over B x bandwidth / weight bytes."""
    lines = [
        f"read bandwidth: {bandwidth / 1e9:.1f} GB/s; fraction of the memory bound "
        "(B x bandwidth / weight bytes) reached by each decode row:"
    ]
    for r in results:
        if not r.metric.startswith("decode") or r.system not in systems:
            continue
        B = int(r.metric.split("b=")[1].split()[0])
        bound = B * bandwidth / weight_bytes(systems[r.system][1])
        lines.append(
            f"  {r.system:28s} {r.metric:22s} {r.median:9.2f} tok/s of {bound:9.2f}"
            f"  = {r.median / bound:6.1%}"
        )
    return "\n".join(lines)


FLOOR = "linear products alone"


def product_seconds(base: Griffin, T: int) -> float:
    """Seconds the model's linear products take alone for a prefill of T tokens, each
    [T, in] x [in, out] in the weights' dtype: what any system holding these weights and
    multiplying in their dtype spends at least (RG-LRU's small block products and
    attention left out)."""
    import torch.nn.functional as F

    from rgemma.layers import Linear

    weights = [m.weight for m in base.modules() if isinstance(m, Linear)]
    inputs = {w.shape[1]: torch.randn(T, w.shape[1]).to(w.dtype) for w in weights}

    def products():
        for w in weights:
            F.linear(inputs[w.shape[1]], w)  # each result freed at once, as in a forward

    with torch.inference_mode():
        products()  # warm-up: first calls (oneDNN primitives, first-touched pages)
        return timed(products)


def w8a8_quality(base: Griffin, int8: Griffin) -> str:
    """The int8 model with every product forced to W8A8, against the float model."""
    forced = {}
    for m in int8.modules():
        if isinstance(m, Int8Linear):
            forced[m] = m.paths
            m.paths = {b: "w8a8" for b in autotune.ROW_BUCKETS}
    prompt = torch.randint(
        3, base.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)
    )
    positions = torch.arange(64)[None]
    with torch.inference_mode():
        ref, _ = base(prompt, positions)
        out, _ = int8(prompt, positions)
    for m, paths in forced.items():
        m.paths = paths
    err = (out.float() - ref.float()).abs().max().item()
    return (
        f"W8A8 quality: max |logit error| {err:.4f} on random weights (logits up to "
        f"{ref.abs().max().item():.1f}); {demo_perplexity_delta()}"
    )


def demo_perplexity_delta(max_files: int = 8) -> str:
    """Held-out perplexity of the demo model, float vs int8 forced to W8A8, on Python files
    of an installed third-party package (not in the demo's training data)."""
    import importlib.util
    from pathlib import Path

    from rgemma.evaluation.perplexity import score_texts
    from rgemma.io import demo

    spec = importlib.util.find_spec("jinja2")
    files = sorted(Path(spec.origin).parent.glob("*.py"))[:max_files]
    texts = [(f.name, f.read_text()) for f in files]
    model, tok = demo.load()
    model.set_compute_dtype(torch.float32)
    with torch.inference_mode():
        ref = score_texts(model, tok, texts).total
        int8 = quantize_model(model, bits=8)
        for m in int8.modules():
            if isinstance(m, Int8Linear):
                m.paths = {b: "w8a8" for b in autotune.ROW_BUCKETS}
        q = score_texts(int8, tok, texts).total
    return (
        f"demo perplexity on {len(texts)} jinja2 files ({ref.tokens} tokens): "
        f"{ref.perplexity:.3f} float, {q.perplexity:.3f} W8A8 "
        f"({q.perplexity / ref.perplexity - 1:+.2%})"
    )


# ------------------------------------------------------------------- main


def build_systems(args, cfg):
    dtype, device = DTYPES[args.dtype], args.device
    base = random_rgemma(cfg, dtype)
    # CPU: multiply in float32 whatever the weights are held in; GPU: in their dtype
    base.set_compute_dtype(torch.float32 if device == "cpu" else None)
    systems = {"rgemma": (drive_rgemma, base)}
    for bits in args.quantize:
        systems[f"rgemma-int{bits}"] = (drive_rgemma, quantized_copy(base, bits))
    if args.compile:
        compiled = _compiled_twin(base)
        if device == "cuda":
            compiled.capture_step()  # and replayed as CUDA graphs
        systems["rgemma-compiled"] = (drive_rgemma, compiled)
        for bits in args.quantize:
            eager = systems[f"rgemma-int{bits}"][1]
            systems[f"rgemma-int{bits}-compiled"] = (drive_rgemma, _compiled_twin(eager))
    if "transformers" in args.peers:
        systems["transformers"] = (drive_transformers, transformers_from(base, dtype))
    if "official" in args.peers:
        systems["official"] = (drive_official, official_from(base, DTYPES[args.official_dtype]))
    return {name: (drive, model.to(device)) for name, (drive, model) in systems.items()}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="dtype the weights are held in (rgemma multiplies in float32)",
    )
    p.add_argument("--official-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument(
        "--peers",
        nargs="*",
        default=["transformers", "official"],
        choices=["transformers", "official"],
    )
    p.add_argument("--quantize", nargs="*", type=int, default=[8, 4], choices=[8, 4])
    p.add_argument(
        "--compile",
        action="store_true",
        help="add rgemma-compiled and rgemma-intN-compiled (torch.compile'd decode "
        "step, on CUDA replayed as CUDA graphs; compile time excluded)",
    )
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument(
        "--contexts",
        nargs="+",
        type=int,
        default=[16, 4096],
        help="prompt lengths before the decode measurement",
    )
    p.add_argument(
        "--prefill",
        nargs="+",
        type=int,
        default=[256, 1024, 4096],
        help="prompt lengths for the prefill measurement (batch 1)",
    )
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: every system on the GPU, rgemma multiplying in --dtype",
    )
    p.add_argument("--out", default="bench/results/compare")
    p.add_argument(
        "--floor",
        action="store_true",
        help=f"also time, each round, the model's linear products alone at each prefill "
        f"length (column '{FLOOR}'): the prefill speed no system multiplying in the "
        "weights' dtype can pass",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shape, a few tokens (CI)")
    args = p.parse_args()
    if args.smoke:
        args.shape, args.batches, args.contexts, args.prefill = "tiny", [1, 2], [8], [32]
        args.new_tokens, args.rounds = 4, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SHAPES[args.shape]()
    systems = build_systems(args, cfg)
    bandwidth = read_bandwidth(0.05 if args.smoke else 1.0, args.device)
    print(f"shape {args.shape}, weights {args.dtype}, systems {list(systems)}", flush=True)

    for drive, model in systems.values():  # warm-up (and compile), not timed
        for B in args.batches:
            drive(model, torch.randint(3, cfg.vocab_size, (B, 8), device=args.device), 2)
    samples: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, (drive, model) in systems.items():  # interleaved: drift hits all alike
            for T in args.prefill:
                prompt = torch.randint(3, cfg.vocab_size, (1, T), device=args.device)
                pre, _ = drive(model, prompt, 1)
                samples.setdefault((name, f"prefill T={T}", "tok/s"), []).append(T / pre)
            for ctx in args.contexts:
                for B in args.batches:
                    prompt = torch.randint(3, cfg.vocab_size, (B, ctx), device=args.device)
                    _, dec = drive(model, prompt, args.new_tokens)
                    samples.setdefault((name, f"decode b={B} ctx={ctx}", "tok/s"), []).append(
                        B * args.new_tokens / dec
                    )
            print(f"round {r + 1}/{args.rounds}: {name} done", flush=True)
        for T in args.prefill if args.floor else ():
            seconds = product_seconds(systems["rgemma"][1], T)
            samples.setdefault((FLOOR, f"prefill T={T}", "tok/s"), []).append(T / seconds)

    results = [Result(s, m, u, v) for (s, m, u), v in samples.items()]
    print(table(results))
    print(bound_table(results, systems, bandwidth))
    if args.device == "cpu":
        if "rgemma-int8" in systems and not args.smoke:
            print(w8a8_quality(systems["rgemma"][1], systems["rgemma-int8"][1]))
    meta = {
        "shape": args.shape,
        "dtype": args.dtype,
        "official_dtype": args.official_dtype,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "read_bandwidth_gbs": bandwidth / 1e9,
    }
    save(results, args.out + ".json", meta)
    bar_plot(results, args.out + ".png", f"{args.shape} shape, weights {args.dtype} (tok/s)")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
