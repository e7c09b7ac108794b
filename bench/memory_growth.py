"""Memory and decode speed as the text grows: rgemma's fixed-size state against a
transformer (Gemma) whose KV cache grows with every token.

    python bench/memory_growth.py --shape demo                        # generate 1k..32k tokens
    python bench/memory_growth.py --shape 2b --mode prefill --device cuda
    python bench/memory_growth.py --shape tiny --systems rgemma gemma transformers-rg
    python bench/memory_growth.py --smoke                              # seconds, for CI

Systems: ``rgemma`` (random weights held in --dtype; on CPU multiplied in float32),
``gemma`` (transformers' GemmaForCausalLM, random weights: Gemma-2B's shape for
--shape 2b, else rgemma's vocab / width / layers / heads / MLP width with one KV head;
a DynamicCache, sdpa attention) and ``transformers-rg`` (transformers'
RecurrentGemmaForCausalLM on rgemma's weights).

Modes: ``generate`` (default for demo / tiny) runs one greedy token-by-token
generation up to the largest length and measures at each milestone length
(decode tok/s over the tokens since the previous milestone); ``prefill`` (default
for 2b) feeds L random tokens in --chunk chunks, then times --decode-tokens greedy
steps at context L. Each system runs in its own subprocess, so on CPU its RSS
(current, and peak since the model was built) is its own; on CUDA the memory is
torch.cuda.memory_allocated / max_memory_allocated. Also reported: the bytes of
the state (rgemma) or cache (Gemma: its keys and values). A failure (out of memory)
at one length is recorded and the run goes on. Prints a table with growth ratios
(last length / first); writes OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import subprocess
import sys
import time

# The parent process stays light (no torch): a child's ru_maxrss starts at its parent's.
HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ("rgemma", "gemma", "transformers-rg")
MARK = "@@row "
GEMMA_2B = dict(
    vocab_size=256000,
    hidden_size=2048,
    intermediate_size=16384,
    num_hidden_layers=18,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
)


# ----------------------------------------------------------------- models


def gemma_config(args, cfg):
    import transformers

    if args.shape == "2b":
        shape = GEMMA_2B
    else:
        shape = dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.width,
            intermediate_size=cfg.mlp_width,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=1,
            head_dim=cfg.width // cfg.num_heads,
        )
    longest = max(args.lengths) + args.decode_tokens + args.chunk
    return transformers.GemmaConfig(
        **shape, max_position_embeddings=longest, attn_implementation="sdpa"
    )


def random_gemma(config, dtype, device, seed: int = 0):
    """GemmaForCausalLM with N(0, 1/fan_in) weights, made directly in ``dtype`` on ``device``."""
    import torch
    import transformers

    from common import rebuild_rotary_embeddings

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = transformers.GemmaForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():  # tied lm_head: filled once
            p.normal_(0.0, (p.shape[-1] if p.ndim > 1 else config.hidden_size) ** -0.5)
        # buffers made on the meta device: rebuild them
        rebuild_rotary_embeddings(model, device)
        for module in model.modules():
            if isinstance(getattr(module, "embed_scale", None), torch.Tensor):
                module.embed_scale = torch.tensor(config.hidden_size**0.5, device=device)
    return model.eval()


class RgemmaRunner:
    """rgemma: feed(tokens) runs them on top of the state; logits of the last one."""

    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self):
        self.state, self.pos = None, 0
        gc.collect()
        self.state = self.model.init_state(1)

    def feed(self, tokens):
        import torch

        T = tokens.shape[1]
        positions = torch.arange(self.pos, self.pos + T, device=tokens.device)[None]
        logits, _ = self.model(tokens, positions, self.state, logits="last")
        self.pos += T
        return logits

    def state_bytes(self) -> int:
        return self.state.nbytes


class HFRunner:
    """A transformers causal LM driven by hand with a DynamicCache."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.model = model
        # transformers 5 renamed past_key_values -> cache; logits_to_keep was num_logits_to_keep
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None
        )
        self.reset()

    def reset(self):
        import transformers

        self.cache, self.pos = None, 0
        gc.collect()
        try:
            self.cache = transformers.DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            self.cache = transformers.DynamicCache()
        if hasattr(
            self.model.model, "_setup_cache"
        ):  # RecurrentGemma keeps its RNN state in modules
            p = next(self.model.parameters())
            self.model.model._setup_cache(self.model.config, 1, p.device, p.dtype)

    def feed(self, tokens):
        import torch

        T = tokens.shape[1]
        # explicit positions: RecurrentGemma's cache reports 0 tokens seen (layer 0 is recurrent)
        kwargs = {
            self.cache_kw: self.cache,
            "use_cache": True,
            "position_ids": torch.arange(self.pos, self.pos + T, device=tokens.device)[None],
        }
        if self.keep_kw:
            kwargs[self.keep_kw] = 1
        self.pos += T
        return self.model(input_ids=tokens, **kwargs).logits[:, -1]

    def state_bytes(self) -> int:
        import torch

        c = self.cache
        layers = getattr(c, "layers", None)  # transformers >= 4.56: keys, values, ...
        tensors = (
            [t for layer in layers for t in vars(layer).values()]
            if layers is not None
            else list(c.key_cache) + list(c.value_cache)
        )
        tensors += [
            getattr(m, a, None)
            for m in self.model.modules()
            for a in ("conv1d_state", "recurrent_states")
        ]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def build_runner(system: str, args):
    import torch

    from common import DTYPES, SHAPES, random_rgemma, transformers_from

    cfg, dtype = SHAPES[args.shape](), DTYPES[args.dtype]
    if system == "gemma":
        return HFRunner(random_gemma(gemma_config(args, cfg), dtype, args.device))
    model = random_rgemma(cfg, dtype)
    if system == "transformers-rg":
        return HFRunner(transformers_from(model, dtype).to(args.device))
    fp32 = args.device == "cpu" and dtype == torch.bfloat16
    return RgemmaRunner(model.to(args.device).set_compute_dtype(torch.float32 if fp32 else None))


# ---------------------------------------------------------------- worker


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    """Peak memory from now on (Linux: clear the RSS high-water mark)."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory(device: str) -> dict:
    import torch

    from common import current_rss_mb, peak_rss_mb

    if device == "cuda":
        return {
            "mem_mb": torch.cuda.memory_allocated() / 2**20,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
        }
    now = current_rss_mb()
    return {"mem_mb": now, "peak_mb": max(now, peak_rss_mb())}  # ru_maxrss lags a little


def row(runner, L: int, tokens: int, seconds: float, device: str) -> dict:
    b = runner.state_bytes()
    return {
        "length": L,
        **memory(device),
        "state_bytes": b,
        "state_mb": b / 2**20,
        "tok_s": tokens / seconds,
    }


def generate_rows(runner, args, vocab: int):
    """One greedy generation up to the longest length; a row at each milestone."""
    import torch
    from tqdm import tqdm

    runner.reset()
    reset_peak(args.device)
    logits, n = runner.feed(torch.randint(3, vocab, (1, 1), device=args.device)), 1
    bar = tqdm(total=max(args.lengths), initial=1, desc="tokens", mininterval=2, file=sys.stderr)
    sync(args.device)
    t0, since = time.perf_counter(), n
    for i, L in enumerate(args.lengths):
        try:
            while n < L:
                logits = runner.feed(logits.argmax(-1, keepdim=True))
                n += 1
                bar.update(1)
            sync(args.device)
        except Exception as e:  # out of memory: the rest fails too
            bar.close()
            for later in args.lengths[i:]:
                yield {"length": later, "error": f"{type(e).__name__}: {e}"[:300]}
            return
        yield row(runner, L, n - since, time.perf_counter() - t0, args.device)
        t0, since = time.perf_counter(), n
    bar.close()


def prefill_rows(runner, args, vocab: int):
    """For each length: a fresh state fed L random tokens, then timed greedy steps."""
    import torch
    from tqdm import tqdm

    for L in args.lengths:
        try:
            runner.reset()
            reset_peak(args.device)
            prompt = torch.randint(3, vocab, (1, L), generator=torch.Generator().manual_seed(L))
            for s in tqdm(
                range(0, L, args.chunk), desc=f"prefill {L}", mininterval=2, file=sys.stderr
            ):
                logits = runner.feed(prompt[:, s : s + args.chunk].to(args.device))
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.decode_tokens):
                logits = runner.feed(logits.argmax(-1, keepdim=True))
            sync(args.device)
            yield row(runner, L, args.decode_tokens, time.perf_counter() - t0, args.device)
        except Exception as e:
            yield {"length": L, "error": f"{type(e).__name__}: {e}"[:300]}


def worker(system: str, args) -> None:
    """Runs one system; prints one JSON line per length."""
    import torch

    sys.path.insert(0, HERE)
    from common import SHAPES, machine

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runner = build_runner(system, args)
    vocab = SHAPES[args.shape]().vocab_size
    with torch.inference_mode():
        runner.feed(torch.randint(3, vocab, (1, 8), device=args.device))  # warm-up, not timed
        rows = generate_rows if args.mode == "generate" else prefill_rows
        for r in rows(runner, args, vocab):
            print(MARK + json.dumps(r), flush=True)
    print(MARK + json.dumps({"machine": machine()}), flush=True)


# ---------------------------------------------------------------- parent


def run_system(system: str, argv: list[str], lengths: list[int]) -> tuple[list[dict], dict]:
    """The system's rows from its own subprocess (errors for lengths it never reached)."""
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *argv, "--worker", system],
        stdout=subprocess.PIPE,
        text=True,
    )
    rows, meta = {}, {}
    for line in proc.stdout:
        if not line.startswith(MARK):
            print(f"[{system}] {line}", end="", flush=True)
            continue
        r = json.loads(line[len(MARK) :])
        if "machine" in r:
            meta = r["machine"]
            continue
        rows[r["length"]] = r
        print(
            f"[{system}] {r['length']} tokens: "
            + (
                f"ERROR {r['error']}"
                if "error" in r
                else f"memory {r['mem_mb']:.1f} MB (peak {r['peak_mb']:.1f}), state/cache "
                f"{r['state_mb']:.3f} MB, decode {r['tok_s']:.1f} tok/s"
            ),
            flush=True,
        )
    code = proc.wait()
    missing = {"error": f"worker exited with code {code}"}
    return [rows.get(L, {"length": L, **missing}) for L in lengths], meta


def growth_table(results: dict[str, list[dict]]) -> str:
    cols = [("mem MB", "mem_mb", ".1f"), ("state MB", "state_mb", ".3f"), ("tok/s", "tok_s", ".1f")]
    head = ["length"] + [f"{s} {c}" for s in results for c, _, _ in cols]
    lengths = [r["length"] for r in next(iter(results.values()))]
    rows = [head]
    for i, L in enumerate(lengths):
        rows.append(
            [str(L)]
            + [
                ("error" if "error" in results[s][i] else format(results[s][i][k], f))
                for s in results
                for _, k, f in cols
            ]
        )
    last = ["last/first"]
    for rs in results.values():
        ok = [r for r in rs if "error" not in r]
        last += [
            f"{ok[-1][k] / ok[0][k]:.2f}x" if len(ok) > 1 and ok[0][k] else "-" for _, k, _ in cols
        ]
    rows.append(last)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def save_json(data: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def plot(results: dict[str, list[dict]], path: str, title: str) -> None:
    """Memory (solid; state/cache dashed) and decode tok/s against length, log2 x axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, (mem, speed) = plt.subplots(2, 1, sharex=True, figsize=(7, 7))
    for s, rs in results.items():
        ok = [r for r in rs if "error" not in r]
        xs = [r["length"] for r in ok]
        (line,) = mem.plot(xs, [r["mem_mb"] for r in ok], marker="o", label=f"{s} memory")
        mem.plot(
            xs,
            [r["state_mb"] for r in ok],
            ls="--",
            marker=".",
            color=line.get_color(),
            label=f"{s} state/cache",
        )
        speed.plot(xs, [r["tok_s"] for r in ok], marker="o", label=s)
    mem.set_xscale("log", base=2)
    lengths = [r["length"] for r in next(iter(results.values()))]
    speed.set_xticks(lengths, [f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in lengths])
    speed.minorticks_off()
    mem.set_yscale("log")
    mem.set_ylabel("MB")
    mem.set_title(title)
    speed.set_ylabel("decode tok/s")
    speed.set_xlabel("tokens (length of the text)")
    for ax in (mem, speed):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def parse(argv: list[str]):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=["2b", "demo", "tiny"], default="demo")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=["rgemma", "gemma"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument(
        "--mode",
        choices=["generate", "prefill"],
        help="default: prefill for --shape 2b, generate otherwise",
    )
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens)")
    p.add_argument(
        "--decode-tokens", type=int, default=32, help="timed decode steps (prefill mode)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="bench/results/memory_growth")
    p.add_argument("--smoke", action="store_true", help="tiny shape, lengths 64 128 256 (CI)")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.lengths = "tiny", [64, 128, 256]
    args.lengths = sorted(set(args.lengths))
    args.mode = args.mode or ("prefill" if args.shape == "2b" else "generate")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker:
        return worker(args.worker, args)
    print(
        f"shape {args.shape}, weights {args.dtype}, {args.device}, mode {args.mode}, "
        f"lengths {args.lengths}, systems {args.systems}",
        flush=True,
    )
    results, meta = {}, {}
    for system in args.systems:
        results[system], meta = run_system(system, argv, args.lengths)
    print(growth_table(results))
    meta.update(
        shape=args.shape,
        dtype=args.dtype,
        device=args.device,
        mode=args.mode,
        chunk=args.chunk,
        decode_tokens=args.decode_tokens,
        threads=args.threads,
        memory="cuda allocated" if args.device == "cuda" else "process RSS",
    )
    save_json({"meta": meta, "results": results}, args.out + ".json")
    plot(
        results,
        args.out + ".png",
        f"{args.shape} shape, weights {args.dtype}, {args.device}, {args.mode}",
    )
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
