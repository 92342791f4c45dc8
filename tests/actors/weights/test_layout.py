"""Tests of actors/weights/layout.py: buckets by size and dtype, views of a flat bucket, the
layout as plain lists (what vLLM's `collective_rpc` carries)."""

from __future__ import annotations

import json

import torch

from actors.weights.layout import WeightLayout
from weights_state import state_of as _state


def test_layout_buckets_respect_size_and_dtype():
    state = _state(0)
    layout = WeightLayout.from_named(state.items(), bucket_mb=2048 / 2**20)  # 2 KiB buckets
    assert [s.name for s in layout.specs] == list(state)
    seen = [i for b in layout.buckets for i in b]
    assert seen == list(range(len(state)))  # every tensor once, in order
    for b in layout.buckets:
        dtypes = {layout.specs[i].dtype for i in b}
        assert len(dtypes) == 1
        size = sum(layout.specs[i].nbytes for i in b)
        assert size <= 2048 or len(b) == 1  # only a single over-size tensor may exceed
    assert layout.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
    big = WeightLayout.from_named(state.items(), bucket_mb=64)
    assert len(big.buckets) == 2  # float32 group, then the bf16 head


def test_split_round_trips_a_flat_bucket():
    state = _state(1)
    layout = WeightLayout.from_named(state.items(), bucket_mb=64)
    flat = torch.cat([state[layout.specs[i].name].reshape(-1) for i in layout.buckets[0]])
    for name, t in layout.split(0, flat).items():
        assert torch.equal(t, state[name])


def test_layout_travels_as_plain_lists_and_casts_to_the_wire_dtype():
    state = _state(3)
    layout = WeightLayout.from_named(state.items(), bucket_mb=1024 / 2**20,
                                     dtype=torch.bfloat16)
    wire = layout.to_wire()
    json.dumps(wire)  # what vLLM's collective_rpc and JSON can carry: no tensors
    assert WeightLayout.from_wire(wire) == layout
    assert {s.dtype for s in layout.specs} == {"bfloat16"}  # fp32 master copy -> generator dtype
    assert layout.total_bytes == sum(t.numel() * 2 for t in state.values())
    flat = layout.flat(0, state, torch.device("cpu"))
    assert flat.dtype == torch.bfloat16 and flat.numel() == layout.bucket_numel(0)
