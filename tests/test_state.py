"""State: fixed size, snapshots, batch surgery."""

from __future__ import annotations

import torch

from helpers import arange_positions, random_model, tiny_config
from rgemma.config import GriffinConfig
from rgemma.state import State


def expected_nbytes(cfg: GriffinConfig, batch: int, item: int) -> int:
    """The state size from the architecture alone (hand-derived)."""
    n_rec = len(cfg.recurrent_layers)
    n_att = len(cfg.attention_layers)
    per_row = (
        n_rec * ((cfg.conv1d_width - 1) * cfg.lru_width * item + cfg.lru_width * 4)
        + n_att * 2 * cfg.attention_window * cfg.head_dim * item
        + 2 * 8
    )  # num_tokens, doc_start (int64)
    return batch * per_row


def test_nbytes_formula_and_constant_after_10x_window():
    cfg = tiny_config(attention_window=8)
    model = random_model(cfg)
    state = model.init_state(2)
    assert state.nbytes == expected_nbytes(cfg, 2, 4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10 * cfg.attention_window))
    with torch.no_grad():
        _, state = model(tokens, arange_positions(2, tokens.shape[1]), state)
        for t in range(5):
            _, state = model(tokens[:, :1], torch.full((2, 1), 80 + t), state)
    assert state.nbytes == expected_nbytes(cfg, 2, 4)


def test_2b_state_is_about_17_mb():
    cfg = GriffinConfig.from_preset("recurrentgemma-2b")
    with torch.device("meta"):
        state = State.empty(cfg, 1, dtype=torch.bfloat16)
    assert state.nbytes == expected_nbytes(cfg, 1, 2)
    assert 17.0e6 < state.nbytes < 17.4e6


def test_clone_is_independent():
    cfg = tiny_config()
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        _, state = model(tokens[:, :10], arange_positions(1, 10))
        snapshot = state.clone()
        a, state = model(tokens[:, 10:], arange_positions(1, 20)[:, 10:], state)
        b, snapshot = model(tokens[:, 10:], arange_positions(1, 20)[:, 10:], snapshot)
        assert torch.equal(a, b)
        # a fork that takes another path does not touch the original
        fork = state.clone()
        before = {k: v.clone() for k, v in state.tensors().items()}
        model(tokens[:, :5], torch.zeros(1, 5, dtype=torch.long) + torch.arange(5), fork)
    for name, t in state.tensors().items():
        assert torch.equal(t, before[name])


def test_select_concat_round_trip_and_rows_continue_alike():
    cfg = tiny_config()
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 16))
    with torch.no_grad():
        _, state = model(tokens, arange_positions(3, 16))
        parts = [state.select([0]), state.select([2, 1])]
        joined = State.concat(parts)
        for name, t in joined.tensors().items():
            assert torch.equal(t, state.select([0, 2, 1]).tensors()[name]), name
        assert (
            State.concat([state.select([0]), state.select([1]), state.select([2])]).nbytes
            == state.nbytes
        )
        dropped = state.drop([1])
        assert dropped.batch_size == 2
        nxt = torch.randint(0, cfg.vocab_size, (3, 1))
        pos = torch.full((3, 1), 16)
        full_step, _ = model(nxt, pos, state.clone())
        part_step, _ = model(nxt[[0, 2]], pos[[0, 2]], dropped)
    assert torch.allclose(full_step[[0, 2]], part_step, atol=1e-5)


def test_copy_into_rows():
    cfg = tiny_config()
    model = random_model(cfg)
    with torch.no_grad():
        _, one = model(torch.randint(0, cfg.vocab_size, (1, 9)), arange_positions(1, 9))
    slots = model.init_state(3)
    slots.copy_(one, rows=[1])
    assert torch.equal(slots.select([1]).layers[0].h, one.layers[0].h)
    assert slots.num_tokens.tolist() == [0, 9, 0]
