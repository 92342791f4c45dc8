"""Tests of actors/weights.py: the bucket layout, and real gloo groups between Ray actors
(NCCL needs CUDA GPUs: the same code with `backend="nccl"`, not run here)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import ray
import torch

from actors.weights import (GroupAddress, ReceiverFailed, WeightLayout, WeightReceiver,
                            WeightSender, bucket_arrays)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layers.0.w": torch.randn(16, 16, generator=g),
        "layers.0.b": torch.randn(16, generator=g),
        "layers.1.w": torch.randn(16, 16, generator=g),
        "scale": torch.randn((), generator=g),
        "head.weight": torch.randn(50, 16, generator=g).to(torch.bfloat16),
    }


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


def test_bucket_arrays_are_numpy_and_complete():
    state = _state(2)
    layout = WeightLayout.from_named(state.items(), bucket_mb=64)
    merged = {k: v for b in bucket_arrays(state, layout) for k, v in b.items()}
    assert set(merged) == set(state)
    assert all(isinstance(v, np.ndarray) for v in merged.values())
    np.testing.assert_allclose(merged["head.weight"], state["head.weight"].float().numpy())


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


class Holder:
    """Stands in for a generator's receiving process: holds named tensors, joins the group
    and loads each received bucket in place; `fail_at` makes it stop receiving at that
    bucket (an error in its loader) while its process lives on."""

    def __init__(self, seed: int, fail_at: int = -1):
        self.state = _state(seed)
        self.fail_at = fail_at
        self.receiver = None

    def join(self, address: dict, rank: int) -> None:
        self.receiver = WeightReceiver(GroupAddress.from_wire(address), rank)

    def receive(self, layout: dict) -> int:
        n = 0
        for b, bucket in enumerate(self.receiver.receive(WeightLayout.from_wire(layout))):
            if b == self.fail_at:
                raise ValueError(f"cannot load bucket {b}")
            for name, t in bucket.items():
                self.state[name].copy_(t)
                n += 1
        return n

    def get(self):
        return {k: v.float().numpy() for k, v in self.state.items()}


def _group(n: int, fail_at: dict[int, int] = {}):
    """A sender and `n` holders joined in one group; holder i stops at bucket fail_at[i]."""
    sender = WeightSender("gloo", timeout_s=60)
    holders = [ray.remote(Holder).options(num_cpus=0.1).remote(seed=i,
                                                                fail_at=fail_at.get(i, -1))
               for i in range(n)]
    address = sender.open_group(n + 1)
    joins = [h.join.remote(address.to_wire(), rank + 1) for rank, h in enumerate(holders)]
    sender.connect(address)
    ray.get(joins)
    return sender, holders


def _checker(refs: list):
    """The sender's `check`: group ranks (refs[i] is rank i + 1) whose call has failed."""
    def check() -> dict[int, str]:
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        out = {}
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:
                out[refs.index(ref) + 1] = str(exc).splitlines()[-1]
        return out
    return check


def test_one_group_serves_every_sync_and_every_receiver_gets_every_weight(ray_cluster):
    n = 3
    sender, holders = _group(n)
    prefix = sender.address.prefix
    for seed in (7, 8):  # two syncs on the same group
        state = _state(seed)
        layout = WeightLayout.from_named(state.items(), bucket_mb=1024 / 2**20)
        assert len(layout.buckets) > 2  # really bucketed
        recv = [h.receive.remote(layout.to_wire()) for h in holders]
        stats = sender.send(state, layout, _checker(recv))
        assert ray.get(recv) == [len(layout.specs)] * n and stats["failed"] == {}
        assert stats["buckets"] == len(layout.buckets) and stats["bytes"] == layout.total_bytes
        for h in holders:
            got = ray.get(h.get.remote())
            for name, want in state.items():
                np.testing.assert_array_equal(got[name], want.float().numpy())
    assert sender.address.prefix == prefix  # no new group per sync
    for h in holders:
        ray.kill(h)


def test_a_failing_receiver_is_named_at_once_and_the_others_finish(ray_cluster):
    """Receiver 2 stops receiving after its first bucket but its process lives on (an
    error in its loader): the sender names it as soon as its call fails, without waiting
    out the group's 60 s timeout, and the other receivers get every bucket."""
    sender, holders = _group(3, fail_at={1: 1})
    state = _state(9)
    layout = WeightLayout.from_named(state.items(), bucket_mb=1024 / 2**20)
    recv = [h.receive.remote(layout.to_wire()) for h in holders]
    t0 = time.monotonic()
    stats = sender.send(state, layout, _checker(recv))
    assert time.monotonic() - t0 < 20
    assert list(stats["failed"]) == [2] and "cannot load bucket 1" in stats["failed"][2]
    assert ray.get([recv[0], recv[2]]) == [len(layout.specs)] * 2
    with pytest.raises(ValueError, match="cannot load bucket 1"):
        ray.get(recv[1])
    for h in holders:
        ray.kill(h)


def test_a_receiver_that_never_joins_fails_the_rendezvous_at_once(ray_cluster):
    sender = WeightSender("gloo", timeout_s=60)
    ok = ray.remote(Holder).options(num_cpus=0.1).remote(seed=0)
    address = sender.open_group(3)
    joined = ok.join.remote(address.to_wire(), 1)
    t0 = time.monotonic()
    with pytest.raises(ReceiverFailed, match="actor died"):
        sender.connect(address, lambda: {2: "actor died"})  # rank 2 will never come
    assert time.monotonic() - t0 < 5
    ray.kill(ok)
    del joined
