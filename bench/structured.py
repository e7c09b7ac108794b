"""Structured output's cost: decode tok/s with a JSON schema vs without, through the engine.

    python bench/structured.py                          # demo model, b=1 and b=16
    python bench/structured.py --shape 2b --new-tokens 24 --rounds 2   # random 2B weights
    python bench/structured.py --engines                # mask cost: llguidance, and
                                                        # xgrammar / outlines-core if installed
    python bench/structured.py --smoke                  # seconds, for the tests

Decode: b requests (different prompts, sampled, seeds 0..b-1) run together through
``Engine``, once with a JSON schema (``response_format``'s path) and once without. The
constrained rows end when their JSON is complete, so the plain run gets, row by row,
exactly as many tokens (``max_tokens`` = the constrained row's count, stop tokens off):
both runs decode the same batch sizes step by step and differ only by the grammar
work. tok/s = tokens after each row's first / (last token time - the time every row
had its first token): decode only, prefill excluded. Runs are interleaved (the order
flips every round) and medians are printed with schema / plain ratios, plus where the
constrained run's extra time went (mask filling, applying the masks to the logits,
advancing the matchers) per decode step.

``--shape 2b`` uses random weights (like ``bench/compare.py``) and a synthetic 256000-
piece SentencePiece tokenizer (``synthetic_tokenizer``: the demo's pieces extended with
words and fragments of the Python standard library and strings of other scripts), so
masks have Gemma's width.

``--engines`` measures the grammar engines themselves, on the demo tokenizer and the
synthetic 256000-piece one: per token, fill the mask of one row + accept the token,
over JSON documents tokenized by the vocabulary (``{"type": "object"}`` and SCHEMA),
plus compile times. llguidance is measured through ``rgemma.inference.structured``
(what the engine runs); xgrammar and outlines-core, not dependencies, are skipped when
they are not installed (see ``rgemma/inference/structured.py`` for the choice).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, Result, random_rgemma, save  # noqa: E402
from rgemma.inference import structured  # noqa: E402
from rgemma.inference.engine import Engine, EngineConfig, Request  # noqa: E402
from rgemma.inference.sampling import SamplingParams  # noqa: E402
from rgemma.io import demo  # noqa: E402
from rgemma.io.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,  # closed: a row ends when its last property is written
}
PROMPTS = [
    "config = ",
    "def load(path):\n    ",
    "import json\n",
    "data = {",
    "# settings\n",
    "return ",
    "options = dict(",
    "x = ",
]


# ========================================================= synthetic vocabulary
def _stdlib_words(files: int = 400) -> dict[str, int]:
    """Word, number and punctuation runs of the first ``files`` stdlib modules, counted."""
    words: dict[str, int] = {}
    root = sysconfig.get_paths()["stdlib"]
    seen = 0
    for directory, _, names in sorted(os.walk(root)):
        for name in sorted(n for n in names if n.endswith(".py")):
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            for w in re.findall(r"[A-Za-z_]+|\d+|[^\w\s]+", text):
                words[w] = words.get(w, 0) + 1
            seen += 1
            if seen >= files:
                return words
    return words


def synthetic_tokenizer(directory: str, vocab_size: int = 256_000, seed: int = 0) -> Tokenizer:
    """A SentencePiece model of ``vocab_size`` pieces written to ``directory``: the demo
    tokenizer's pieces, then fragments of frequent stdlib words (and "▁word"), then 1-4
    character strings of Latin-1, Cyrillic, CJK, Arabic and kana (40% with "▁"). Only
    for benchmarks: it encodes like the demo tokenizer plus whatever merges reach the
    new pieces."""
    from sentencepiece import sentencepiece_model_pb2

    path = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(path):
        model = sentencepiece_model_pb2.ModelProto()
        with open(os.path.join(demo.path(), "tokenizer.model"), "rb") as f:
            model.ParseFromString(f.read())
        seen = {p.piece for p in model.pieces}
        new: list[str] = []
        want = vocab_size - len(model.pieces)

        def add(piece: str) -> None:
            if piece not in seen and len(new) < want:
                seen.add(piece)
                new.append(piece)

        for word, _ in sorted(_stdlib_words().items(), key=lambda kv: -kv[1]):
            if len(new) >= want // 2:
                break
            add("▁" + word)
            for i in range(len(word)):
                for j in range(i + 2, min(len(word), i + 12) + 1):
                    add(word[i:j])
        rng = random.Random(seed)
        scripts = [
            (0xC0, 0x17F),
            (0x400, 0x4FF),
            (0x4E00, 0x9FFF),
            (0x600, 0x6FF),
            (0x3040, 0x30FF),
        ]
        while len(new) < want:
            lo, hi = rng.choice(scripts)
            text = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4)))
            add(("▁" if rng.random() < 0.4 else "") + text)
        lowest = min(p.score for p in model.pieces)
        for k, piece in enumerate(new):
            p = model.pieces.add()
            p.piece, p.score, p.type = piece, lowest - 1 - k * 1e-3, p.NORMAL
        os.makedirs(directory, exist_ok=True)
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    return Tokenizer.from_dir(directory)


# ===================================================================== decode
def load(shape: str, cache_dir: str):
    """(model, tokenizer): the demo model, or random weights of ``shape`` with the demo
    tokenizer (vocabulary <= 4096) or the synthetic one at the shape's vocabulary."""
    if shape == "demo":
        return demo.load()
    cfg = SHAPES[shape]()
    model = random_rgemma(cfg, torch.bfloat16 if shape == "2b" else torch.float32)
    model.set_compute_dtype(torch.float32)
    if cfg.vocab_size <= 4096:
        return model, Tokenizer.from_dir(demo.path())
    return model, synthetic_tokenizer(os.path.join(cache_dir, f"vocab{cfg.vocab_size}"))


class StepTimers:
    """Seconds spent in the grammar work of the engine, by wrapping its three calls."""

    def __init__(self):
        self.seconds = {"fill masks": 0.0, "apply masks": 0.0, "accept tokens": 0.0}
        self._undo = []

    def __enter__(self) -> StepTimers:
        from rgemma.inference import engine, sampling

        self._wrap(engine, "token_mask", "fill masks")
        self._wrap(sampling, "apply_token_mask", "apply masks")
        self._wrap(structured.GrammarMatcher, "accept", "accept tokens")
        return self

    def _wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0

        setattr(owner, name, timed)
        self._undo.append((owner, name, fn))

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)


def run_batch(engine, requests: list[Request]) -> tuple[list[int], float, int]:
    """Runs ``requests`` together: (tokens per request, decode seconds, decode steps)."""
    steps0 = engine.stats().decode_steps
    handles = [engine.submit(r) for r in requests]
    counts, last = [], 0.0
    for h in handles:
        (choice,), _ = h.result(timeout=3600)
        counts.append(len(choice.token_ids))
    last = time.perf_counter()
    start = max(h.first_token_at for h in handles)
    return counts, last - start, engine.stats().decode_steps - steps0


def decode_bench(args) -> list[Result]:
    model, tok = load(args.shape, args.cache)
    grammar = structured.compile_grammar(
        structured.json_schema_spec(SCHEMA), tok, model.config.vocab_size
    )
    params = SamplingParams(temperature=args.temperature)
    samples: dict[tuple[str, str], list[float]] = {}
    overhead: dict[int, list[dict[str, float]]] = {}

    def requests(b: int, lengths: list[int] | None) -> list[Request]:
        """Constrained requests (lengths None), or plain ones of exactly ``lengths`` tokens."""
        return [
            Request(
                prompt_ids=tok.encode(PROMPTS[i % len(PROMPTS)]),
                max_tokens=args.new_tokens if lengths is None else lengths[i],
                params=params,
                seed=i,  # seeded rows give the same tokens in every run
                grammar=grammar if lengths is None else None,
                stop_ids=None if lengths is None else [],
            )
            for i in range(b)
        ]

    config = EngineConfig(max_batch=max(args.batches), prefill_chunk=4096)
    with Engine(model, tok, config) as engine:
        lengths = {}
        for b in args.batches:  # warm-up, not timed; the constrained rows' lengths
            lengths[b], _, _ = run_batch(engine, requests(b, None))
            run_batch(engine, requests(b, lengths[b]))
        for rnd in range(args.rounds):
            for b in args.batches:
                tokens = sum(lengths[b]) - b  # after each row's first token
                runs = ["schema", "plain"] if rnd % 2 == 0 else ["plain", "schema"]
                for system in runs:  # interleaved: drift hits both alike
                    if system == "plain":
                        _, seconds, _ = run_batch(engine, requests(b, lengths[b]))
                    else:
                        with StepTimers() as timers:
                            counts, seconds, steps = run_batch(engine, requests(b, None))
                        assert counts == lengths[b], "seeded constrained rows changed length"
                        per_step = {k: 1e3 * v / max(steps, 1) for k, v in timers.seconds.items()}
                        overhead.setdefault(b, []).append(per_step)
                    samples.setdefault((f"b={b}", system), []).append(tokens / seconds)
            print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    results = [
        Result(system, f"decode {metric}", "tok/s", v) for (metric, system), v in samples.items()
    ]
    print(f"\n{args.shape}: decode tok/s, medians of {args.rounds} interleaved rounds")
    print("| batch | schema tok/s | plain tok/s | schema/plain | grammar ms/step |")
    print("|-------|--------------|-------------|--------------|-----------------|")
    for b in args.batches:
        s, p = samples[(f"b={b}", "schema")], samples[(f"b={b}", "plain")]
        ratio = statistics.median(x / y for x, y in zip(s, p))  # paired: same round
        per = {k: statistics.median(o[k] for o in overhead[b]) for k in overhead[b][0]}
        split = ", ".join(f"{k} {v:.3f}" for k, v in per.items())
        print(
            f"| {b:5d} | {statistics.median(s):12.1f} | {statistics.median(p):11.1f} "
            f"| {ratio:12.3f} | {split} |"
        )
    return results


# ==================================================================== engines
def _documents(n: int, seed: int = 0) -> list[str]:
    """JSON texts valid under SCHEMA (and objects), with non-ASCII strings."""
    rng = random.Random(seed)
    words = ["alpha", "Zoë", "Москва", "東京", "data", "x_1", "hello world", "ok", "naïve", "42"]
    docs = []
    for _ in range(n):
        doc = {
            "name": " ".join(rng.choice(words) for _ in range(3))[:24],
            "age": rng.randint(0, 150),
            "role": rng.choice(["admin", "user", "guest"]),
            "tags": [rng.choice(words)[:12] for _ in range(rng.randint(0, 4))],
            "address": {"city": rng.choice(words), "zip": str(rng.randint(10000, 99999))},
            "score": round(rng.uniform(-100, 100), 3),
            "active": rng.random() < 0.5,
        }
        docs.append(json.dumps(doc, ensure_ascii=False))
    return docs


class _XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab_size: int):
        import xgrammar

        self.x = xgrammar
        encoded = [b or b"" for b in structured.token_bytes(tok, vocab_size)]
        self.stop = sorted(tok.stop_ids)
        info = xgrammar.TokenizerInfo(
            encoded, xgrammar.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=self.stop
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.bits = xgrammar.allocate_token_bitmask(1, vocab_size)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
        )

    def matcher(self, grammar):
        return self.x.GrammarMatcher(grammar)

    def step(self, m, token: int) -> None:
        m.fill_next_token_bitmask(self.bits, 0)
        if not m.accept_token(token):
            raise RuntimeError(f"xgrammar rejected token {token}")


class _LLGuidance:
    """What the engine runs: ``rgemma.inference.structured`` (llguidance)."""

    name = "llguidance"

    def __init__(self, tok, vocab_size: int):
        import llguidance  # noqa: F401  (a dependency: ImportError only in a broken install)

        self.vocab = structured.vocabulary(tok, vocab_size)
        self.stop = self.vocab.stop_ids
        self.bits = torch.empty((1, (vocab_size + 31) // 32), dtype=torch.int32)

    def compile(self, schema: dict):
        structured._schema_grammar.cache_clear()  # time the whole compile
        return self.vocab.compile(structured.json_schema_spec(schema))

    def matcher(self, grammar):
        return grammar.matcher()

    def step(self, m, token: int) -> None:
        m.fill_mask(self.bits, 0)
        m.accept(token)


class _OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab_size: int):
        import outlines_core

        self.oc = outlines_core
        self.stop = sorted(tok.stop_ids)
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(structured.token_bytes(tok, vocab_size)):
            if b is not None and i not in self.stop:
                by_bytes.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(self.stop[0], by_bytes)
        self.bits = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, grammar):
        return self.oc.Guide(grammar)

    def step(self, m, token: int) -> None:
        m.write_mask_into(self.bits.data_ptr(), self.bits.numel(), 4)
        if token not in self.stop:  # the end is a final state, not a transition
            m.advance(token, return_tokens=False)


def engine_bench(args) -> list[dict]:
    """Per-token mask cost and compile time of each installed grammar engine."""
    tokenizers = [("demo", Tokenizer.from_dir(demo.path()))]
    if not args.smoke:
        tokenizers.append(
            ("synthetic", synthetic_tokenizer(os.path.join(args.cache, "vocab256000")))
        )
    docs = _documents(3 if args.smoke else 20)
    grammars = [("json_object", {"type": "object"}), ("schema", SCHEMA)]
    rows = []
    for label, tok in tokenizers:
        for kind in (_LLGuidance, _XGrammar, _OutlinesCore):
            t0 = time.perf_counter()
            try:
                engine = kind(tok, tok.vocab_size)
            except ImportError:
                print(f"{kind.name}: not installed, skipped")
                continue
            row = {"vocab": tok.vocab_size, "tokenizer": label, "engine": kind.name}
            row["vocabulary s"] = time.perf_counter() - t0
            for name, schema in grammars:
                t0 = time.perf_counter()
                grammar = engine.compile(schema)
                row[f"{name} compile s"] = time.perf_counter() - t0
                per_token = []
                for doc in docs:
                    m = engine.matcher(grammar)
                    for token in tok.encode(doc, add_bos=False) + [engine.stop[0]]:
                        t0 = time.perf_counter()
                        engine.step(m, token)
                        per_token.append(time.perf_counter() - t0)
                per_token.sort()
                row[f"{name} us/token median"] = 1e6 * statistics.median(per_token)
                row[f"{name} us/token mean"] = 1e6 * statistics.mean(per_token)
                row[f"{name} us/token p99"] = 1e6 * per_token[int(0.99 * (len(per_token) - 1))]
            rows.append(row)
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=96, help="most tokens per constrained row")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--engines", action="store_true", help="compare the grammar engines")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/rgemma/bench"))
    p.add_argument("--out", default="bench/results/structured")
    p.add_argument("--smoke", action="store_true", help="a few tokens, one round (tests)")
    args = p.parse_args()
    if args.smoke:
        args.batches, args.new_tokens, args.rounds = [1, 2], 8, 1
    torch.set_num_threads(args.threads)
    if args.engines:
        rows = engine_bench(args)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + "-engines.json", "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.out}-engines.json")
        return
    results = decode_bench(args)
    meta = {"shape": args.shape, "new_tokens": args.new_tokens, "rounds": args.rounds}
    save(results, args.out + ".json", meta)
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
