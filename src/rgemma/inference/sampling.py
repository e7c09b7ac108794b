"""Logits processing and sampling for a batch, with per-row parameters.

Each row b of a batch has its own ``SamplingParams`` and its own
``torch.Generator``, so a row samples exactly the same tokens whether it runs
alone or in a batch (same seed + same inputs = same tokens).

Pipeline for one step (logits [B, V] of the model -> tokens [B]):

    z = repetition_penalty(logits, seen)   # CTRL: z/p where z > 0, z*p where z < 0
    greedy rows (temperature 0):  token = argmax(z)
    sampled rows:
        z = z / temperature
        z = top_k(z)        # keep the k largest (0 = off)
        z = top_p(z)        # keep the smallest set of top tokens with mass >= p (1 = off)
        z = min_p(z)        # drop tokens with prob < min_p * max prob (0 = off)
        token = inverse_cdf(softmax(z), u),   u ~ U[0, 1) from the row's generator

Each sampled row draws exactly one uniform number per step from its own
generator (on the CPU, so a seed gives the same tokens on any device).

A ``TokenMask`` (structured output, ``rgemma.inference.structured``) sets the
tokens a row may not pick to -inf FIRST, before the penalty, the temperature
and the truncations: top-k / top-p / min-p then choose among allowed tokens
(truncating first could keep only forbidden ones and leave nothing to sample).

Log-probabilities (``Sampler.sample(..., logprobs=True)``) are those of the RAW
model distribution, ``log_softmax(logits)`` at the chosen token, before the
penalty, the temperature and the truncations: what the OpenAI API and
lm-eval-harness expect.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

NEG_INF = float("-inf")


class SamplingError(ValueError):
    """Sampling parameters that make no sense (negative temperature, top_p of 0...)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one row picks its next token.

    temperature: 0 = greedy (argmax), else logits are divided by it.
    top_k: keep the k most likely tokens; 0 = all.
    top_p: nucleus sampling, keep the smallest set of most likely tokens whose
      probability mass reaches top_p; 1 = all. Must be in (0, 1].
    min_p: drop tokens whose probability is below min_p * (max probability); 0 = off.
    repetition_penalty: CTRL-style penalty (> 0) on every token id already in
      the row's prompt or output; 1 = off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        t, k, p, m, r = (
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            self.repetition_penalty,
        )
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise SamplingError(f"top_p must be in (0, 1], got {p!r}")
        if not (isinstance(m, (int, float)) and 0 <= m <= 1):
            raise SamplingError(f"min_p must be in [0, 1], got {m!r}")
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise SamplingError(f"repetition_penalty must be a finite number > 0, got {r!r}")
        # Representable in float32, the dtype the sampler computes in: a nonzero value must
        # be a normal float32 (1e-300 becomes 0, a subnormal divides logits to inf: garbage).
        tiny, big = float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max)
        for name, value, zero_ok in (
            ("temperature", t, True),
            ("top_p", p, False),
            ("min_p", m, True),
            ("repetition_penalty", r, False),
        ):
            if not (zero_ok and value == 0) and not tiny <= value <= big:
                raise SamplingError(
                    f"{name} must be {'0 or ' if zero_ok else ''}a number in "
                    f"[{tiny:.4g}, {big:.4g}] (representable in float32, which sampling "
                    f"computes in), got {value!r}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def generation_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling defaults a checkpoint's ``generation_config.json`` sets, read as
    ``transformers`` reads them: ``do_sample`` false means greedy, true means sampling with
    its temperature, top_k and top_p (``transformers``' defaults 1.0, 50 and 1.0 where the
    file says nothing); repetition_penalty and min_p apply either way.

    A file that names none of these keys (only token ids, as ``save_hf`` writes) sets no
    defaults: the caller's own apply. Returns ``SamplingParams`` keyword arguments;
    SamplingError for a value out of range.
    """
    if not any(k in config for k in _SAMPLING_KEYS):
        return {}
    out: dict[str, Any] = {}
    if config.get("do_sample"):

        def given(key: str, default: float) -> float:
            return default if config.get(key) is None else config[key]

        out["temperature"] = float(given("temperature", 1.0))
        out["top_k"] = int(given("top_k", 50))
        out["top_p"] = float(given("top_p", 1.0))
    else:
        out["temperature"] = 0.0
    if config.get("min_p") is not None:
        out["min_p"] = float(config["min_p"])
    if config.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(config["repetition_penalty"])
    try:
        SamplingParams(**out)
    except SamplingError as e:
        raise SamplingError(f"generation_config.json: {e}") from None
    return out


# --------------------------------------------------------------------------
# Logits processors: each takes logits [B, V] and per-row parameters [B, 1].
# --------------------------------------------------------------------------


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """CTRL penalty (Keskar et al. 2019) on the tokens seen by each row.

    logits [B, V] float; seen [B, V] bool; penalty [B, 1]. Seen tokens with a
    positive logit are divided by the penalty, negative ones multiplied.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits [B, V] / temperature [B, 1] (rows with temperature 0 are left alone)."""
    return logits / torch.where(temperature > 0, temperature, torch.ones_like(temperature))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Masks (-inf) tokens outside each row's top-k, then outside its nucleus.

    logits [B, V]; top_k [B, 1] int (0 = off); top_p [B, 1] (1 = off).
    The most likely token is always kept.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    sorted_logits = sorted_logits.masked_fill(rank >= k, NEG_INF)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
    drop = (mass_before >= top_p) & (top_p < 1) & (rank > 0)
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks tokens with prob < min_p * max prob. logits [B, V]; min_p [B, 1] (0 = off)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


class TokenMask(NamedTuple):
    """The tokens some rows of a batch may pick (structured output).

    rows: the constrained rows' indices in the batch (R of them, distinct).
    allowed: bool [R, V], True where row rows[r] may pick the token.
    """

    rows: list[int]
    allowed: torch.Tensor


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """logits [B, V] with the tokens ``mask`` forbids at -inf (a new tensor; rows not in
    ``mask.rows`` are unchanged)."""
    if mask.rows == list(range(logits.shape[0])):  # every row: no gather / scatter
        return torch.where(mask.allowed, logits, NEG_INF)
    index = torch.tensor(mask.rows, device=logits.device)
    masked = torch.where(mask.allowed, logits.index_select(0, index), NEG_INF)
    return logits.index_copy(0, index, masked)


def sample_inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits [B, V]) using uniforms [B] in [0, 1).

    token = the first index whose cumulative probability exceeds u * total.
    Tokens of probability 0 (masked) are never picked.
    """
    probs = torch.softmax(logits.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    token = torch.searchsorted(cdf, target, right=True)[:, 0]
    token = token.clamp_(max=logits.shape[-1] - 1)
    # Guard against landing on a zero-probability token through rounding.
    bad = probs.gather(-1, token[:, None])[:, 0] <= 0
    if bool(bad.any()):
        token = torch.where(bad, probs.argmax(dim=-1), token)
    return token


# --------------------------------------------------------------------------
# The per-batch sampler.
# --------------------------------------------------------------------------


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a random seed when None)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


class Sampler:
    """Samples one token per row for a batch of B rows, each with its own parameters.

    Args:
      params: one SamplingParams per row.
      vocab_size: V.
      device: where the logits live.
      seeds: one seed per row (None = random); ignored for greedy rows.
      rng_states: optional generator states (``Generator.get_state()``) per row,
        to continue a seeded run exactly where it stopped; overrides seeds.
      history: per row, the token ids already seen (prompt, earlier turns),
        for the repetition penalty.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        vocab_size: int,
        device: torch.device | str = "cpu",
        *,
        seeds: Sequence[int | None] | None = None,
        rng_states: Sequence[torch.Tensor | None] | None = None,
        history: Sequence[Sequence[int]] | None = None,
    ):
        self.params = list(params)
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        B = len(self.params)
        seeds = list(seeds) if seeds is not None else [None] * B
        rng_states = list(rng_states) if rng_states is not None else [None] * B
        if len(seeds) != B or len(rng_states) != B:
            raise SamplingError(f"need one seed / rng state per row ({B} rows)")

        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(
                [[getattr(p, name)] for p in self.params], dtype=dtype, device=self.device
            )

        self.temperature = column("temperature", torch.float32)  # [B, 1]
        self.top_k = column("top_k", torch.long)
        self.top_p = column("top_p", torch.float32)
        self.min_p = column("min_p", torch.float32)
        self.penalty = column("repetition_penalty", torch.float32)
        self._parts: list[Sampler] | None = None
        self.generators: list[torch.Generator | None] = []
        for b, p in enumerate(self.params):
            if p.greedy:
                self.generators.append(None)
                continue
            gen = make_generator(seeds[b])
            if rng_states[b] is not None:
                gen.set_state(rng_states[b].cpu().to(torch.uint8))
            self.generators.append(gen)
        self.seen: torch.Tensor | None = None  # [B, V] bool
        if any(p.repetition_penalty != 1 for p in self.params):
            self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=self.device)
            for b, ids in enumerate(history or []):
                if ids:
                    self.seen[b, torch.as_tensor(list(ids), device=self.device)] = True

    @classmethod
    def stack(cls, samplers: Sequence[Sampler]) -> Sampler:
        """One sampler over the rows of several, in order, to sample them in one call.

        The generators are shared (each row draws from its own sampler's
        generator) and the tokens picked are recorded in the parts' histories,
        so a row samples the same tokens stacked or alone.
        """
        out = cls.__new__(cls)
        out.params = [p for s in samplers for p in s.params]
        out.vocab_size, out.device = samplers[0].vocab_size, samplers[0].device
        for name in ("temperature", "top_k", "top_p", "min_p", "penalty"):
            setattr(out, name, torch.cat([getattr(s, name) for s in samplers]))
        out.generators = [g for s in samplers for g in s.generators]
        out.seen = None
        if any(s.seen is not None for s in samplers):
            out.seen = torch.cat(
                [
                    s.seen
                    if s.seen is not None
                    else torch.zeros(s.batch_size, s.vocab_size, dtype=torch.bool, device=s.device)
                    for s in samplers
                ]
            )
        out._parts = list(samplers)
        return out

    @property
    def batch_size(self) -> int:
        return len(self.params)

    @property
    def sampled_rows(self) -> list[int]:
        return [b for b, p in enumerate(self.params) if not p.greedy]

    @property
    def uses_truncation(self) -> bool:
        return any(p.top_k > 0 or p.top_p < 1 for p in self.params if not p.greedy)

    @property
    def uses_min_p(self) -> bool:
        return any(p.min_p > 0 for p in self.params if not p.greedy)

    def rng_state(self, row: int) -> torch.Tensor | None:
        """The generator state of a sampled row (to resume it), None for greedy rows."""
        gen = self.generators[row]
        return None if gen is None else gen.get_state()

    def process(self, logits: torch.Tensor, mask: TokenMask | None = None) -> torch.Tensor:
        """logits [B, V] -> processed float32 logits [B, V] (masked tokens at -inf).

        Greedy rows get only ``mask`` and the repetition penalty.
        """
        z = logits.float()
        if mask is not None:  # first: the truncations below must see only allowed tokens
            z = apply_token_mask(z, mask)
        if self.seen is not None:
            z = apply_repetition_penalty(z, self.seen, self.penalty)
        if not self.sampled_rows:
            return z
        z = apply_temperature(z, self.temperature)
        if self.uses_truncation:
            z = apply_top_k_top_p(z, self.top_k, self.top_p)
        if self.uses_min_p:
            z = apply_min_p(z, self.min_p)
        return z

    def sample(
        self,
        logits: torch.Tensor,
        active: Sequence[bool] | None = None,
        *,
        logprobs: bool = False,
        mask: TokenMask | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Picks one token per row and records it for the repetition penalty.

        Args:
          logits: [B, V] raw model logits.
          active: rows that still generate; only they draw random numbers and
            update their history (default: all).
          logprobs: also return log_softmax(logits)[token] of the raw logits.
          mask: the tokens constrained rows may pick (structured output), applied
            before everything else; logprobs stay those of the raw logits.
        Returns:
          tokens [B] int64 and optionally logprobs [B] float32.
        """
        finite = torch.isfinite(logits).all(dim=-1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise SamplingError(
                f"the model gave NaN or infinite logits (row {row}): its weights "
                "or its state hold NaN/Inf values, so there is nothing to sample"
            )
        z = self.process(logits, mask)
        tokens = z.argmax(dim=-1)
        rows = [b for b in self.sampled_rows if active is None or active[b]]
        if rows:
            u = torch.tensor(
                [torch.rand(1, generator=self.generators[b]).item() for b in rows],
                dtype=torch.float64,
            )
            index = torch.tensor(rows, device=z.device)
            drawn = sample_inverse_cdf(z.index_select(0, index), u.to(z.device))
            tokens = tokens.index_copy(0, index, drawn)
        if self.seen is not None:
            self._record(tokens, active)
        lp = None
        if logprobs:
            lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])[:, 0]
        return tokens, lp

    def _record(self, tokens: torch.Tensor, active: Sequence[bool] | None) -> None:
        """Marks the tokens picked by active rows as seen (for the repetition penalty)."""
        B = tokens.shape[0]
        mask = (
            torch.ones(B, dtype=torch.bool, device=tokens.device)
            if active is None
            else torch.tensor(list(active), dtype=torch.bool, device=tokens.device)
        )
        self.seen[mask, tokens[mask]] = True
        first = 0
        for part in self._parts or []:
            rows = slice(first, first + part.batch_size)
            if part.seen is not None:
                part._record(tokens[rows], None if active is None else active[rows])
            first += part.batch_size
