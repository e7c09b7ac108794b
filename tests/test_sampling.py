"""Logits processors against transformers' (an independent oracle), and the sampler."""

from __future__ import annotations

import math

import pytest
import torch

from rgemma.inference.sampling import (
    Sampler,
    SamplingError,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k_top_p,
    sample_inverse_cdf,
)

transformers = pytest.importorskip("transformers")

V = 50


def random_logits(B=4, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def col(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)[:, None]


def test_repetition_penalty_matches_transformers():
    logits = random_logits()
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(4, V, dtype=torch.bool).scatter_(1, ids, True)
    for p in (1.3, 0.7):
        want = transformers.RepetitionPenaltyLogitsProcessor(p)(ids, logits.clone())
        got = apply_repetition_penalty(logits, seen, torch.full((4, 1), p))
        torch.testing.assert_close(got, want)


def test_per_row_parameters_match_transformers_row_by_row():
    logits = random_logits(B=5, seed=2)
    temps, ks, ps, mins = (
        [0.7, 1.0, 1.5, 1.0, 0.9],
        [0, 5, 0, 10, 3],
        [1.0, 1.0, 0.8, 0.5, 0.9],
        [0.0, 0.0, 0.0, 0.1, 0.2],
    )
    z = apply_temperature(logits, col(temps))
    z = apply_top_k_top_p(z, col(ks, torch.long), col(ps))
    z = apply_min_p(z, col(mins))
    for b in range(5):
        want = logits[b : b + 1] / temps[b]
        if ks[b]:
            want = transformers.TopKLogitsWarper(ks[b])(None, want)
        if ps[b] < 1:
            want = transformers.TopPLogitsWarper(ps[b])(None, want)
        if mins[b]:
            want = transformers.MinPLogitsWarper(mins[b])(None, want)
        assert torch.equal(torch.isinf(z[b]), torch.isinf(want[0])), b
        kept = ~torch.isinf(want[0])
        torch.testing.assert_close(z[b][kept], want[0][kept])


def test_top_p_keeps_at_least_the_best_token():
    logits = torch.tensor([[10.0, 0.0, -1.0, -2.0]])
    z = apply_top_k_top_p(logits, col([0], torch.long), col([0.01]))
    assert torch.isinf(z[0, 1:]).all() and z[0, 0] == 10.0


def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -math.inf, 0.5]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = sample_inverse_cdf(logits, u)
    freq = torch.bincount(tokens, minlength=5).double() / 20000
    want = torch.softmax(logits[0].double(), -1)
    assert freq[3] == 0
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)


def test_sampler_seeding_and_row_independence():
    logits = random_logits(B=3, seed=4)
    params = [SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(1.2, top_k=8)]

    def run(seeds, rows=None, steps=20):
        s = Sampler([params[r] for r in rows], V, seeds=[seeds[r] for r in rows])
        return [s.sample(logits[rows])[0].tolist() for _ in range(steps)]

    all_rows = run([1, 2, 3], [0, 1, 2])
    assert all_rows == run([1, 2, 3], [0, 1, 2])
    for r in range(3):
        assert [step[r] for step in all_rows] == [step[0] for step in run([1, 2, 3], [r])]
    assert all(step[1] == int(logits[1].argmax()) for step in all_rows)  # greedy row
    other = run([9, 2, 3], [0, 1, 2])
    assert [s[0] for s in other] != [s[0] for s in all_rows]
    assert all(logits[2].topk(8).indices.tolist().count(step[2]) for step in all_rows)


def test_inactive_rows_draw_nothing():
    logits = random_logits(B=2, seed=5)
    p = [SamplingParams(temperature=1.0)] * 2
    a = Sampler(p, V, seeds=[1, 2])
    b = Sampler(p, V, seeds=[1, 2])
    a.sample(logits)
    b.sample(logits, active=[True, False])
    assert torch.equal(a.rng_state(0), b.rng_state(0))
    assert not torch.equal(a.rng_state(1), b.rng_state(1))
    # Resuming a generator state continues the same stream.
    c = Sampler(p, V, rng_states=[a.rng_state(0), a.rng_state(1)])
    assert a.sample(logits)[0].tolist() == c.sample(logits)[0].tolist()


def test_repetition_history_and_updates():
    logits = torch.zeros(1, V)
    logits[0, 7], logits[0, 8] = 2.0, 1.9
    s = Sampler([SamplingParams(repetition_penalty=2.0)], V, history=[[7]])
    assert s.sample(logits)[0].item() == 8  # 7 was in the prompt
    assert bool(s.seen[0, 8])  # 8 was recorded when sampled
    assert s.sample(logits)[0].item() == 7  # 2.0/2 > 1.9/2


def test_logprobs_are_of_the_raw_distribution():
    logits = random_logits(B=2, seed=6)
    s = Sampler([SamplingParams(temperature=0.5, top_k=3), SamplingParams()], V, seeds=[0, 0])
    tokens, lp = s.sample(logits, logprobs=True)
    want = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(lp, want)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(temperature=float("nan")),
        dict(top_k=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(repetition_penalty=0),
    ],
)
def test_invalid_parameters(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"eos_token_id": 1, "bos_token_id": 2}, {}),  # ids only: no defaults
        ({"do_sample": False, "temperature": 0.7}, {"temperature": 0.0}),  # transformers: greedy
        ({"do_sample": True}, {"temperature": 1.0, "top_k": 50, "top_p": 1.0}),
        (
            {
                "do_sample": True,
                "temperature": 0.6,
                "top_k": 0,
                "top_p": 0.9,
                "min_p": 0.05,
                "repetition_penalty": 1.2,
            },
            {
                "temperature": 0.6,
                "top_k": 0,
                "top_p": 0.9,
                "min_p": 0.05,
                "repetition_penalty": 1.2,
            },
        ),
        ({"repetition_penalty": 1.3}, {"temperature": 0.0, "repetition_penalty": 1.3}),
    ],
)
def test_generation_config_defaults_read_as_transformers_reads_them(config, expected):
    from rgemma.inference.sampling import generation_defaults

    assert generation_defaults(config) == expected


def test_generation_config_out_of_range_names_the_file():
    from rgemma.inference.sampling import generation_defaults

    with pytest.raises(SamplingError, match="generation_config.json: top_p"):
        generation_defaults({"do_sample": True, "top_p": 0.0})
