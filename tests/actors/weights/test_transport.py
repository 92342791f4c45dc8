"""Tests of actors/weights/transport.py: real gloo groups between Ray actors (NCCL needs CUDA
GPUs: the same code with `backend="nccl"`, not run on a GPU)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

from actors.weights.layout import WeightLayout
from actors.weights.transport import GroupAddress, ReceiverFailed, WeightReceiver, WeightSender
from weights_state import state_of as _state


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


def _send(sender: WeightSender, state: dict, layout: WeightLayout, check) -> dict[int, str]:
    """Every bucket of `state` through `sender`, as the hand-off sends them; the failed ranks."""
    failed: dict[int, str] = {}
    for b in range(len(layout.buckets)):
        named = {layout.specs[i].name: state[layout.specs[i].name] for i in layout.buckets[b]}
        sender.send_bucket(b, layout.flat(b, named, torch.device("cpu")), failed, check)
    sender.flush(failed, check)
    return failed


def test_one_group_serves_every_sync_and_every_receiver_gets_every_weight(ray_cluster):
    n = 3
    sender, holders = _group(n)
    prefix = sender.address.prefix
    for seed in (7, 8):  # two syncs on the same group
        state = _state(seed)
        layout = WeightLayout.from_named(state.items(), bucket_mb=1024 / 2**20)
        assert len(layout.buckets) > 2  # really bucketed
        recv = [h.receive.remote(layout.to_wire()) for h in holders]
        assert _send(sender, state, layout, _checker(recv)) == {}
        assert ray.get(recv) == [len(layout.specs)] * n
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
    failed = _send(sender, state, layout, _checker(recv))
    assert time.monotonic() - t0 < 20
    assert list(failed) == [2] and "cannot load bucket 1" in failed[2]
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
