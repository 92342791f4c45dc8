"""Tests of actors/factory.py: resources from the pool's config through `.options()`, the nodes
the caller's label selector names, and a placement group per actor for tensor parallelism.

`ray.remote` is replaced by a recorder (no actor starts); the placement group is a real, tiny
one, whose bundles and selectors are recorded as the factory asked for them.
"""

from __future__ import annotations

import actors.factory as factory_mod
from actors.factory import ActorFactory, anywhere
from actors.generator import Generator
from sppo.config import PoolConfig

GENERATOR_NODES = {"role": "generator"}


class Recorder:
    """Stands in for `ray.remote(cls)`: records the `.options()` instead of starting one."""

    def __init__(self, seen: dict):
        self.seen = seen

    def options(self, **kw):
        self.seen["options"] = kw
        return self

    def remote(self, *args):
        self.seen["args"] = args
        return "handle"


def test_resources_from_the_config_and_the_nodes_the_caller_names(ray_cluster, monkeypatch):
    seen: dict = {}
    monkeypatch.setattr(factory_mod.ray, "remote", lambda cls: Recorder(seen))
    pool = PoolConfig(num_cpus=2, num_gpus=1, max_restarts=1)
    assert ActorFactory(Generator, pool, ("build",))() == "handle"
    assert seen["options"] == dict(num_cpus=2.0, num_gpus=1.0, max_restarts=1,
                                   max_task_retries=0)  # anywhere: no selector
    assert seen["args"] == ("build",) and anywhere() is None
    asked = []
    ActorFactory(Generator, pool, ("build",),
                 label_selector=lambda: asked.append(1) or GENERATOR_NODES, max_concurrency=6)()
    assert seen["options"]["label_selector"] == GENERATOR_NODES
    assert seen["options"]["max_concurrency"] == 6 and asked == [1]  # asked per actor


def test_tensor_parallel_actor_gets_a_placement_group_with_the_selector_on_every_bundle(
        ray_cluster, monkeypatch):
    seen: dict = {}
    groups = []
    real_placement_group = factory_mod.placement_group
    monkeypatch.setattr(factory_mod.ray, "remote", lambda cls: Recorder(seen))
    monkeypatch.setattr(factory_mod, "placement_group", lambda bundles, **kw: groups.append(
        (bundles, kw)) or real_placement_group(
            [{"CPU": 0.01}], strategy="PACK"))  # a real, tiny group for the strategy to name
    pool = PoolConfig(num_cpus=2, num_gpus=1, max_restarts=1, tensor_parallel_size=2)
    tp = ActorFactory(Generator, pool, ("build",), label_selector=lambda: GENERATOR_NODES,
                      tensor_parallel=True)
    try:
        tp()
        (bundles, kw), = groups
        assert bundles == [{"GPU": 1.0, "CPU": 2.0}, {"GPU": 1.0}]
        assert kw["bundle_label_selector"] == [GENERATOR_NODES] * 2
        # The group carries the placement: the actor itself asks for nothing.
        assert "label_selector" not in seen["options"] and seen["options"]["num_gpus"] == 0
        assert seen["options"]["scheduling_strategy"].placement_group_capture_child_tasks
    finally:
        tp.release()
