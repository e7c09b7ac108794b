"""rgemma.evaluation.harness: the lm-eval adapter against direct teacher-forced computations."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import WINDOW
from rgemma.cli import evaluate as cli_evaluate
from rgemma.evaluation import harness
from rgemma.evaluation.harness import encode_pair, loglikelihoods

DATA = Path(__file__).parent / "data"
TRAINING_TEXT = (
    "the quick brown fox jumps over the lazy dog. a cat sat on the mat? question: what is the "
    "answer? the answer is yes. def add(a, b):\n    return a + b\nimport os\nfor i in range(10):\n"
    "    print(i)\nclass Point:\n    pass\nwhile true: if x is none: return false\n"
)
TOKENIZER_TEXTS = [TRAINING_TEXT * 20]  # for conftest's tokenizer, model and checkpoint

try:
    import lm_eval
except ImportError:
    lm_eval = None
needs_lm_eval = pytest.mark.skipif(
    lm_eval is None, reason="lm-eval is not installed (pip install 'rgemma[eval]')"
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------- references
@torch.no_grad()
def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Teacher forcing: one call over context + continuation, log_softmax, gather."""
    ids = torch.tensor([context + continuation])
    logits, _ = model(ids, torch.arange(ids.shape[1])[None])
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    rows = torch.arange(len(context) - 1, ids.shape[1] - 1)
    targets = torch.tensor(continuation)
    total = float(logprobs[rows, targets].sum())
    greedy = bool((logprobs[rows].argmax(-1) == targets).all())
    return total, greedy


def direct_document_logprob(model, ids: list[int]) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= 1, in one call."""
    if len(ids) < 2:
        return 0.0
    return direct_loglikelihood(model, ids[:1], ids[1:])[0]


class Req:
    """The part of lm-eval's Instance the adapter reads."""

    def __init__(self, *args):
        self.args = args


def random_requests(vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Contexts of 1..40 tokens (longer than the window) with 1..4 continuations of 1..9 tokens."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(4, vocab, (n,), generator=gen).tolist()

    pairs = []
    for n_ctx in (40, 1, 7, 23, 3, 40):
        context = [2] + ids(n_ctx - 1)
        for n_cont in torch.randint(
            1, 10, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen
        ).tolist():
            pairs.append((context, ids(n_cont)))
    pairs.append((pairs[0][0], ids(3)))  # a later request joins the first group
    return pairs


# -------------------------------------------------------------- tokenization
@pytest.mark.parametrize(
    "context, continuation",
    [
        ("Question: what is the answer?\nAnswer:", " yes"),
        ("", "the quick brown fox"),
        ("the answer is ", "yes"),  # trailing space in the context
        ("the qu", "ick brown fox"),  # a token straddles the boundary
        ("<bos>question:", " what"),  # a chat-rendered prompt carries its own <bos>
    ],
)
def test_encode_pair_splits_the_joint_encoding(tokenizer, context, continuation):
    ctx, cont = encode_pair(tokenizer, context, continuation)
    whole = (context + continuation).removeprefix("<bos>")
    assert ctx + cont == tokenizer.encode(whole, add_bos=True)
    assert ctx[0] == tokenizer.bos_id and ctx.count(tokenizer.bos_id) == 1
    assert len(cont) >= 1
    assert tokenizer.decode(cont).endswith(continuation)


def test_encode_pair_empty_context_is_bos_and_empty_continuation_is_nothing(tokenizer):
    assert encode_pair(tokenizer, "", "fox")[0] == [tokenizer.bos_id]
    assert encode_pair(tokenizer, "fox", "")[1] == []


# ------------------------------------------------------------- loglikelihood
@pytest.mark.parametrize("share_context", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_loglikelihoods_equal_teacher_forcing(model, share_context, batch_size):
    pairs = random_requests(model.config.vocab_size)
    got = loglikelihoods(
        model, pairs, batch_size=batch_size, chunk_size=8, share_context=share_context
    )
    for (ctx, cont), (total, greedy) in zip(pairs, got):
        want_total, want_greedy = direct_loglikelihood(model, ctx, cont)
        assert total == pytest.approx(want_total, abs=1e-4)
        assert greedy == want_greedy


def test_logits_budget_splits_calls_not_results(model, monkeypatch):
    """With room for only a few logits per call, batches and chunks shrink; scores do not."""
    from rgemma.evaluation import perplexity

    budget = 3 * model.config.vocab_size
    monkeypatch.setattr(harness, "LOGITS_BUDGET", budget)
    monkeypatch.setattr(perplexity, "LOGITS_BUDGET", budget)
    pairs = random_requests(model.config.vocab_size, seed=1)
    spy = CountingModel(model)
    got = loglikelihoods(spy, pairs, batch_size=64, chunk_size=64)
    for (ctx, cont), (total, greedy) in zip(pairs, got):
        assert (total, greedy) == pytest.approx(direct_loglikelihood(model, ctx, cont), abs=1e-4)
    assert spy.calls > 2
    docs = [ctx + cont for ctx, cont in pairs[:4]]
    sums = perplexity.sum_logprobs(model, docs, chunk_size=64, batch_size=4)
    for doc, total in zip(docs, sums):
        assert total == pytest.approx(direct_document_logprob(model, doc), abs=1e-4)


@torch.no_grad()
def test_greedy_continuation_is_flagged_greedy(model):
    context = [2, 50, 60, 70, 80]
    continuation = []
    for _ in range(6):  # greedy decoding by full re-runs
        ids = torch.tensor([context + continuation])
        logits, _ = model(ids, torch.arange(ids.shape[1])[None], logits="last")
        continuation.append(int(logits[0].argmax()))
    wrong = continuation[:3] + [(continuation[3] + 1) % model.config.vocab_size] + continuation[4:]
    pairs = [(context, continuation), (context, wrong)]
    (_, greedy), (_, not_greedy) = loglikelihoods(model, pairs)
    assert greedy and not not_greedy


class CountingModel:
    """Wraps a model, counting the real (position >= 0) tokens of every call."""

    def __init__(self, model):
        self.model, self.tokens, self.calls = model, 0, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, positions, state=None, **kwargs):
        self.tokens += int((positions >= 0).sum())
        self.calls += 1
        return self.model(tokens, positions, state, **kwargs)


def test_shared_context_is_prefilled_once(model):
    context = [2] + list(range(10, 40))
    pairs = [(context, [5, 6, 7]), (context, [8]), (context, [9, 10])]
    grouped, ungrouped = CountingModel(model), CountingModel(model)
    a = loglikelihoods(grouped, pairs, batch_size=8)
    b = loglikelihoods(ungrouped, pairs, batch_size=8, share_context=False)
    continuation_inputs = 2 + 0 + 1  # every token but the last
    assert grouped.tokens == len(context) + continuation_inputs
    assert ungrouped.tokens == 3 * len(context) + continuation_inputs
    assert grouped.calls == ungrouped.calls == 2  # one prefill, one continuation batch
    for (x, gx), (y, gy) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5) and gx == gy


def test_lm_loglikelihood_on_text_requests(model, tokenizer):
    lm = harness.RgemmaLM(
        model=model, tokenizer=tokenizer, batch_size=4, chunk_size=8, progress=False
    )
    question = "question: what is the answer? " * 3 + "the answer is"
    texts = [
        (question, " yes"),
        (question, " no"),
        (question, " the quick brown fox"),
        ("", "the lazy dog"),
        ("a cat sat on", " the mat"),
        ("the qu", "ick brown fox"),
    ]
    got = lm.loglikelihood([Req(*t) for t in texts])
    unshared = harness.RgemmaLM(
        model=model, tokenizer=tokenizer, batch_size=1, share_context=False, progress=False
    )
    alone = unshared.loglikelihood([Req(*t) for t in texts])
    for (context, continuation), (total, greedy), (total1, greedy1) in zip(texts, got, alone):
        want = direct_loglikelihood(model, *encode_pair(tokenizer, context, continuation))
        assert total == pytest.approx(want[0], abs=1e-4) and greedy == want[1]
        assert total1 == pytest.approx(want[0], abs=1e-4) and greedy1 == want[1]


# -------------------------------------------------------- loglikelihood_rolling
def test_rolling_equals_full_document_sum(model, tokenizer):
    texts = ["", "fox", TRAINING_TEXT, TRAINING_TEXT[:90], "the answer is yes. " * 12]
    assert len(tokenizer.encode(TRAINING_TEXT)) > 4 * WINDOW
    lm = harness.RgemmaLM(
        model=model, tokenizer=tokenizer, batch_size=2, chunk_size=7, progress=False
    )
    got = lm.loglikelihood_rolling([Req(t) for t in texts])
    for text, total in zip(texts, got):
        want = direct_document_logprob(model, tokenizer.encode(text, add_bos=True))
        assert total == pytest.approx(want, abs=1e-4)
    assert got[0] == 0.0


# ------------------------------------------------------------- generate_until
@torch.no_grad()
def greedy_reference(model, tokenizer, prompt: str, until: list[str], max_tokens: int) -> str:
    """Greedy decoding by full re-runs, cut at the first stop string or stop token."""
    ids = tokenizer.encode(prompt, add_bos=True)
    new: list[int] = []
    for _ in range(max_tokens):
        seq = torch.tensor([ids + new])
        logits, _ = model(seq, torch.arange(seq.shape[1])[None], logits="last")
        token = int(logits[0].argmax())
        if token in tokenizer.stop_ids:
            break
        new.append(token)
    text = tokenizer.decode(new)
    cut = min([text.find(s) for s in until if s in text] or [len(text)])
    return text[:cut]


def test_generate_until_is_greedy_and_stops_at_until(model, tokenizer):
    lm = harness.RgemmaLM(model=model, tokenizer=tokenizer, batch_size=2, progress=False)
    prompts = ["def add(a, b):", "the quick brown", "question: what is the answer?"]
    until = [" ", "e"]
    requests = [Req(p, {"until": until, "max_gen_toks": 12, "do_sample": False}) for p in prompts]
    requests.append(Req(prompts[0], {"until": "\n", "max_gen_toks": 5}))
    got = lm.generate_until(requests)
    for req, text in zip(requests, got):
        stops = req.args[1]["until"]
        stops = [stops] if isinstance(stops, str) else stops
        want = greedy_reference(model, tokenizer, req.args[0], stops, req.args[1]["max_gen_toks"])
        assert text == want
        assert not any(s in text for s in stops)


def test_generation_settings_follow_lm_eval_conventions():
    s = harness.generation_settings({"until": "\n\n", "max_gen_toks": 7, "temperature": 0.8}, 256)
    assert s == {"stop_strings": ["\n\n"], "max_new_tokens": 7, "temperature": 0.0}
    s = harness.generation_settings({"do_sample": True, "top_p": 0.9}, 32)
    assert s == {"stop_strings": [], "max_new_tokens": 32, "temperature": 1.0, "top_p": 0.9}


# ------------------------------------------------------------------------ chat
def test_apply_chat_template_renders_gemma_turns(model, tokenizer):
    lm = harness.RgemmaLM(model=model, tokenizer=tokenizer, progress=False)
    chat = [{"role": "user", "content": "2+2?"}]
    assert lm.apply_chat_template(chat) == (
        "<bos><start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    )
    open_turn = lm.apply_chat_template(
        chat + [{"role": "assistant", "content": "Answer:"}], add_generation_prompt=False
    )
    assert open_turn.endswith("<start_of_turn>model\nAnswer:")
    assert encode_pair(tokenizer, open_turn, " 4")[0].count(tokenizer.bos_id) == 1
    assert lm.chat_template(True) and lm.chat_template(False) is None
    assert isinstance(lm.tokenizer_name, str)


# -------------------------------------------------------------- end to end
def local_task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(DATA), include_defaults=False)


@needs_lm_eval
def test_registered_model_runs_local_tasks_and_agrees_with_direct(checkpoint, model, tokenizer):
    from lm_eval.api.registry import get_model

    assert get_model("rgemma") is harness.RgemmaLM
    results = lm_eval.simple_evaluate(
        model="rgemma",
        model_args=f"pretrained={checkpoint},dtype=float32,batch_size=8",
        tasks=["rgemma_local_mc", "rgemma_local_ppl", "rgemma_local_gen"],
        task_manager=local_task_manager(),
        bootstrap_iters=0,
        log_samples=False,
    )
    scores = results["results"]

    questions = [json.loads(line) for line in open(DATA / "local_mc.jsonl")]
    correct = 0
    for q in questions:
        lls = [
            direct_loglikelihood(model, *encode_pair(tokenizer, q["question"], c))[0]
            for c in q["choices"]
        ]
        correct += max(range(len(lls)), key=lls.__getitem__) == q["answer"]
    assert scores["rgemma_local_mc"]["acc,none"] == pytest.approx(correct / len(questions))

    docs = [json.loads(line)["text"] for line in open(DATA / "local_text.jsonl")]
    nll = -sum(direct_document_logprob(model, tokenizer.encode(d, add_bos=True)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert scores["rgemma_local_ppl"]["bits_per_byte,none"] == pytest.approx(
        nll / nbytes / math.log(2), rel=1e-5
    )
    assert 0.0 <= scores["rgemma_local_gen"]["exact_match,none"] <= 1.0


def _demo_path():
    try:
        from rgemma.io import demo

        return demo.path()
    except (ImportError, FileNotFoundError) as e:  # demo.DemoMissingError is a FileNotFoundError
        pytest.skip(f"the bundled demo model is not there yet ({type(e).__name__})")


@needs_lm_eval
def test_demo_model_local_mc_is_deterministic():
    path = _demo_path()
    lm = harness.RgemmaLM(
        pretrained=str(path), dtype="float32", device="cpu", batch_size=16, progress=False
    )
    runs = [
        lm_eval.simple_evaluate(
            model=lm,
            tasks=["rgemma_local_mc"],
            task_manager=local_task_manager(),
            bootstrap_iters=0,
            log_samples=True,
        )
        for _ in range(2)
    ]
    first, second = ([s["resps"] for s in r["samples"]["rgemma_local_mc"]] for r in runs)
    assert first == second
    assert runs[0]["results"] == runs[1]["results"]
    acc = runs[0]["results"]["rgemma_local_mc"]["acc,none"]
    print(
        f"demo model, rgemma_local_mc: acc {acc:.3f} "
        f"acc_norm {runs[0]['results']['rgemma_local_mc']['acc_norm,none']:.3f}"
    )


# --------------------------------------------------------------------- CLI
def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rgemma")
    cli_evaluate.register(parser.add_subparsers(dest="verb"))
    return parser.parse_args(argv)


@needs_lm_eval
def test_eval_verb_writes_results(checkpoint, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = parse_cli(
        [
            "eval",
            "--model",
            str(checkpoint),
            "--tasks",
            "rgemma_local_mc",
            "--include-path",
            str(DATA),
            "--no-default-tasks",
            "--limit",
            "6",
            "--batch-size",
            "4",
            "--bootstrap-iters",
            "0",
            "--no-progress",
            "--output",
            str(out),
        ]
    )
    assert args.func(args) == 0
    saved = json.loads(out.read_text())
    assert 0.0 <= saved["results"]["rgemma_local_mc"]["acc,none"] <= 1.0
    assert saved["config"]["model"] == "rgemma"
    assert "rgemma_local_mc" in capsys.readouterr().out


@needs_lm_eval
def test_eval_verb_reports_unknown_task(checkpoint, capsys):
    args = parse_cli(
        [
            "eval",
            "--model",
            str(checkpoint),
            "--tasks",
            "no_such_task",
            "--include-path",
            str(DATA),
            "--no-default-tasks",
            "--no-progress",
        ]
    )
    assert args.func(args) == 2
    assert "rgemma eval: error" in capsys.readouterr().err


def run_python(code: str) -> subprocess.CompletedProcess:
    """``python -c CODE`` with one thread, its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )


@needs_lm_eval
def test_python_m_route_is_lm_evals_cli():
    """``python -m rgemma.cli.evaluate`` is lm-eval's CLI with rgemma registered."""
    code = (
        "import sys, runpy; sys.argv = ['rgemma.cli.evaluate', 'run', '--help'];"
        "runpy.run_module('rgemma.cli.evaluate', run_name='__main__')"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "--model_args" in done.stdout


def test_module_imports_and_cli_explains_without_lm_eval(checkpoint):
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "import argparse, rgemma.cli.evaluate as e, rgemma.evaluation.harness as h\n"
        "assert h.register_model is None\n"
        "p = argparse.ArgumentParser(); e.register(p.add_subparsers())\n"
        f"args = p.parse_args(['eval', '--model', {str(checkpoint)!r}, '--tasks', 'x'])\n"
        "sys.exit(args.func(args))\n"
    )
    done = run_python(code)
    assert done.returncode == 2, done.stderr
    assert "rgemma[eval]" in done.stderr
