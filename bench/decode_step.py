"""The eager CPU decode step with rgemma's native step kernels on and off, interleaved.

    python bench/decode_step.py --shape 2b --systems bf16 int8 int4 --batches 1 16
    python bench/decode_step.py --shape 2b --systems int8 --batches 1 --off plan
    python bench/decode_step.py --smoke                               # seconds, for CI

"On" is the default: a recurrent block's conv / RG-LRU / gelu gate, local
attention's step after its projections and RMSNorm each one native call
(``kernels.recurrent_step``, ``kernels.attention_step``, ``kernels.rms_norm``),
and the step's native calls prepared once (``rgemma.step_plan``). "Off" runs
the same steps as PyTorch ops through the modules (the products are the same
either way); with ``--off plan``, through the modules with the native kernels.
Each round times both, per system and batch, after a 16-token prompt; the
table gives the best median step of the rounds, the on/off ratio, and the
fraction of the memory bound (B x read bandwidth / weight bytes) reached.

A second table says where an "on" step's time goes: the native products (and
the rate at which they read their weights), the native step kernels, and the
rest (PyTorch's ops and Python), each call timed by a wrapper.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, random_rgemma, write_json  # noqa: E402
from compare import quantized_copy, read_bandwidth, weight_bytes  # noqa: E402
from rgemma import attention, kernels, layers, quantize, step_plan  # noqa: E402

PROMPT = 16


def set_native(on: bool, off: str = "native") -> None:
    """Everything on, or ``off``: "native" (the step kernels and the plan) or "plan" only."""
    step_plan.ENABLED = on
    if off == "plan":
        on = True
    layers.FUSED_RECURRENT_STEP = on
    layers.NATIVE_NORM_ROWS = 16 if on else 0
    attention.NATIVE_STEP = on


def prompted(model, batch: int):
    """(state after a PROMPT-token prompt, the next token [B, 1], its positions [B, 1])."""
    state = model.init_state(batch)
    with torch.inference_mode():
        prompt = torch.zeros(batch, PROMPT, dtype=torch.long)
        model(prompt, torch.arange(PROMPT).expand(batch, PROMPT), state, logits="none")
    return state, torch.zeros(batch, 1, dtype=torch.long), torch.full((batch, 1), PROMPT)


def median_step(model, batch: int, steps: int) -> float:
    """Median seconds of a decode step after a PROMPT-token prompt."""
    state, token, position = prompted(model, batch)
    with torch.inference_mode():
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            model(token, position, state, logits="last")
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t0)
            position += 1
    return sorted(times)[len(times) // 2]


def step_models(shape: str, systems: list[str]) -> dict:
    """{system: model} on the same random weights: "bf16" held in bf16, "int8" / "int4"
    quantized copies; each computing in float32."""
    base = random_rgemma(SHAPES[shape](), torch.bfloat16).set_compute_dtype(torch.float32)
    return {s: base if s == "bf16" else quantized_copy(base, int(s[3:])) for s in systems}


PRODUCTS = ("int8_matmul", "int4_matmul", "bf16_matmul")
STEP_KERNELS = ("recurrent_step", "attention_step", "rms_norm")


class TimedLibrary:
    """kernels' native library with every product and step kernel call timed (a step plan
    binds these functions when it is built, so this is installed before)."""

    def __init__(self, lib, parts: dict[str, float]):
        self._lib, self._parts = lib, parts

    def __getattr__(self, name: str):
        fn = getattr(self._lib, name)
        kernel = name.removeprefix("rgemma_")
        kind = "products" if kernel in PRODUCTS else "kernels" if kernel in STEP_KERNELS else None
        if kind is None:
            return fn

        def timed(*args):
            t0 = time.perf_counter()
            fn(*args)
            self._parts[kind] += time.perf_counter() - t0

        return timed


def product_bytes(model, batch: int) -> int:
    """Bytes of the weights the step's native products read at ``batch`` rows: each linear
    layer whose ``native_into`` binds a native call (what a step plan binds), and a bf16
    embedding table where the logits stream it (a quantized table is such a layer)."""
    total = 0
    with torch.inference_mode():
        for module in model.modules():
            if isinstance(module, (layers.Linear, quantize.Int8Linear, quantize.Int4Linear)):
                x = torch.zeros(batch, module.in_features)
                if module.native_into(x, torch.zeros(batch, module.out_features)) is not None:
                    total += sum(t.numel() * t.element_size() for t in module.state_dict().values())
        table = model.embed_tokens
        if isinstance(table, layers.Embedding):
            x = torch.zeros(batch, table.embedding_dim)
            if layers._streams_bf16(x, table.weight[: layers.VOCAB_BLOCK], batch):
                total += table.weight.numel() * table.weight.element_size()
    return total


def step_parts(model, batch: int, steps: int) -> dict[str, float]:
    """Seconds per decode step (after the prompt and two warm-up steps): in all, in the
    native products, in the native step kernels; and the products' weight bytes."""
    parts = dict(step=0.0, products=0.0, kernels=0.0)
    lib, plans = kernels._lib, step_plan.PLANS
    state, token, position = prompted(model, batch)
    try:
        kernels._lib, step_plan.PLANS = TimedLibrary(lib, parts), step_plan.Plans()
        with torch.inference_mode():
            for _ in range(2):
                model(token, position, state, logits="last")
            parts.update(products=0.0, kernels=0.0)
            t0 = time.perf_counter()
            for _ in range(steps):
                model(token, position, state, logits="last")
            parts["step"] = time.perf_counter() - t0
    finally:
        kernels._lib, step_plan.PLANS = lib, plans
    out = {k: v / steps for k, v in parts.items()}
    out["weight_bytes"] = product_bytes(model, batch)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    p.add_argument("--systems", nargs="+", default=["bf16", "int8", "int4"],
                   choices=["bf16", "int8", "int4"])  # fmt: skip
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="bench/results/decode_step", help="writes OUT.json")
    p.add_argument("--off", choices=["native", "plan"], default="native",
                   help='what "off" turns off: the native step kernels and the plan, or '
                        "the plan only (the modules' step, with the kernels)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny shape, a few steps (CI)")
    args = p.parse_args()
    if args.smoke:
        args.shape, args.batches, args.steps, args.rounds = "tiny", [1, 2], 2, 1
    torch.set_num_threads(args.threads)
    models = step_models(args.shape, args.systems)
    best: dict[tuple[str, int, bool], float] = {}
    bandwidth = 0.0
    for r in range(args.rounds):
        bandwidth = max(bandwidth, read_bandwidth())
        for name, model in models.items():
            for batch in args.batches:
                for on in (False, True):
                    set_native(on, args.off)
                    t = median_step(model, batch, args.steps)
                    key = (name, batch, on)
                    best[key] = min(best.get(key, t), t)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    set_native(True)
    print(f"\n{args.shape} shape, {args.threads} threads; x.sum() read {bandwidth / 1e9:.1f} GB/s")
    print(f"| system | batch | {args.off} off (tok/s) | on (tok/s) | on / off | on: bound |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, model in models.items():
        for batch in args.batches:
            off, on = best[(name, batch, False)], best[(name, batch, True)]
            bound = weight_bytes(model) / bandwidth / on  # (batch / on) / (batch * bw / bytes)
            rows.append(dict(system=name, batch=batch, off_tok_s=batch / off,
                             on_tok_s=batch / on, bound_fraction=bound))  # fmt: skip
            print(f"| {name} | {batch} | {batch / off:.2f} | {batch / on:.2f} | "
                  f"{off / on:.2f}x | {bound:.0%} |")  # fmt: skip
    parts = []
    print('\nWhere an "on" step\'s time goes (ms a step):')
    print("| system | batch | step | native products | their weights read at | "
          "native step kernels | the rest |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, model in models.items():
        for batch in args.batches:
            p = step_parts(model, batch, args.steps)
            rest = p["step"] - p["products"] - p["kernels"]
            parts.append(dict(system=name, batch=batch, **p))
            print(f"| {name} | {batch} | {p['step'] * 1e3:.1f} | {p['products'] * 1e3:.1f} | "
                  f"{p['weight_bytes'] / max(p['products'], 1e-9) / 1e9:.1f} GB/s | "
                  f"{p['kernels'] * 1e3:.1f} | {rest * 1e3:.1f} |")  # fmt: skip
    meta = dict(shape=args.shape, threads=args.threads, read_bandwidth_gbs=bandwidth / 1e9)
    write_json(args.out + ".json", {"meta": meta, "results": rows, "parts": parts})


if __name__ == "__main__":
    main()
