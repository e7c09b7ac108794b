"""Griffin against the official recurrentgemma.torch code and transformers."""

from __future__ import annotations

import random
import sys

import pytest
import torch

from helpers import arange_positions, official_pair, random_model, tiny_config
from rgemma import layers, step_plan
from rgemma.config import GriffinConfig
from rgemma.model import Griffin, InputError

ATOL = 1e-4


def official_logits(official, tokens, positions):
    with torch.no_grad():
        logits, _ = official(tokens, positions, return_cache=False)
    return logits


PARITY_CONFIGS = {
    "tiny": tiny_config(attention_window=32),
    "window-wraps": tiny_config(attention_window=8),
    "hawk-lru-ne-width": tiny_config(
        block_types=("recurrent",) * 3,
        lru_width=96,
        logits_soft_cap=0.0,
        embeddings_scale_by_sqrt_dim=False,
    ),
    "griffin-lru-ne-width": tiny_config(lru_width=128, num_heads=4, attention_window=16),
}


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_prefill_logits_match_official(name):
    cfg = PARITY_CONFIGS[name]
    official, ours = official_pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 50))
    positions = arange_positions(2, 50)
    ref = official_logits(official, tokens, positions)
    with torch.no_grad():
        out, _ = ours(tokens, positions)
    diff = (out - ref).abs().max().item()
    print(f"{name}: max |logit diff| vs official = {diff:.2e}")
    assert diff <= ATOL


def test_decode_matches_official_decode():
    """Official sampling path: prompt, then one token at a time with its cache."""
    cfg = tiny_config(attention_window=8)
    official, ours = official_pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 30))
    positions = arange_positions(2, 30)
    with torch.no_grad():
        ref, cache = official(tokens[:, :6], positions[:, :6])
        refs = [ref]
        for t in range(6, 30):
            ref, cache = official(tokens[:, t : t + 1], positions[:, t : t + 1], cache)
            refs.append(ref)
        state = ours.init_state(2)
        outs = [ours(tokens[:, :6], positions[:, :6], state)[0]]
        for t in range(6, 30):
            outs.append(ours(tokens[:, t : t + 1], positions[:, t : t + 1], state)[0])
    assert (torch.cat(outs, 1) - torch.cat(refs, 1)).abs().max().item() <= ATOL


@pytest.mark.parametrize("kind", ["recurrent", "attention"])
def test_2b_shaped_block_matches_official(kind):
    """One residual block at the true 2B shape (small vocab: the block is what is tested)."""
    cfg = GriffinConfig.from_preset("recurrentgemma-2b", vocab_size=512, block_types=(kind,))
    official, ours = official_pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 40))
    positions = arange_positions(1, 40)
    ref = official_logits(official, tokens, positions)
    with torch.no_grad():
        out, _ = ours(tokens, positions)
    diff = (out - ref).abs().max().item()
    print(f"2B-shaped {kind} block: max |logit diff| = {diff:.2e}")
    assert diff <= ATOL


def _hf_model(ours: Griffin, window: int):
    transformers = pytest.importorskip("transformers")
    from rgemma import weights

    hf_cfg = ours.config.to_hf_dict()
    hf_cfg["attention_window_size"] = window
    hf_cfg.pop("architectures")
    hf_cfg.pop("model_type")
    config = transformers.RecurrentGemmaConfig(**hf_cfg)
    model = transformers.RecurrentGemmaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(
        weights.add_hf_prefix(ours.state_dict()), strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def test_matches_transformers_within_window():
    cfg = tiny_config(attention_window=32)
    _, ours = official_pair(cfg)
    hf = _hf_model(ours, window=cfg.attention_window)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        ref = hf(input_ids=tokens, use_cache=False).logits
        out, _ = ours(tokens, arange_positions(2, 32))
    assert (out - ref).abs().max().item() <= ATOL


def test_transformers_with_window_plus_one_matches_beyond_window():
    """transformers sees W keys where the official code sees W + 1: with its window set
    to W + 1 it agrees with us everywhere; with W it does not (its known bug)."""
    cfg = tiny_config(attention_window=8)
    _, ours = official_pair(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        out, _ = ours(tokens, arange_positions(1, 40))
        plus_one = _hf_model(ours, window=9)(input_ids=tokens, use_cache=False).logits
        same = _hf_model(ours, window=8)(input_ids=tokens, use_cache=False).logits
    assert (out - plus_one).abs().max().item() <= ATOL
    assert (out - same).abs().max().item() > 1e-2


# ---------------------------------------------------------------- chunking


def _feed_in_chunks(model, tokens, positions, sizes):
    state = model.init_state(tokens.shape[0])
    outs, t = [], 0
    for n in sizes:
        out, state = model(tokens[:, t : t + n], positions[:, t : t + n], state)
        outs.append(out)
        t += n
    assert t == tokens.shape[1]
    return torch.cat(outs, 1), state


def _positions_with_resets(batch, length, resets):
    positions = arange_positions(batch, length)
    for row, starts in resets.items():
        for s in starts:
            positions[row, s:] = torch.arange(length - s)
    return positions


def test_one_call_equals_token_by_token_and_random_chunks_across_resets():
    cfg = tiny_config(attention_window=8)
    model = random_model(cfg)
    B, T = 3, 90
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    positions = _positions_with_resets(B, T, {0: [30], 1: [11, 40, 41], 2: []})
    rng = random.Random(0)
    with torch.no_grad():
        full, full_state = model(tokens, positions)
        by_token, _ = _feed_in_chunks(model, tokens, positions, [1] * T)
        assert (by_token - full).abs().max().item() <= ATOL
        for _ in range(3):
            sizes, left = [], T
            while left:
                sizes.append(min(left, rng.choice([1, 2, 3, 7, 13, 37])))
                left -= sizes[-1]
            chunked, state = _feed_in_chunks(model, tokens, positions, sizes)
            assert (chunked - full).abs().max().item() <= ATOL
            for a, b in zip(state.tensors().values(), full_state.tensors().values()):
                assert torch.allclose(a.float(), b.float(), atol=ATOL)


def test_reset_isolates_documents():
    """Tokens after a reset give the logits of the same document fed alone."""
    cfg = tiny_config(attention_window=8)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 40))
    positions = _positions_with_resets(1, 40, {0: [25]})
    with torch.no_grad():
        packed, _ = model(tokens, positions)
        alone, _ = model(tokens[:, 25:], arange_positions(1, 15))
    assert (packed[:, 25:] - alone).abs().max().item() <= ATOL


def test_long_prompt_then_one_then_37():
    """A 5000-token prompt in one call, then 1 token, then 37: same as one call."""
    cfg = tiny_config(width=32, mlp_width=64, num_heads=2, attention_window=64, vocab_size=50)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 5038))
    positions = arange_positions(1, 5038)
    with torch.no_grad():
        full, _ = model(tokens, positions)
        chunked, _ = _feed_in_chunks(model, tokens, positions, [5000, 1, 37])
    assert (chunked[:, -38:] - full[:, -38:]).abs().max().item() <= ATOL


# ----------------------------------------------------------------- padding


def test_left_padded_rows_equal_rows_alone():
    cfg = tiny_config(attention_window=8)
    model = random_model(cfg)
    lengths = [20, 7, 13]
    T = max(lengths)
    tokens = torch.zeros(3, T, dtype=torch.long)
    positions = torch.full((3, T), -1)
    rows = [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths]
    for i, (row, n) in enumerate(zip(rows, lengths)):
        tokens[i, T - n :] = row
        positions[i, T - n :] = torch.arange(n)
    with torch.no_grad():
        batch, state = model(tokens, positions)
        nxt = torch.randint(0, cfg.vocab_size, (3, 1))
        step, _ = model(nxt, torch.tensor(lengths)[:, None], state)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            alone, s = model(row[None], arange_positions(1, n))
            assert (batch[i, T - n :] - alone[0]).abs().max().item() <= ATOL
            alone_step, _ = model(nxt[i : i + 1], torch.tensor([[n]]), s)
            assert (step[i] - alone_step[0]).abs().max().item() <= ATOL


def test_padding_anywhere_leaves_state_untouched():
    """A row fed only padding keeps its state bit for bit; pads in the middle are skipped."""
    cfg = tiny_config(attention_window=8)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 30))
    positions = arange_positions(2, 30)
    with torch.no_grad():
        _, state = model(tokens[:, :20], positions[:, :20])
        before = state.clone()
        pad_pos = positions[:, 20:25].clone()
        pad_pos[1] = -1
        _, state = model(tokens[:, 20:25], pad_pos, state)
        for name, t in state.select([1]).tensors().items():
            assert torch.equal(t, before.select([1]).tensors()[name]), name
        # pads interleaved with real tokens == the real tokens alone
        mixed_tok = torch.stack([tokens[0, 20:25], tokens[0, 20:25]])
        mixed_pos = torch.tensor([[20, -1, 21, -1, 22], [20, 21, 22, -1, -1]])
        _, s0 = model(tokens[:1, :20], positions[:1, :20])
        mixed_tok[0] = torch.tensor([tokens[0, 20], 0, tokens[0, 21], 0, tokens[0, 22]])
        mixed_tok[1] = torch.tensor([tokens[0, 20], tokens[0, 21], tokens[0, 22], 0, 0])
        out, _ = model(mixed_tok, mixed_pos, s0.expand(2))
        assert (out[0, [0, 2, 4]] - out[1, [0, 1, 2]]).abs().max().item() <= ATOL


def test_batch_rows_are_independent():
    cfg = tiny_config(attention_window=8)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 30))
    other = tokens.clone()
    other[0] = torch.randint(0, cfg.vocab_size, (30,))
    with torch.no_grad():
        a, _ = model(tokens, arange_positions(2, 30))
        b, _ = model(other, arange_positions(2, 30))
    assert torch.equal(a[1], b[1])


def test_logits_modes():
    cfg = tiny_config()
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    positions = arange_positions(2, 12)
    positions[1, :4] = -1
    with torch.no_grad():
        full, _ = model(tokens, positions)
        last, _ = model(tokens, positions, logits="last")
        none, state = model(tokens, positions, logits="none")
    assert none is None and state.num_tokens.tolist() == [12, 8]
    assert last.shape == (2, cfg.vocab_size)
    assert torch.allclose(last, full[:, -1], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_and_keeps_fp32_recurrence(dtype):
    cfg = tiny_config()
    model = random_model(cfg).to(dtype)
    tokens = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        ref, _ = random_model(cfg)(tokens, arange_positions(1, 20))
        out, state = model(tokens, arange_positions(1, 20))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert state.layers[0].h.dtype == torch.float32
    assert state.layers[2].k.dtype == dtype
    assert (out.float() - ref).abs().max().item() < 0.5


def test_bad_inputs_give_clear_errors():
    cfg = tiny_config()
    model = random_model(cfg)
    ok = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(InputError, match="token ids must be in"):
        model(torch.tensor([[0, cfg.vocab_size]]), torch.tensor([[0, 1]]))
    with pytest.raises(InputError, match=r"\[B, T\]"):
        model(ok, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(InputError, match="state has 2 rows"):
        model(ok, arange_positions(1, 3), model.init_state(2))
    with pytest.raises(InputError, match="logits must be"):
        model(ok, arange_positions(1, 3), logits="first")
    with pytest.raises(InputError, match="padding"):
        model(ok, torch.tensor([[0, 1, -5]]))


def test_2b_preset_parameter_count_on_meta():
    """The published parameter counts (embeddings tied)."""
    with torch.device("meta"):
        two = Griffin(GriffinConfig.from_preset("recurrentgemma-2b"))
        nine = Griffin(GriffinConfig.from_preset("recurrentgemma-9b"))
    assert two.num_parameters() == 2_682_862_080
    assert nine.num_parameters() == 8_579_977_216


def _bf16_held_and_rounded():
    """(float32 model on bf16-rounded weights, the same weights held in bf16 with
    float32 activations, tokens, positions)."""
    cfg = tiny_config(attention_window=8)
    rounded = random_model(cfg)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    held = random_model(cfg).to(torch.bfloat16).set_compute_dtype(torch.float32)
    return (rounded, held, torch.randint(0, cfg.vocab_size, (2, 30)), arange_positions(2, 30))


def test_bf16_held_weights_with_fp32_compute(monkeypatch):
    """Weights held in bfloat16, activations in float32: many-row calls are the
    float32 model's numbers on the bf16-rounded weights (chunking still exact);
    few-row calls (decode) multiply in bf16, within bf16 rounding of them. (As on
    a CPU without native bf16; with it, every call multiplies in bf16: below.)"""
    monkeypatch.setattr(layers, "LOW_PRECISION_ROWS", 4)
    rounded, held, tokens, positions = _bf16_held_and_rounded()
    with torch.no_grad():
        ref, _ = rounded(tokens, positions)
        out, state = held(tokens, positions)
        chunked, _ = _feed_in_chunks(held, tokens, positions, [11, 19])
        stepped, _ = _feed_in_chunks(held, tokens, positions, [29, 1])
    assert out.dtype == torch.float32 and state.layers[0].conv.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in held.parameters())
    assert (out - ref).abs().max().item() <= ATOL
    assert (chunked - out).abs().max().item() <= ATOL
    assert (stepped[:, :29] - out[:, :29]).abs().max().item() <= ATOL
    step_error = (stepped[:, 29] - out[:, 29]).abs().max().item()
    assert 0 < step_error <= 2e-2 * out[:, 29].abs().max().item()  # bf16 rounding, not exact


def test_bf16_held_weights_multiplied_in_bf16_everywhere(monkeypatch):
    """The native-bf16 CPU policy (every product in bf16): within bf16 rounding of
    the float32 model on the rounded weights, and bf16 products really happen."""
    monkeypatch.setattr(layers, "LOW_PRECISION_ROWS", sys.maxsize)
    rounded, held, tokens, positions = _bf16_held_and_rounded()
    with torch.no_grad():
        ref, _ = rounded(tokens, positions)
        out, _ = held(tokens, positions)
    error = (out - ref).abs().max().item()
    assert out.dtype == torch.float32
    assert 0 < error <= 2e-2 * ref.abs().max().item()


@pytest.mark.parametrize("low_precision_rows", [4, sys.maxsize])
def test_rg_lru_gates_held_in_bf16(monkeypatch, low_precision_rows):
    """RG-LRU's block-diagonal gates with weights held in bf16: few rows (decode, the
    math of kernels.recurrent_step) are the float32 product on the rounded weights;
    many rows are too, unless the native-bf16 policy multiplies them in bf16, which
    stays within bf16 rounding of it."""
    monkeypatch.setattr(layers, "LOW_PRECISION_ROWS", low_precision_rows)
    torch.manual_seed(0)
    lru = layers.RGLRU(64, 4)
    lru.reset_parameters()
    held = lru.to(torch.bfloat16)
    w, b = held.input_gate_weight, held.input_gate_bias
    for rows in (1, 4, 37, 100):
        x = torch.randn(1, rows, 64)
        with torch.no_grad():
            got = held._block_diag(x, w, b)
        xh = x.reshape(rows, 4, 16)
        exact = torch.einsum("thi,hij->thj", xh, w.float()) + b.float()  # [T, H, 16]
        error = (got.reshape(rows, 4, 16) - exact).abs().max().item()
        if rows > layers.KERNEL_BF16_ROWS and low_precision_rows == sys.maxsize:
            assert 1e-4 < error <= 2e-2 * exact.abs().max().item(), (rows, error)
        else:
            assert error <= 1e-5, (rows, error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cfg = tiny_config(attention_window=8)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 70))
    positions = arange_positions(2, 70)
    with torch.no_grad():
        ref, _ = model(tokens, positions)
        gpu = model.cuda()
        out, state = gpu(tokens.cuda(), positions.cuda())
        step, _ = gpu(tokens[:, :1].cuda(), torch.full((2, 1), 70).cuda(), state)
    assert (out.cpu() - ref).abs().max().item() <= ATOL
    assert torch.isfinite(step).all()


def test_decode_step_path_equals_chunk_path_with_pads_and_resets():
    """T == 1 goes through the step functions; they equal the general chunk path."""
    cfg = tiny_config(attention_window=8)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    positions = _positions_with_resets(2, 40, {1: [17]})
    positions[0, 25:28] = -1  # a row idling in a batched decode
    with torch.no_grad():
        _, s_step = model(tokens[:, :5], positions[:, :5])
        s_chunk = s_step.clone()
        for t in range(5, 40):
            a, _ = model(tokens[:, t : t + 1], positions[:, t : t + 1], s_step)
            # the chunk path on a 2-token call whose first token is padding
            b, _ = model(
                torch.cat([tokens[:, t : t + 1], tokens[:, t : t + 1]], 1),
                torch.cat([torch.full((2, 1), -1), positions[:, t : t + 1]], 1),
                s_chunk,
            )
            real = positions[:, t] >= 0  # a padding row's logits mean nothing
            assert (a[real, 0] - b[real, 1]).abs().max().item() <= ATOL
    for name, t in s_step.tensors().items():
        assert torch.allclose(t.float(), s_chunk.tensors()[name].float(), atol=ATOL), name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_with_live_state_and_checkpointing(checkpointing):
    """Backward through a forward that updated the state in place, with and without
    activation checkpointing, equals the gradients of a fresh no-state reference, for
    packed rows that do not start at position 0 and continue a previous chunk."""
    cfg = tiny_config(attention_window=8)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    positions = _positions_with_resets(2, 40, {0: [13], 1: [29]})
    grads = []
    for ckpt in (False, checkpointing):
        model = random_model(cfg).train()
        model.gradient_checkpointing = ckpt
        with torch.no_grad():
            _, state = model(tokens[:, :15], positions[:, :15])  # a live, non-empty state
        logits, _ = model(tokens[:, 15:], positions[:, 15:], state)
        (logits.float().logsumexp(-1).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, atol=1e-5), name


def test_every_parameter_is_initialised_by_its_own_module():
    """init_weights calls each module's reset_parameters: a parameter no module
    initialises (a new layer without reset_parameters) would keep its NaN."""
    cfg = tiny_config()
    model = Griffin(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights(0)
    left = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not left, f"not initialised: {left}"
    owners = {
        type(m) for m in model.modules() if next(m.parameters(recurse=False), None) is not None
    }
    assert all("reset_parameters" in vars(t) for t in owners), owners


def test_init_follows_the_paper_scales():
    """Hand-derived variances: inputs 1/fan_in, branch ends (2/L)/fan_in, conv 0.01/K, and
    the RG-LRU decay r = exp(-softplus(param)) with r^2 in [0.9^2, 0.999^2]."""
    cfg = tiny_config(width=256, mlp_width=512, num_heads=4)
    model = Griffin(cfg).init_weights(0)
    final = 2.0 / cfg.num_layers
    rec, att = model.layers[0].temporal_block, model.layers[2].temporal_block
    expected = {
        rec.linear_x.weight: 1 / cfg.width,
        rec.linear_out.weight: final / cfg.lru_width,
        att.q_proj.weight: 1 / cfg.width,
        att.o_proj.weight: final / cfg.width,
        model.layers[0].mlp_block.down_proj.weight: final / cfg.mlp_width,
        model.embed_tokens.weight: 1 / cfg.width,
        rec.conv_1d.weight: 0.01 / cfg.conv1d_width,
    }
    for p, var in expected.items():
        assert p.var().item() == pytest.approx(var, rel=0.15)
    r = torch.exp(-torch.nn.functional.softplus(rec.rg_lru.recurrent_param))
    assert r.min() >= 0.9 - 1e-6 and r.max() <= 0.999 + 1e-6
    assert float(model.final_norm.weight.abs().max()) == 0.0
    assert float(att.o_proj.bias.abs().max()) == 0.0


def test_a_short_context_reads_only_the_ring_slots_in_use(monkeypatch):
    """While every row has seen fewer tokens than the window, attention reads only the
    ring slots that can hold keys, and computes what it computes over the whole ring."""
    from rgemma.attention import LocalAttentionBlock
    from rgemma.state import State

    cfg = tiny_config(attention_window=32)
    model = random_model(cfg).eval()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    more = torch.randint(0, cfg.vocab_size, (2, 40), generator=g)
    positions = arange_positions(2, 9)
    positions[1, :3] = -1  # row 1: left padding, 6 tokens
    widths = []
    monkeypatch.setattr(step_plan, "ENABLED", False)  # the modules' step, to spy on
    step, forward = LocalAttentionBlock.step, LocalAttentionBlock.forward
    monkeypatch.setattr(
        LocalAttentionBlock,
        "step",
        lambda s, x, st, c, r: widths.append(r.shape[1]) or step(s, x, st, c, r),
    )
    monkeypatch.setattr(
        LocalAttentionBlock,
        "forward",
        lambda s, x, st, c, r: widths.append(r.shape[1]) or forward(s, x, st, c, r),
    )

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            state = model.init_state(2)
            out = [model(prompt, positions, state)[0]]
            for i in range(3):  # decode steps
                pos = state.num_tokens[:, None].clone()
                out.append(model(prompt[:, i : i + 1], pos, state)[0])
            pos = state.num_tokens[:, None] + torch.arange(40)[None]
            out.append(model(more, pos, state)[0])  # past the window
            out.append(model(more[:, :1], state.num_tokens[:, None].clone(), state)[0])
        return out

    used = run()
    per_call = len(cfg.attention_layers)
    assert widths[::per_call] == [1, 9, 10, 11, 12, 32]  # max tokens seen before each call
    monkeypatch.setattr(State, "ring_slots_in_use", lambda self, window: window)
    whole = run()
    used[0], whole[0] = used[0][positions >= 0], whole[0][positions >= 0]  # pads: no output
    for a, b in zip(used, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("piece", [7, 64])
def test_a_prompt_run_in_pieces_equals_one_pass(monkeypatch, piece):
    """CPU inference runs long prompts in passes of PREFILL_PIECE rows; the state carries
    everything between them, so logits and state equal one pass over the prompt, also
    with left padding longer than a piece (passes where a row is all padding) and a
    document boundary inside the prompt."""
    from rgemma import model as model_module

    cfg = tiny_config(attention_window=16)
    model = random_model(cfg).eval()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 90), generator=g)
    positions = arange_positions(2, 90)
    positions[1, :40] = -1  # row 1: 40 pads, then a document
    positions[1, 40:] = torch.arange(50)
    positions[0, 60:] = torch.arange(30)  # row 0: a second document at 60

    passes = []
    blocks = model._blocks
    monkeypatch.setattr(model, "_blocks", lambda x, *a, **k: passes.append(1) or blocks(x, *a, **k))

    def run(rows_per_pass: int):
        monkeypatch.setattr(model_module, "PREFILL_PIECE", rows_per_pass)
        passes.clear()
        with torch.no_grad():
            state = model.init_state(2)
            everything, _ = model(tokens, positions, state)
            last, _ = model(tokens[:, :50], positions[:, :50], model.init_state(2), logits="last")
        return everything, last, state, len(passes)

    whole, whole_last, whole_state, one = run(10**9)
    split, split_last, split_state, many = run(2 * piece)  # 2 rows: `piece` tokens a pass
    assert one == 2 and many == -(-90 // piece) + -(-50 // piece)
    real = positions >= 0
    torch.testing.assert_close(split[real], whole[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_last, whole_last, rtol=1e-5, atol=1e-5)
    for name, t in whole_state.tensors().items():
        torch.testing.assert_close(split_state.tensors()[name], t, rtol=1e-5, atol=1e-5)
