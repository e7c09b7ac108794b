"""GriffinConfig: presets, validation, Hugging Face config.json round trip."""

from __future__ import annotations

import json

import pytest

from helpers import official_config
from rgemma.config import ConfigError, GriffinConfig, preset_names
from rgemma.io.files import CheckpointError, read_config


@pytest.mark.parametrize(
    "name,preset",
    [
        ("recurrentgemma-2b", "RECURRENT_GEMMA_2B_V1"),
        ("recurrentgemma-9b-it", "RECURRENT_GEMMA_9B_V1"),
        ("griffin-7b", "GRIFFIN_PAPER_7B"),
        ("hawk-7b", "HAWK_PAPER_7B"),
    ],
)
def test_presets_equal_official(name, preset):
    from recurrentgemma import common

    ours = official_config(GriffinConfig.from_preset(name))
    ref = common.GriffinConfig.from_preset(common.Preset[preset])
    for field in (
        "vocab_size",
        "width",
        "mlp_expanded_width",
        "num_heads",
        "block_types",
        "embeddings_scale_by_sqrt_dim",
        "attention_window_size",
        "logits_soft_cap",
    ):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.lru_width == (ref.lru_width or ref.width)


def test_hf_round_trip_through_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = GriffinConfig.from_preset("recurrentgemma-2b")
    d = cfg.to_hf_dict()
    hf = transformers.RecurrentGemmaConfig(
        **{k: v for k, v in d.items() if k not in ("model_type", "architectures")}
    )
    assert hf.intermediate_size == 2 * cfg.mlp_width
    assert hf.layers_block_type.count("sliding_attention") == len(cfg.attention_layers)
    assert GriffinConfig.from_hf_dict(json.loads(hf.to_json_string())) == cfg
    assert GriffinConfig.from_hf_dict(d) == cfg


def test_reads_both_block_type_spellings(tmp_path):
    d = GriffinConfig.from_preset("recurrentgemma-2b").to_hf_dict()
    d["_block_types"] = ["recurrent", "recurrent", "attention"]
    del d["block_types"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    assert (
        read_config(path).block_types == GriffinConfig.from_preset("recurrentgemma-2b").block_types
    )


def test_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match="lru_width 100 is not divisible by num_heads 8"):
        GriffinConfig(
            width=64,
            mlp_width=64,
            num_heads=8,
            lru_width=100,
            vocab_size=10,
            block_types=("recurrent",),
        )
    with pytest.raises(ConfigError, match="unknown kinds"):
        GriffinConfig(width=64, mlp_width=64, num_heads=4, vocab_size=10, block_types=("mamba",))
    with pytest.raises(ConfigError, match="unknown preset"):
        GriffinConfig.from_preset("gemma-2b")
    with pytest.raises(ConfigError, match="model_type 'gemma'"):
        GriffinConfig.from_hf_dict({"model_type": "gemma"})
    with pytest.raises(ConfigError, match="num_key_value_heads is 8"):
        GriffinConfig.from_hf_dict({**GriffinConfig().to_hf_dict(), "num_key_value_heads": 8})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(bad)
    assert "recurrentgemma-2b-it" in preset_names()
