"""The one compatibility shim that lets llm-blender 0.0.2 run under transformers 5.

llm-blender was written against transformers 4 and uses two names that transformers 5 removed:

- `transformers.utils.hub.TRANSFORMERS_CACHE`, imported at module level by
  `llm_blender.blender.blender` and `llm_blender.blender.blender_utils` (only as the default
  `cache_dir` of `Blender.loadranker`); we restore it as the hub cache directory.
- `PreTrainedTokenizerBase.batch_encode_plus`, called by the PairRM collator
  (`llm_blender.pair_ranker.collator.encode_texts`); we restore it as a thin alias of
  `tokenizer(texts, **kwargs)`, which is what it was in transformers 4 for a list of strings.

`encode_plus` was removed too but llm-blender never calls it, so it is left alone. The patch is
additive (it only sets names that are missing) and idempotent; call `import_llm_blender()`
instead of `import llm_blender` anywhere in this project. `tests/actors/engines/
test_blender_compat.py` fails as soon as either patch stops being needed or stops working.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["apply", "import_llm_blender", "PATCHED_NAMES"]

# What `apply` restores, as (module or class path, attribute): the test checks each is still
# missing from transformers, i.e. that the shim is still needed.
PATCHED_NAMES = (
    ("transformers.utils.hub", "TRANSFORMERS_CACHE"),
    ("transformers.tokenization_utils_base.PreTrainedTokenizerBase", "batch_encode_plus"),
)


def _batch_encode_plus(self, batch_text_or_text_pairs, **kwargs):
    """transformers 4's `batch_encode_plus`: a batch of texts or (text, text_pair) tuples."""
    batch = list(batch_text_or_text_pairs)
    if batch and isinstance(batch[0], tuple):
        return self([a for a, _ in batch], [b for _, b in batch], **kwargs)
    return self(batch, **kwargs)


def apply() -> None:
    """Restore the names llm-blender needs, where transformers lacks them. Idempotent."""
    import transformers.utils.hub as hub
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        from huggingface_hub import constants

        # transformers 4 honoured the old env var first, then fell back to the hub cache.
        hub.TRANSFORMERS_CACHE = os.environ.get("TRANSFORMERS_CACHE") or constants.HF_HUB_CACHE
    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        PreTrainedTokenizerBase.batch_encode_plus = _batch_encode_plus


def import_llm_blender() -> ModuleType:
    """`import llm_blender` with the shim applied first."""
    apply()
    import llm_blender

    return llm_blender
