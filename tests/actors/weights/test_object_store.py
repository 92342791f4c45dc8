"""Tests of actors/weights/object_store.py: buckets as numpy arrays in the layout's dtypes,
put once in Ray's object store by the hand-off, and read back whole by a reader."""

from __future__ import annotations

import numpy as np
import ray
import torch

from actors.weights.layout import WeightLayout
from actors.weights.object_store import ObjectStoreHandOff, arrays_to_state_dict, bucket_arrays
from weights_state import state_of as _state


def test_bucket_arrays_are_numpy_and_complete():
    state = _state(2)
    layout = WeightLayout.from_named(state.items(), bucket_mb=64)
    merged = {k: v for b in bucket_arrays(state, layout) for k, v in b.items()}
    assert set(merged) == set(state)
    assert all(isinstance(v, np.ndarray) for v in merged.values())
    np.testing.assert_allclose(merged["head.weight"], state["head.weight"].float().numpy())


def test_the_hand_off_puts_each_bucket_once_in_the_layout_order(ray_cluster):
    state = _state(4)
    out = ObjectStoreHandOff(bucket_mb=1024 / 2**20, dtype="float32")(state, round_index=2)
    layout = WeightLayout.from_named(state.items(), 1024 / 2**20, dtype=torch.float32)
    assert out.stats["method"] == "object_store" and out.stats["version"] == 3
    assert len(out.buckets) == out.stats["buckets"] == len(layout.buckets) > 1
    buckets = ray.get(out.buckets)
    assert [list(b) for b in buckets] == [[layout.specs[i].name for i in idx]
                                          for idx in layout.buckets]
    back = arrays_to_state_dict(buckets)
    for name, t in state.items():
        assert back[name].dtype == torch.float32  # the layout's dtype; bf16 travels as fp32
        torch.testing.assert_close(back[name], t.float(), rtol=0, atol=0)
        back[name].add_(1)  # writable copies, not the object store's read-only arrays
