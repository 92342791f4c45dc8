"""Tests of cluster/autoscale.py: the policy stepped on a clock passed in (no Ray, no sleeping),
`cluster_has_room` against the local Ray cluster, and the policy driving a real `ActorDispatcher` of
echo actors through a backlog and back.
"""

from __future__ import annotations

import time

import pytest
import ray

from actors.dispatch import ActorDispatcher, PoolCallError
from cluster.autoscale import (AutoscaleTarget, PipelineAutoscaler, QueueAutoscaler,
                               cluster_has_room, scale_pool)
from cluster.pipeline import Backlog
from ray_echo import Echo


def _policy(**overrides) -> QueueAutoscaler:
    args = dict(min_replicas=1, max_replicas=3, scale_up_backlog=4, scale_down_idle_s=10.0,
                cooldown_s=5.0)
    return QueueAutoscaler(**{**args, **overrides})


def test_grows_by_one_only_beyond_the_backlog_and_with_room():
    p = _policy(cooldown_s=0.0)
    assert p.decide(size=1, queued=4, in_flight=2, now=0.0, room=True) == 1  # at threshold
    assert p.decide(size=1, queued=5, in_flight=2, now=1.0, room=False) == 1  # no room
    assert p.decide(size=1, queued=50, in_flight=2, now=2.0, room=True) == 2  # one step
    assert p.decide(size=2, queued=50, in_flight=4, now=3.0, room=True) == 3
    assert p.decide(size=3, queued=50, in_flight=6, now=4.0, room=True) == 3  # max


def test_cooldown_after_a_change():
    p = _policy(cooldown_s=5.0)
    assert p.decide(1, queued=9, in_flight=2, now=100.0, room=True) == 2
    assert p.decide(2, queued=9, in_flight=4, now=104.9, room=True) == 2  # cooling down
    assert p.decide(2, queued=9, in_flight=4, now=105.0, room=True) == 3


def test_shrinks_by_one_after_an_idle_period_and_waits_again():
    p = _policy(scale_down_idle_s=10.0, cooldown_s=0.0)
    assert p.decide(3, queued=0, in_flight=1, now=0.0, room=True) == 3  # busy
    assert p.decide(3, queued=0, in_flight=0, now=1.0, room=True) == 3  # idle from t=1
    assert p.decide(3, queued=0, in_flight=0, now=10.9, room=True) == 3
    assert p.decide(3, queued=0, in_flight=0, now=11.0, room=True) == 2
    assert p.decide(2, queued=0, in_flight=0, now=12.0, room=True) == 2  # a new idle period
    assert p.decide(2, queued=0, in_flight=0, now=21.0, room=True) == 1
    assert p.decide(1, queued=0, in_flight=0, now=99.0, room=True) == 1  # min
    # Work in between restarts the idle clock.
    p = _policy(scale_down_idle_s=10.0, cooldown_s=0.0)
    p.decide(2, queued=0, in_flight=0, now=0.0, room=True)
    p.decide(2, queued=1, in_flight=0, now=5.0, room=True)
    assert p.decide(2, queued=0, in_flight=0, now=12.0, room=True) == 2  # idle from t=12
    assert p.decide(2, queued=0, in_flight=0, now=21.9, room=True) == 2
    assert p.decide(2, queued=0, in_flight=0, now=22.0, room=True) == 1


def test_out_of_range_sizes_are_corrected_at_once_even_while_cooling():
    p = _policy(cooldown_s=60.0)
    assert p.decide(1, queued=9, in_flight=2, now=0.0, room=True) == 2
    assert p.decide(7, queued=0, in_flight=0, now=1.0, room=True) == 3
    assert p.decide(0, queued=0, in_flight=0, now=2.0, room=True) == 1


def test_a_manual_resize_gets_a_cooldown_too():
    p = _policy(scale_down_idle_s=0.0, cooldown_s=30.0)
    assert p.decide(1, queued=0, in_flight=0, now=0.0, room=True) == 1
    # An operator scaled to 3 through the control service: not undone at once.
    assert p.decide(3, queued=0, in_flight=0, now=1.0, room=True) == 3
    assert p.decide(3, queued=0, in_flight=0, now=30.0, room=True) == 3
    assert p.decide(3, queued=0, in_flight=0, now=31.0, room=True) == 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        _policy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="cooldown_s"):
        _policy(cooldown_s=-1.0)


def test_cluster_has_room(ray_cluster):
    assert cluster_has_room(num_cpus=0.1, num_gpus=0)
    assert not cluster_has_room(num_cpus=1e6, num_gpus=0)
    gpus = ray.available_resources().get("GPU", 0.0)
    assert not cluster_has_room(num_cpus=0, num_gpus=gpus + 1)


def test_a_backlog_grows_a_real_pool_and_idling_shrinks_it(ray_cluster):
    make = lambda: ray.remote(Echo).options(num_cpus=0.1).remote(0.05)  # noqa: E731
    pool = ActorDispatcher(make, size=1, max_in_flight=2, name="echo")
    policy = QueueAutoscaler(min_replicas=1, max_replicas=3, scale_up_backlog=4,
                             scale_down_idle_s=0.3, cooldown_s=0.2)
    try:
        for i in range(60):
            pool.submit(i, lambda actor, x: actor.work.remote(x))
        got, sizes = [], []
        while pool.num_pending():
            got.extend(pool.results(timeout=0.05))
            sizes.append(scale_pool(pool, policy, room=cluster_has_room(0.1, 0)))
        assert max(sizes) == 3  # grown step by step while the backlog lasted
        assert sorted(item for item, _ in got) == list(range(60))  # none lost or doubled
        assert not any(isinstance(r, PoolCallError) for _, r in got)
        assert len({pid for _, (_, pid) in got}) >= 2  # new actors took work

        deadline = time.monotonic() + 30
        while pool.size > 1:  # idle now: back down to min, one step per idle period
            assert time.monotonic() < deadline
            scale_pool(pool, policy, room=True)
            pool.results(timeout=0.05)  # reaps drained actors
        assert len(pool.actors()) == 1

        # A caller holding the backlog itself (the pipeline submits only into free slots).
        time.sleep(0.2)  # past the cooldown
        assert pool.num_queued() == 0
        assert scale_pool(pool, policy, room=True, queued=100) == 2
        assert len(pool.actors()) == 2
    finally:
        pool.shutdown()


def test_pipeline_autoscaler_steps_each_pool_on_its_own_backlog(ray_cluster):
    """The pipeline's tick: each pool grows on its own stage's backlog, at most once per
    `every_s`, and only with room for its actor's resources."""
    make = lambda: ray.remote(Echo).options(num_cpus=0.1).remote(0.0)  # noqa: E731
    gen = ActorDispatcher(make, size=1, max_in_flight=2, name="gen")
    judge = ActorDispatcher(make, size=1, max_in_flight=2, name="judge")
    asked: list[tuple[float, float]] = []
    now = [0.0]

    def room(cpus, gpus):
        asked.append((cpus, gpus))
        return gpus == 0  # the judge asks for a GPU the cluster lacks

    def policy():
        return QueueAutoscaler(min_replicas=1, max_replicas=3, scale_up_backlog=4,
                               scale_down_idle_s=100.0, cooldown_s=0.0)

    tick = PipelineAutoscaler([AutoscaleTarget(gen, policy(), "generate", 0.1, 0.0),
                               AutoscaleTarget(judge, policy(), "judge", 0.1, 1.0)],
                              every_s=1.0, room=room, clock=lambda: now[0])
    try:
        tick(Backlog(generate=50, judge=50))
        assert (gen.size, judge.size) == (2, 1)  # the judge had no room
        tick(Backlog(generate=50, judge=50))  # within every_s: no step at all
        assert gen.size == 2 and len(asked) == 2
        now[0] = 1.5
        tick(Backlog(generate=0, judge=50))  # generation no longer backed up
        assert (gen.size, judge.size) == (2, 1)
        assert asked == [(0.1, 0.0), (0.1, 1.0)] * 2
    finally:
        gen.shutdown()
        judge.shutdown()
