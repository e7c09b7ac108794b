"""rgemma.weights: official <-> Hugging Face names and layouts, shapes, config inference.

Oracles: the official ``recurrentgemma.torch.Griffin`` and ``transformers``'
RecurrentGemmaForCausalLM. Tiny random models only; 2B/9B shapes on ``meta``.
"""

from __future__ import annotations

import pytest
import torch

from rgemma import weights as W
from rgemma.config import ATTENTION, RECURRENT, GriffinConfig

common = pytest.importorskip("recurrentgemma.common")
official_griffin = pytest.importorskip("recurrentgemma.torch.griffin")

R, A = common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION

TINY = {
    # Griffin-style: recurrent and attention blocks, lru_width != width.
    "griffin": dict(
        vocab_size=128,
        width=64,
        mlp_expanded_width=96,
        num_heads=4,
        block_types=(R, R, A, R),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=16,
        logits_soft_cap=30.0,
        lru_width=96,
    ),
    # Hawk-style: recurrent blocks only, lru_width != width, no soft-cap.
    "hawk": dict(
        vocab_size=96,
        width=32,
        mlp_expanded_width=48,
        num_heads=2,
        block_types=(R, R, R),
        embeddings_scale_by_sqrt_dim=False,
        attention_window_size=8,
        logits_soft_cap=0.0,
        lru_width=48,
    ),
}

PRESET_OF = {
    "recurrentgemma-2b": "RECURRENT_GEMMA_2B_V1",
    "recurrentgemma-9b": "RECURRENT_GEMMA_9B_V1",
    "griffin-7b": "GRIFFIN_PAPER_7B",
    "hawk-7b": "HAWK_PAPER_7B",
}


def official_model(kind: str, dtype=torch.float32, seed: int = 0, **overrides):
    """A tiny official Griffin with every parameter random (biases and norms too)."""
    torch.manual_seed(seed)
    model = official_griffin.Griffin(
        common.GriffinConfig(**{**TINY[kind], **overrides}), gradient_checkpointing=False
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def our_config(kind: str, **overrides) -> GriffinConfig:
    c = {**TINY[kind], **overrides}
    return GriffinConfig(
        vocab_size=c["vocab_size"],
        width=c["width"],
        mlp_width=c["mlp_expanded_width"],
        num_heads=c["num_heads"],
        lru_width=c["lru_width"],
        block_types=tuple(ATTENTION if b == A else RECURRENT for b in c["block_types"]),
        attention_window=c["attention_window_size"],
        logits_soft_cap=c["logits_soft_cap"],
        embeddings_scale_by_sqrt_dim=c["embeddings_scale_by_sqrt_dim"],
    )


def official_meta_state_dict(preset: str) -> dict[str, torch.Tensor]:
    cfg = common.GriffinConfig.from_preset(getattr(common.Preset, PRESET_OF[preset]))
    return official_griffin.Griffin(cfg, device="meta").state_dict()


def hf_meta_shapes(cfg: GriffinConfig) -> dict[str, tuple[int, ...]]:
    """Our names -> shapes of transformers' RecurrentGemmaForCausalLM (no lm_head)."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    with torch.device("meta"):
        model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**cfg.to_hf_dict()))
    return {
        k.removeprefix("model."): tuple(v.shape)
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["griffin", "hawk"])
def test_official_round_trip_is_bit_exact(kind, dtype):
    sd = official_model(kind, dtype).state_dict()
    ours = W.official_to_hf(sd)
    W.check_state_dict(ours, our_config(kind), "tiny")
    back = W.hf_to_official(ours)
    assert back.keys() == sd.keys()
    for name, t in sd.items():
        assert back[name].dtype == dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name


def test_official_to_hf_makes_views_only():
    sd = official_model("griffin").state_dict()
    storages = {t.untyped_storage().data_ptr() for t in sd.values()}
    for name, t in W.official_to_hf(sd).items():
        assert t.untyped_storage().data_ptr() in storages, f"{name} was copied"


def test_layout_changes():
    sd = official_model("griffin").state_dict()
    ours = W.official_to_hf(sd)
    conv = sd["blocks.0.recurrent_block.conv_1d.w"]  # [K, L]
    assert torch.equal(ours["layers.0.temporal_block.conv_1d.weight"][:, 0, :], conv.t())
    up_w, up_b = sd["blocks.1.mlp_block.ffw_up.w"], sd["blocks.1.mlp_block.ffw_up.b"]
    assert torch.equal(ours["layers.1.mlp_block.gate_proj.weight"], up_w[0].t())
    assert torch.equal(ours["layers.1.mlp_block.up_proj.weight"], up_w[1].t())
    assert torch.equal(ours["layers.1.mlp_block.up_proj.bias"], up_b[1, 0, 0])


def test_hf_to_official_accepts_hf_prefix_and_tied_head():
    ours = W.official_to_hf(official_model("hawk").state_dict())
    hf = W.add_hf_prefix(ours)
    assert all(k.startswith("model.") for k in hf)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    back = W.hf_to_official(hf)
    assert "embedder.input_embedding" in back and len(back) == len(ours) - 3 * 2


# ------------------------------------------------------------ vs transformers
@pytest.mark.parametrize(
    "preset", ["recurrentgemma-2b", "recurrentgemma-9b", "griffin-7b", "hawk-7b"]
)
def test_names_and_shapes_match_transformers_and_official(preset):
    cfg = GriffinConfig.from_preset(preset)
    want = W.expected_shapes(cfg)
    assert hf_meta_shapes(cfg) == want
    official = official_meta_state_dict(preset)
    assert {k: tuple(v.shape) for k, v in W.official_to_hf(official).items()} == want
    assert {
        k: tuple(v.shape)
        for k, v in W.hf_to_official(
            {k: torch.empty(s, device="meta") for k, s in want.items()}
        ).items()
    } == {k: tuple(v.shape) for k, v in official.items()}


@pytest.mark.parametrize("kind", ["griffin", "hawk"])
def test_transformers_logits_equal_official_with_mapped_weights(kind):
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    # transformers always scales the embeddings and soft-caps the logits
    hf_able = dict(embeddings_scale_by_sqrt_dim=True, logits_soft_cap=30.0)
    official = official_model(kind, **hf_able)
    cfg = our_config(kind, **hf_able)
    hf = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**cfg.to_hf_dict())).eval()
    hf.load_state_dict(W.add_hf_prefix(W.official_to_hf(official.state_dict())), strict=False)
    T = cfg.attention_window  # within the window the two implementations agree
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = official(tokens, torch.arange(T).expand(2, T))
        got = hf(tokens, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ config inference
@pytest.mark.parametrize("kind", ["griffin", "hawk"])
def test_infer_config_from_tiny_official(kind):
    sd = official_model(kind).state_dict()
    got = W.infer_config_from_official(sd)
    want = our_config(kind)
    for field in (
        "vocab_size",
        "width",
        "mlp_width",
        "num_heads",
        "lru_width",
        "block_types",
        "conv1d_width",
    ):
        assert getattr(got, field) == getattr(want, field), field
    # not in the weights: the RecurrentGemma defaults
    assert (got.attention_window, got.logits_soft_cap, got.embeddings_scale_by_sqrt_dim) == (
        2048,
        30.0,
        True,
    )


@pytest.mark.parametrize("preset", list(PRESET_OF))
def test_infer_config_from_preset_shapes(preset):
    sd = official_meta_state_dict(preset)
    assert W.infer_config_from_official(sd) == GriffinConfig.from_preset(preset)
    assert W.infer_config_from_official(sd, preset) == GriffinConfig.from_preset(preset)


def test_infer_config_with_mismatched_preset_names_the_field():
    sd = official_meta_state_dict("recurrentgemma-2b")
    with pytest.raises(W.WeightsError, match=r"width is 2560 .* 4096"):
        W.infer_config_from_official(sd, "recurrentgemma-9b", source="2b.pt")
    with pytest.raises(W.WeightsError, match="2b.pt"):
        W.infer_config_from_official(sd, "recurrentgemma-9b", source="2b.pt")
    tiny = official_model("hawk").state_dict()
    with pytest.raises(W.WeightsError, match="width"):
        W.infer_config_from_official(tiny, "hawk-7b")


def test_infer_config_errors():
    sd = dict(official_model("griffin").state_dict())
    with pytest.raises(W.WeightsError, match="unknown preset"):
        W.infer_config_from_official(sd, "gemma-7b")
    gap = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    with pytest.raises(W.WeightsError, match=r"missing blocks \[1\]"):
        W.infer_config_from_official(gap, source="x.pt")
    with pytest.raises(W.WeightsError, match="embedder.input_embedding"):
        W.infer_config_from_official({k: v for k, v in sd.items() if "embedder" not in k})


# ------------------------------------------------------------ check_state_dict
def test_check_state_dict_accepts_the_exact_set():
    cfg = our_config("griffin")
    W.check_state_dict(W.official_to_hf(official_model("griffin").state_dict()), cfg, "x")
    W.check_state_dict(W.expected_shapes(cfg), cfg, "shapes only")


def test_check_state_dict_reports_missing_unexpected_and_wrong_shapes():
    cfg = our_config("griffin")
    sd = W.official_to_hf(official_model("griffin").state_dict())
    del sd["layers.2.temporal_block.k_proj.weight"]
    sd["layers.0.temporal_block.extra"] = torch.zeros(3)
    sd["final_norm.weight"] = torch.zeros(63)
    with pytest.raises(W.WeightsError) as err:
        W.check_state_dict(
            sd,
            cfg,
            "ckpt/model.safetensors",
            locations={"final_norm.weight": "shard-2.safetensors"},
        )
    msg = str(err.value)
    assert "ckpt/model.safetensors" in msg
    assert "missing (1): layers.2.temporal_block.k_proj.weight" in msg
    assert "unexpected (1): layers.0.temporal_block.extra" in msg
    assert "final_norm.weight: expected (64,), found (63,) in shard-2.safetensors" in msg


def test_check_state_dict_for_another_config():
    sd = W.official_to_hf(official_model("griffin").state_dict())
    other = our_config("griffin").replace(num_heads=2)
    with pytest.raises(W.WeightsError, match="input_gate_weight: expected \\(2, 48, 48\\)"):
        W.check_state_dict(sd, other, "tiny")


def test_unknown_tensors_are_named():
    sd = dict(official_model("hawk").state_dict())
    sd["blocks.0.mystery"] = torch.zeros(1)
    with pytest.raises(W.WeightsError, match="blocks.0.mystery"):
        W.official_to_hf(sd)
    ours = W.official_to_hf(official_model("hawk").state_dict())
    del ours["layers.1.mlp_block.up_proj.weight"]
    with pytest.raises(W.WeightsError, match="layers.1.mlp_block.up_proj.weight"):
        W.hf_to_official(ours)


# ------------------------------------------------------------------ prefixes
def test_prefix_helpers_and_lm_head():
    emb = torch.randn(8, 4)
    hf = {
        "model.embed_tokens.weight": emb,
        "model.final_norm.weight": torch.zeros(4),
        "lm_head.weight": emb,
    }
    ours = W.strip_hf_prefix(hf)
    assert set(ours) == {"embed_tokens.weight", "final_norm.weight"}
    assert W.add_hf_prefix(ours).keys() == {"model.embed_tokens.weight", "model.final_norm.weight"}
    assert "embed_tokens.weight" in W.strip_hf_prefix({**hf, "lm_head.weight": emb.clone()})
    with pytest.raises(W.WeightsError, match="lm_head"):
        W.strip_hf_prefix({**hf, "lm_head.weight": emb + 1})


def test_flax_tree_to_official():
    import numpy as np

    tree = {
        "params": {
            "embedder": {"input_embedding": np.ones((8, 4), np.float32)},
            "blocks.0": {"attention_block": {"proj_k": {"kernel": np.arange(8.0).reshape(4, 2)}}},
        }
    }
    sd = W.flax_to_official(tree)
    assert sd["embedder.input_embedding"].shape == (8, 4)
    assert torch.equal(
        sd["blocks.0.attention_block.proj_k.weight"],
        torch.arange(8.0, dtype=torch.float64).reshape(4, 2).t(),
    )


def test_bfloat16_arrays_convert_bit_exact():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import numpy as np

    values = np.array([1.5, -2.25, 3e-3, 65504.0], dtype=np.float32)
    tensor = W.array_to_torch(values.astype(ml_dtypes.bfloat16))
    assert tensor.dtype == torch.bfloat16
    assert torch.equal(tensor, torch.from_numpy(values).bfloat16())
