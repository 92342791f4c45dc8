"""What the memory plan (`sppo.plan`) needs to know of a model, from its `config.json` alone.

`load_model_config(value, field)` finds a model's `config.json` without loading weights: a local
directory holding one; else this repository's `configs/models/<hub id>/config.json` (copies of
the shipped configs' models from the hub: public architecture facts, a few hundred bytes each,
so the plan works offline, as on CI); else `transformers.AutoConfig` from the hub; else a
ModelConfigError naming the config field and where to put the file. `builtin:tiny-llama` reads
the cached build, or its `sppo.tiny.TinySpec` before the first build.

`count_params(config)` computes the parameter count (and one layer's) for Llama, Mistral, Qwen2
and DeBERTa-v2/v3 from the architecture: embeddings, attention with grouped KV heads and
optional biases, the gated MLP, norms, and the lm_head unless tied. tests/sppo/test_model_facts.py
checks it against models built on the meta device. Other architectures are built on the meta
device with transformers (a few seconds; exact for any architecture it knows).

Not here: memory (`sppo.plan`) and anything that loads weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sppo.config import Config
from sppo.tiny import TinySpec
from sppo.tiny_gpm import TinyGPMSpec

__all__ = ["MODELS_DIR", "PAIRRM_BACKBONE", "ModelConfigError", "ModelFacts", "load_model_config",
           "count_params", "model_facts", "judge_facts"]

MODELS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
PAIRRM_BACKBONE = "microsoft/deberta-v3-large"  # what llm-blender/PairRM's config names
PAIRRM_PREFIX_TOKENS = 4  # llm-blender's collator adds 4 tokens; embeddings grow to match


class ModelConfigError(ValueError):
    """A model whose config.json cannot be read; `field` is the config field that named it."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def load_model_config(value: str, field_name: str, cache_dir: str = "~/.cache/sppo-ray"
                      ) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, where it was read) for a model named by `value`."""
    if value.startswith("builtin:"):
        if value not in ("builtin:tiny-llama", "builtin:tiny-gpm"):
            raise ModelConfigError(field_name, f"unknown builtin model {value!r}")
        # The cache layout of ensure_tiny_llama / ensure_tiny_gpm, read without building
        # anything (the tiny GPM is the tiny Llama's shape with two small heads).
        gpm = TinyGPMSpec() if value == "builtin:tiny-gpm" else None
        spec = gpm.backbone if gpm else TinySpec()
        built = Path(cache_dir).expanduser() / (f"tiny-gpm-{gpm.key()}" if gpm else
                                                f"tiny-llama-{spec.key()}") / "config.json"
        if built.is_file():
            return json.loads(built.read_text()), str(built)
        # Not built yet: the spec (its vocab_size is the tokenizer's target size).
        return {"model_type": "llama", "tie_word_embeddings": False,
                **dataclasses.asdict(spec)}, "sppo.tiny.TinySpec"
    local = Path(value).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return json.loads((local / "config.json").read_text()), str(local / "config.json")
        raise ModelConfigError(field_name, f"{str(local)!r} holds no config.json")
    if value.startswith(("/", ".", "~")):
        raise ModelConfigError(field_name, f"{value!r} is not a directory")
    stored = MODELS_DIR / value / "config.json"
    if ".." not in Path(value).parts and stored.is_file():
        return json.loads(stored.read_text()), str(stored.relative_to(MODELS_DIR.parent.parent))
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(value).to_dict(), f"the hub ({value})"
    except Exception as exc:  # offline, unknown id, gated repo: all end here
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    raise ModelConfigError(field_name, (
        f"cannot read the config.json of {value!r}: not a local directory, not in "
        f"configs/models/{value}/config.json, and the hub did not give it ({reason}); copy the "
        f"model's config.json to configs/models/{value}/config.json or point {field_name} at "
        "a local model directory"))


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs of one model. `block_params`: one decoder (or encoder) layer."""

    name: str
    source: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    params: int
    block_params: int
    checkpoint_dtype_bytes: int = 2  # config.json's (torch_)dtype: 4 for float32, else 2

    @property
    def root_params(self) -> int:  # embeddings, final norm, lm_head
        return self.params - self.layers * self.block_params

    def describe(self) -> str:
        gqa = f", {self.kv_heads} KV heads" if self.kv_heads != self.heads else ""
        size = f" ({self.params / 1e9:.2f}B)" if self.params >= 10**8 else ""
        return (f"{self.name}: {self.model_type}, {self.params:,} parameters{size}, "
                f"{self.layers} layers, hidden {self.hidden}{gqa}, vocab {self.vocab} "
                f"(config: {self.source})")


_LLAMA_LIKE = ("llama", "mistral", "qwen2")


def count_params(config: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, one layer's) from a config dict: computed for Llama, Mistral, Qwen2 and
    DeBERTa-v2/v3 (the base model, no head); other architectures are built on the meta device
    with transformers (slower, but exact for anything it knows)."""
    kind = config.get("model_type")
    if kind in _LLAMA_LIKE or kind == "deberta-v2":
        h, L = config["hidden_size"], config["num_hidden_layers"]
    if kind in _LLAMA_LIKE:
        heads = config["num_attention_heads"]
        hd = config.get("head_dim") or h // heads
        q, kv = heads * hd, (config.get("num_key_value_heads") or heads) * hd
        i, v = config["intermediate_size"], config["vocab_size"]
        attn = h * q + 2 * h * kv + q * h
        if kind == "qwen2":
            attn += q + 2 * kv
        elif config.get("attention_bias"):
            attn += q + 2 * kv + h
        mlp = 3 * h * i + ((2 * i + h) if config.get("mlp_bias") else 0)
        block = attn + mlp + 2 * h
        tied = config.get("tie_word_embeddings", False)
        return v * h + L * block + h + (0 if tied else v * h), block
    if kind == "deberta-v2" and not config.get("conv_kernel_size"):
        e, i, v = config.get("embedding_size") or h, config["intermediate_size"], config[
            "vocab_size"]
        emb = v * e + 2 * h + (e * h if e != h else 0)
        if config.get("position_biased_input", True):
            emb += config["max_position_embeddings"] * e
        emb += (config.get("type_vocab_size") or 0) * e
        block = 3 * (h * h + h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
        rel = 0
        if config.get("relative_attention"):
            span = config.get("position_buckets", -1)
            if span <= 0:
                span = config.get("max_relative_positions", -1)
                span = span if span >= 1 else config["max_position_embeddings"]
            rel = 2 * span * h + (2 * h if "layer_norm" in str(config.get("norm_rel_ebd")) else 0)
            pos = config.get("pos_att_type") or []
            pos = pos.lower().split("|") if isinstance(pos, str) else pos
            if not config.get("share_att_key"):
                block += (h * h + h) * (("c2p" in pos) + ("p2c" in pos))
        return emb + rel + L * block, block
    return _count_on_meta(config)


def _count_on_meta(config: dict[str, Any]) -> tuple[int, int]:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    conf = AutoConfig.for_model(config["model_type"], **kwargs)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(conf)
        except ValueError:  # not a causal LM (e.g. an encoder)
            model = AutoModel.from_config(conf)
    total = sum(p.numel() for p in model.parameters())
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    first = next((m for m in model.modules() if type(m).__name__ in blocks), None)
    if first is None:  # no declared block class: an even split over the layers
        return total, total // config["num_hidden_layers"]
    return total, sum(p.numel() for p in first.parameters())


def model_facts(config: dict[str, Any], name: str, source: str, field_name: str) -> ModelFacts:
    """The facts of the model `config` describes (`name`, `source`: for the report). A config
    without the usual transformers names (hidden_size, num_hidden_layers, ...) is a
    ModelConfigError on `field_name`."""
    try:
        params, block = count_params(config)
        h, heads = config["hidden_size"], config["num_attention_heads"]
        return ModelFacts(
            name=name, source=source, model_type=config.get("model_type", "?"), hidden=h,
            intermediate=config["intermediate_size"], layers=config["num_hidden_layers"],
            heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or h // heads, vocab=config["vocab_size"],
            max_positions=config.get("max_position_embeddings") or 0, params=params,
            block_params=block, checkpoint_dtype_bytes=4 if (
                config.get("dtype") or config.get("torch_dtype")) == "float32" else 2)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelConfigError(field_name, f"the config.json of {name!r} ({source}) does not "
                               f"describe a model the plan can size: {exc!r}") from None


def judge_facts(cfg: Config) -> Optional[ModelFacts]:
    """The judge's model (None for a Python judge). An LLM judge is its causal LM as it is.
    A PairRM ranker's config.json names its backbone (`judge.backbone` overrides it); the
    checkpoint adds the collator's prefix rows to the embeddings and a scoring head. A reward
    model or a GPM counts as its architecture's model (for a causal-LM backbone that includes
    an lm_head it does not run: an upper bound)."""
    j = cfg.judge
    if j.backend == "python":
        return None
    config, source = load_model_config(j.model_path, "judge.model_path", cfg.model.cache_dir)
    if j.backend in ("llm", "reward_model", "gpm"):  # a GPM's heads: a few hidden-size rows
        return model_facts(config, j.model_path, source, "judge.model_path")
    if j.backend != "pairrm":
        raise ModelConfigError("judge.backend", f"{j.backend!r}: the plan cannot size its model")
    name = j.backbone or config.get("model_name") or PAIRRM_BACKBONE
    backbone, where = load_model_config(name, "judge.backbone", cfg.model.cache_dir)
    facts = model_facts(backbone, f"{j.model_path} on {name}", where, "judge.backbone")
    h = facts.hidden
    extra = PAIRRM_PREFIX_TOKENS * h + (2 * h * h + h) + (h + 1)
    return dataclasses.replace(facts, params=facts.params + extra)
