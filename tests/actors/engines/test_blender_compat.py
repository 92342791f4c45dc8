"""The llm-blender shim is still needed (transformers still lacks what it restores) and still
works (llm-blender imports and ranks with a tiny PairRM). When transformers brings a name back,
`test_shim_still_needed` fails: drop that patch from `actors/engines/blender_compat.py`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from actors.engines import blender_compat
from sppo.tiny_pairrm import ensure_tiny_pairrm

_PROBE = """
import importlib, json

def owner(path):  # a module, or a class inside one
    try:
        return importlib.import_module(path)
    except ImportError:
        mod, _, name = path.rpartition(".")
        return getattr(importlib.import_module(mod), name)

missing = [attr for path, attr in {names!r} if not hasattr(owner(path), attr)]
try:
    import llm_blender
    error = None
except ImportError as exc:
    error = str(exc)
print(json.dumps({{"missing": missing, "import_error": error}}))
"""


@pytest.fixture(scope="module")
def tiny_pairrm(tmp_path_factory):
    return ensure_tiny_pairrm(tmp_path_factory.getbasetemp() / "tiny-pairrm")


def test_shim_still_needed():
    """In a fresh interpreter (no shim applied), every patched name is missing from
    transformers and a bare `import llm_blender` fails."""
    code = _PROBE.format(names=list(blender_compat.PATCHED_NAMES))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    wanted = [attr for _, attr in blender_compat.PATCHED_NAMES]
    assert got["missing"] == wanted, (
        f"transformers has {sorted(set(wanted) - set(got['missing']))} again: "
        "remove that patch from actors/engines/blender_compat.py")
    assert got["import_error"] is not None and "TRANSFORMERS_CACHE" in got["import_error"], (
        "llm_blender imports without the shim now; the TRANSFORMERS_CACHE patch is unneeded")


def test_shim_is_idempotent_and_additive():
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    import transformers.utils.hub as hub

    blender_compat.apply()
    first = (hub.TRANSFORMERS_CACHE, PreTrainedTokenizerBase.batch_encode_plus)
    blender_compat.apply()
    assert (hub.TRANSFORMERS_CACHE, PreTrainedTokenizerBase.batch_encode_plus) == first


def test_batch_encode_plus_matches_call(tiny_pairrm):
    from transformers import AutoTokenizer

    blender_compat.apply()
    tok = AutoTokenizer.from_pretrained(str(tiny_pairrm.backbone_dir))
    texts = ["the cat sat", "a much longer sentence about the river and the sea"]
    kwargs = dict(max_length=8, padding="max_length", truncation=True, return_tensors="pt")
    old = tok.batch_encode_plus(texts, **kwargs)
    new = tok(texts, **kwargs)
    assert old.keys() == new.keys()
    for k in new:
        assert old[k].tolist() == new[k].tolist()
    pairs = tok.batch_encode_plus([("q one", "a one"), ("q two", "a two")])
    assert pairs["input_ids"] == tok(["q one", "q two"], ["a one", "a two"])["input_ids"]


def test_llm_blender_imports_and_ranks(tiny_pairrm):
    llm_blender = blender_compat.import_llm_blender()
    blender = llm_blender.Blender(llm_blender.BlenderConfig(device="cpu", use_tqdm=False))
    blender.loadranker(str(tiny_pairrm.ranker_dir), device="cpu",
                       model_name=str(tiny_pairrm.backbone_dir))
    scores = blender.rank(["what is the sun?"], [["a star", "a hot fire in the sky", "no"]],
                          return_scores=True, batch_size=1)
    assert scores.shape == (1, 3) and np.isfinite(scores).all()
    assert np.ptp(scores) > 0  # the tiny ranker does tell candidates apart
