"""Tests of actors/weights.py: bucket layout, and real gloo broadcasts between Ray actors."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from actors.weights import CollectiveSender, WeightLayout, bucket_arrays, receive_collective


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


class Holder:
    """Stands in for a generator: holds named tensors and loads received buckets."""

    def __init__(self, seed: int):
        self.state = _state(seed)

    def receive(self, address, rank, layout):
        n = 0
        for bucket in receive_collective(address, rank, layout):
            for name, t in bucket.items():
                self.state[name].copy_(t)
                n += 1
        return n

    def get(self):
        return {k: v.float().numpy() for k, v in self.state.items()}


class Sender:
    def __init__(self, seed: int):
        self.state = _state(seed)
        self.sender = CollectiveSender("gloo", timeout_s=60)

    def address(self, world_size):
        return self.sender.address(world_size)

    def send(self, layout, world_size):
        return self.sender.send(self.state, layout, world_size)

    def get(self):
        return {k: v.float().numpy() for k, v in self.state.items()}


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_collective_broadcast_reaches_every_receiver(ray_cluster, backend):
    if backend == "nccl" and not torch.cuda.is_available():
        pytest.skip("nccl broadcast needs CUDA GPUs; none on this machine")
    n = 3
    sender = ray.remote(Sender).options(num_cpus=0.1).remote(seed=7)
    holders = [ray.remote(Holder).options(num_cpus=0.1).remote(seed=i) for i in range(n)]
    layout = WeightLayout.from_named(_state(7).items(), bucket_mb=1024 / 2**20)
    assert len(layout.buckets) > 2  # really bucketed
    for _ in range(2):  # one sender serves every round: each sync gets a fresh group
        address = ray.get(sender.address.remote(n + 1))
        recv = [h.receive.remote(address, rank + 1, layout) for rank, h in enumerate(holders)]
        stats = ray.get(sender.send.remote(layout, n + 1))
        assert ray.get(recv) == [len(layout.specs)] * n
    assert stats["buckets"] == len(layout.buckets) and stats["bytes"] == layout.total_bytes
    want = ray.get(sender.get.remote())
    for h in holders:
        got = ray.get(h.get.remote())
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    for a in [sender, *holders]:
        ray.kill(a)
