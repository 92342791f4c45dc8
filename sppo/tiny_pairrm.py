"""A tiny PairRM checkpoint built offline: the judge's stand-in for `llm-blender/PairRM`.

The real PairRM is llm-blender's pairwise ranker on a DeBERTa-v3-large backbone. Tests, the demo
and the judge benchmark need the same code path without a model hub, so this module builds the
same three pieces at toy size, deterministically for a given `TinyPairRMSpec`:

1. a sentencepiece unigram model trained on a small generated English corpus, loaded as a
   `DebertaV2Tokenizer` through `from_pretrained(dir)` (under transformers 5,
   `DebertaV2Tokenizer(vocab_file=...)` silently ignores the file);
2. a randomly initialised `DebertaV2Model` backbone saved with its tokenizer in `backbone/`;
3. a ranker directory `ranker/` in the layout `Blender.loadranker` reads: llm-blender's ranker
   `config.json` (`ranker_type: pairranker`, `model_type: deberta`, `model_name`: the backbone
   directory) and `model.safetensors` holding the `CrossCompareReranker` state: the backbone
   with its embeddings grown by the 4 prefix tokens llm-blender's collator adds, plus the
   scoring head.

`ensure_tiny_pairrm` caches the result under a directory keyed by the spec. Not here: training
the ranker (its preferences are random but fixed; the demo's readable preference is
`sppo.demo_judge`) and anything that imports llm-blender.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from sppo.tiny import WORDS

__all__ = ["TinyPairRMSpec", "TinyPairRM", "build_tokenizer", "save_tiny_pairrm",
           "ensure_tiny_pairrm", "NUM_PREFIX_TOKENS"]

# llm-blender's CrossCompareCollator adds <|source|>, <|candidate1|>, <|candidate2|> and
# <|candidate|> to the tokenizer, and build_ranker resizes the embeddings to match.
NUM_PREFIX_TOKENS = 4

# Bump when the build below changes, so that cached checkpoints are rebuilt.
_RECIPE = 1

# The real PairRM's ranker config, with its backbone replaced by the local one.
_RANKER_CONFIG = {
    "ranker_type": "pairranker",
    "model_type": "deberta",
    "load_checkpoint": None,
    "source_maxlength": 1224,
    "candidate_maxlength": 412,
    "n_tasks": 1,
    "num_pos": 5,
    "num_neg": 5,
    "sub_sampling_mode": "all_pair",
    "sub_sampling_ratio": 0.4,
    "loss_type": "instructgpt",
    "reduce_type": "linear",
    "inference_mode": "bubble",
    "drop_out": 0.05,
    "fp16": True,
    "device": None,
}


@dataclass(frozen=True)
class TinyPairRMSpec:
    vocab_size: int = 800  # a ceiling: sentencepiece stops where the corpus runs out
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    # Far above DeBERTa's 0.02 so that a random model's logits depend on the text: at 0.02
    # attention is near-uniform and l_ij barely moves with the candidates.
    initializer_range: float = 0.5
    corpus_lines: int = 3000
    seed: int = 0

    def key(self) -> str:
        blob = (json.dumps(asdict(self), sort_keys=True) + " ".join(WORDS)
                + json.dumps(_RANKER_CONFIG) + f"recipe-{_RECIPE}")
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TinyPairRM:
    """Where a built checkpoint lives: pass `ranker_dir` as the judge's `model_path` and
    `backbone_dir` as its `backbone`."""

    ranker_dir: Path
    backbone_dir: Path


def _corpus(spec: TinyPairRMSpec) -> list[str]:
    rng = random.Random(spec.seed)
    lines = []
    for _ in range(spec.corpus_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 20))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(".,!?"))
    lines.append("".join(chr(c) for c in range(33, 127)))  # every printable ASCII character
    return lines


def _train_spm(spec: TinyPairRMSpec) -> bytes:
    """A serialized sentencepiece unigram model with DeBERTa-v3's special-token layout."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(spec)), model_writer=buf,
        vocab_size=spec.vocab_size, hard_vocab_limit=False, model_type="unigram",
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, minloglevel=2,
        pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]",
        unk_id=3, unk_piece="[UNK]", user_defined_symbols=["[MASK]"],
    )
    return buf.getvalue()


def build_tokenizer(spec: TinyPairRMSpec, workdir: str | Path):
    """A `DebertaV2Tokenizer` from a freshly trained sentencepiece model (written to workdir)."""
    from transformers import DebertaV2Tokenizer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spm.model").write_bytes(_train_spm(spec))
    return DebertaV2Tokenizer.from_pretrained(str(workdir))


def _backbone_config(spec: TinyPairRMSpec, tokenizer):
    from transformers import DebertaV2Config

    # DeBERTa-v3's architecture (relative attention, no absolute positions) at toy size.
    return DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        max_relative_positions=-1,
        layer_norm_eps=1e-7,
        initializer_range=spec.initializer_range,
        type_vocab_size=0,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,  # not derived from the tokenizer: set by hand
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )


def save_tiny_pairrm(out_dir: str | Path, spec: TinyPairRMSpec = TinyPairRMSpec()) -> TinyPairRM:
    """Build tokenizer, backbone and ranker under `out_dir` (written atomically)."""
    import torch
    from safetensors.torch import save_file
    from transformers import DebertaV2Model

    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_tokenizer(spec, tmp / "spm")
    config = _backbone_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        backbone = DebertaV2Model(config).eval()
        h = spec.hidden_size
        # llm-blender's CrossCompareReranker.head_layer: Dropout, Linear, Tanh, Dropout, Linear.
        head = torch.nn.Sequential(torch.nn.Dropout(0.05), torch.nn.Linear(2 * h, h),
                                   torch.nn.Tanh(), torch.nn.Dropout(0.05), torch.nn.Linear(h, 1))
        with torch.no_grad():
            head[4].weight.mul_(10.0)  # logits of order 1, so sigmoids are not all ~1/2
        prefix_rows = torch.randn(NUM_PREFIX_TOKENS, h) * config.initializer_range

    backbone_dir = tmp / "backbone"
    backbone.save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    shutil.rmtree(tmp / "spm")

    state = {f"pretrained_model.{k}": v for k, v in backbone.state_dict().items()}
    emb = "pretrained_model.embeddings.word_embeddings.weight"
    state[emb] = torch.cat([state[emb], prefix_rows])  # (vocab + 4, hidden)
    state.update({f"head_layer.{k}": v for k, v in head.state_dict().items()})
    ranker_dir = tmp / "ranker"
    ranker_dir.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(ranker_dir / "model.safetensors"))
    # model_name points at the final location; loaders may still override it (backbone=...).
    ranker_config = {**_RANKER_CONFIG, "model_name": str(out / "backbone"), "cache_dir": None}
    (ranker_dir / "config.json").write_text(json.dumps(ranker_config, indent=2))
    (tmp / "tiny_pairrm_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    try:
        tmp.rename(out)
    except OSError:  # another process won the race; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return TinyPairRM(ranker_dir=out / "ranker", backbone_dir=out / "backbone")


def ensure_tiny_pairrm(cache_dir: str | Path = "~/.cache/sppo-ray",
                       spec: TinyPairRMSpec = TinyPairRMSpec()) -> TinyPairRM:
    """The cached tiny PairRM for `spec`, built on first use."""
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"tiny-pairrm-{spec.key()}"
    if not (out / "ranker" / "model.safetensors").is_file():
        return save_tiny_pairrm(out, spec)
    return TinyPairRM(ranker_dir=out / "ranker", backbone_dir=out / "backbone")
