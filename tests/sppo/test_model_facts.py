"""`sppo.model_facts`: parameter counts from a config.json, and where the config.json comes from.

The counts are checked against torch: each tiny config is built with transformers on the meta
device (no memory, exact shapes) and its parameters summed. The stored configs of the shipped
models must give their published sizes.
"""

from __future__ import annotations

import json

import pytest
import torch

from sppo.config import load_config
from sppo.model_facts import (MODELS_DIR, ModelConfigError, count_params, judge_facts,
                              load_model_config, model_facts)

LLAMA = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=96,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False)
TINY = {
    "llama-gqa": LLAMA,
    "llama-tied-biased-head-dim": {**LLAMA, "tie_word_embeddings": True, "attention_bias": True,
                                   "mlp_bias": True, "head_dim": 32},
    "mistral": {**LLAMA, "model_type": "mistral", "num_key_value_heads": 1},
    "qwen2": {**LLAMA, "model_type": "qwen2"},
    # PairRM's backbone shape (DeBERTa-v3: relative attention, shared keys, no positions) ...
    "deberta-v3": dict(model_type="deberta-v2", vocab_size=500, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=512, relative_attention=True, position_buckets=256,
                       norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type="p2c|c2p",
                       position_biased_input=False, max_relative_positions=-1, type_vocab_size=0),
    # ... and DeBERTa-v2's options: separate position projections, absolute positions, token
    # types, a smaller embedding projected up.
    "deberta-v2": dict(model_type="deberta-v2", vocab_size=500, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=128, relative_attention=True, position_buckets=-1,
                       max_relative_positions=64, share_att_key=False, pos_att_type="p2c|c2p",
                       position_biased_input=True, type_vocab_size=2, embedding_size=16),
}


def _meta_build(config: dict):
    """(all parameters, first layer's) of the model transformers builds from `config`."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    conf = AutoConfig.for_model(**config)
    with torch.device("meta"):
        if config["model_type"] == "deberta-v2":
            model = AutoModel.from_config(conf)
            layer = model.encoder.layer[0]
        else:
            model = AutoModelForCausalLM.from_config(conf)
            layer = model.model.layers[0]
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in layer.parameters()))


@pytest.mark.parametrize("name", list(TINY))
def test_count_equals_torch_meta_build(name):
    assert count_params(TINY[name]) == _meta_build(TINY[name])


def test_other_architectures_are_built_on_the_meta_device():
    """Qwen3 (q and k norms: not in the formula) goes through transformers, still exact."""
    config = {**LLAMA, "model_type": "qwen3", "head_dim": 16}
    assert count_params(config) == _meta_build(config)


# Published sizes (the safetensors metadata's total of the hub checkpoints), and DeBERTa-v3-large's
# base model as transformers builds it.
PUBLISHED = {
    "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,  # the shipped LLM judge
    "meta-llama/Llama-3.1-70B-Instruct": 70_553_706_496,
    "microsoft/deberta-v3-large": 434_012_160,
}


@pytest.mark.parametrize("model_id", list(PUBLISHED))
def test_stored_configs_give_the_published_sizes(model_id):
    config, source = load_model_config(model_id, "model.path")
    assert source == f"configs/models/{model_id}/config.json"
    assert count_params(config)[0] == PUBLISHED[model_id]


def test_stored_configs_are_valid_transformers_configs():
    from transformers import AutoConfig

    for path in MODELS_DIR.rglob("config.json"):
        config = json.loads(path.read_text())
        if "ranker_type" in config:  # llm-blender's ranker config: it names its backbone
            assert (MODELS_DIR / config["model_name"] / "config.json").is_file()
            continue
        conf = AutoConfig.for_model(**config)
        assert conf.hidden_size == config["hidden_size"], path


def test_a_local_directory_comes_first(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    config, source = load_model_config(str(tmp_path), "model.path")
    assert config == LLAMA and source == str(tmp_path / "config.json")


def test_unreadable_models_name_the_field_and_where_to_put_the_file(tmp_path):
    # The hub is off in tests (HF_HUB_OFFLINE=1, tests/conftest.py): it answers at once.
    with pytest.raises(ModelConfigError) as info:
        load_model_config("someone/not-stored", "model.path")
    assert info.value.field == "model.path"
    assert "configs/models/someone/not-stored/config.json" in str(info.value)
    with pytest.raises(ModelConfigError, match="holds no config.json"):
        load_model_config(str(tmp_path), "judge.model_path")
    with pytest.raises(ModelConfigError, match="is not a directory"):
        load_model_config(str(tmp_path / "missing"), "model.path")
    with pytest.raises(ModelConfigError, match="model.path: .*can size"):
        model_facts({"model_type": "llama"}, "x", "here", "model.path")


def test_builtin_tiny_llama_plans_without_building(tmp_path):
    config, source = load_model_config("builtin:tiny-llama", "model.path", str(tmp_path))
    assert source == "sppo.tiny.TinySpec" and not any(tmp_path.iterdir())
    assert model_facts(config, "builtin:tiny-llama", source, "model.path").layers == 2


def test_pairrm_judge_is_its_backbone_plus_prefix_rows_and_head(tmp_path):
    """llm-blender/PairRM: the stored ranker config names microsoft/deberta-v3-large; the
    checkpoint adds 4 embedding rows and the head Linear(2h, h) + Linear(h, 1)."""
    cfg = load_config(None, ["judge.backend=pairrm", "judge.model_path=llm-blender/PairRM"])
    h = 1024
    assert judge_facts(cfg).params == PUBLISHED["microsoft/deberta-v3-large"] + 4 * h + (
        2 * h * h + h) + (h + 1)
    # A local ranker directory naming a local backbone, and judge.backbone overriding it.
    ranker, backbone = tmp_path / "ranker", tmp_path / "backbone"
    ranker.mkdir(), backbone.mkdir()
    (backbone / "config.json").write_text(json.dumps(TINY["deberta-v3"]))
    (ranker / "config.json").write_text(json.dumps({"ranker_type": "pairranker",
                                                    "model_name": str(backbone)}))
    local = load_config(None, ["judge.backend=pairrm", f"judge.model_path={ranker}"])
    assert judge_facts(local).hidden == 32
    override = load_config(None, ["judge.backend=pairrm", f"judge.model_path={ranker}",
                                  "judge.backbone=microsoft/deberta-v3-large"])
    assert judge_facts(override).hidden == 1024
    assert judge_facts(load_config(None, [])) is None  # the Python judge has no model


def test_llm_judge_is_its_causal_lm():
    """An LLM judge is sized as the model it is (lm_head included), not as a PairRM backbone."""
    cfg = load_config(None, ["judge.backend=llm", "judge.kv_cache_gb=1",
                             "judge.model_path=meta-llama/Llama-3.1-8B-Instruct"])
    facts = judge_facts(cfg)
    assert facts.params == PUBLISHED["meta-llama/Llama-3.1-8B-Instruct"]
    assert (facts.model_type, facts.kv_heads, facts.max_positions) == ("llama", 8, 131072)
