"""Tests of actors/dispatch.py on a real local Ray cluster with small echo actors."""

from __future__ import annotations

import time

import ray

from actors.dispatch import ActorDispatcher, PoolCallError
from ray_echo import Echo


def _factory(delay=0.05, max_restarts=0):
    return lambda: ray.remote(Echo).options(num_cpus=0.1, max_restarts=max_restarts).remote(delay)


def _work(actor, x):
    return actor.work.remote(x)


def test_every_item_once_with_bounded_in_flight(ray_cluster):
    pool = ActorDispatcher(_factory(), size=3, max_in_flight=2, name="echo")
    try:
        ray.get([a.pid.remote() for a in pool.actors()])  # all three up: the spread is fair
        for i in range(30):
            pool.submit(i, _work)
            assert pool.num_in_flight() <= 3 * 2
        assert pool.free_slots() == 3 * 2 - 30  # 6 slots, all busy; 24 queued
        got = pool.drain()
        assert sorted(item for item, _ in got) == list(range(30))
        assert all(res[0] == item for item, res in got)
        assert len({res[1] for _, res in got}) == 3  # work spread over all actors
        assert pool.num_pending() == 0
    finally:
        pool.shutdown()


def test_resize_up_and_down_mid_stream_loses_nothing(ray_cluster):
    pool = ActorDispatcher(_factory(delay=0.02), size=2, max_in_flight=2, name="echo")
    try:
        got, submitted = [], 0
        for step, target in enumerate([4, 1, 3, 2]):
            for _ in range(10):
                pool.submit(submitted, _work)
                submitted += 1
            got.extend(pool.results(timeout=0.5))
            pool.resize(target)
            assert pool.size == target
        got.extend(pool.drain())
        items = [item for item, _ in got]
        assert sorted(items) == list(range(submitted))  # none lost, none duplicated
        assert len(pool.actors()) == 2
        time.sleep(0.5)
        alive = ray.get([a.pid.remote() for a in pool.actors()])
        assert len(alive) == 2
    finally:
        pool.shutdown()


def test_method_error_is_reported_not_retried(ray_cluster):
    pool = ActorDispatcher(_factory(), size=1, max_in_flight=2, name="echo")
    try:
        for x in ["a", "boom", "c"]:
            pool.submit(x, _work)
        got = dict(pool.drain())
        assert isinstance(got["boom"], PoolCallError) and "bad item boom" in got["boom"].reason
        assert got["a"][0] == "a" and got["c"][0] == "c"
    finally:
        pool.shutdown()


def _until_in_flight(pool: ActorDispatcher, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.num_in_flight() < n:
        assert time.monotonic() < deadline, "work never went out"
        assert pool.results(timeout=0.05) == []  # dispatches to actors that came up


def test_actor_killed_mid_call_is_restarted_and_item_retried(ray_cluster):
    prepared = []

    def prepare(actor):
        prepared.append(actor)
        ray.get(actor.prepare.remote())

    pool = ActorDispatcher(_factory(delay=1.0, max_restarts=2), size=1, max_in_flight=2,
                     prepare=prepare, name="echo")
    try:
        pool.submit("x", _work)
        pool.submit("y", _work)
        _until_in_flight(pool, 2)  # work goes out once the new actor has answered
        time.sleep(0.3)
        ray.kill(pool.actors()[0], no_restart=False)
        got = dict(pool.drain())
        assert set(got) == {"x", "y"}
        assert all(not isinstance(v, PoolCallError) for v in got.values())
        assert pool.restarts_seen >= 1
        assert len(prepared) >= 2  # prepared at start, and again after the restart
    finally:
        pool.shutdown()


def test_actor_dead_for_good_is_replaced(ray_cluster):
    pool = ActorDispatcher(_factory(delay=1.0, max_restarts=0), size=2, max_in_flight=1,
                           name="echo")
    try:
        for i in range(4):
            pool.submit(i, _work)
        _until_in_flight(pool, 2)
        time.sleep(0.3)
        ray.kill(pool.actors()[0], no_restart=True)
        got = dict(pool.drain())
        assert sorted(got) == [0, 1, 2, 3]
        assert all(not isinstance(v, PoolCallError) for v in got.values())
        assert pool.replaced == 1 and pool.size == 2
    finally:
        pool.shutdown()


def test_needs_prepare_runs_prepare_then_retries(ray_cluster):
    calls = []

    def prepare(actor):
        calls.append(1)
        if len(calls) > 1:  # the first prepare "forgets" to prepare, as a restart would
            ray.get(actor.prepare.remote())

    pool = ActorDispatcher(_factory(), size=1, max_in_flight=1, prepare=prepare, name="echo")
    try:
        pool.submit("z", lambda actor, x: actor.work.remote(x, need_prepared=True))
        got = dict(pool.drain())
        assert got["z"][0] == "z"
        assert len(calls) == 2
    finally:
        pool.shutdown()


class SlowStart(Echo):
    """An echo actor whose constructor takes `start_s` (a vLLM engine loading, say)."""

    def __init__(self, start_s: float):
        time.sleep(start_s)
        super().__init__(0.0)


def test_a_slow_starting_actor_never_blocks_the_caller(ray_cluster):
    """Growing the pool with an actor that takes seconds to start: resize, submit and results
    return at once, the live actor keeps working meanwhile, and the new one joins once up."""
    slow = [False]

    def make():
        cls = ray.remote(SlowStart).options(num_cpus=0.1)
        return cls.remote(3.0 if slow[0] else 0.0)

    pool = ActorDispatcher(make, size=1, max_in_flight=1, name="echo")
    try:
        pool.submit(0, _work)
        assert [x for x, _ in pool.drain()] == [0]
        slow[0] = True
        t0 = time.monotonic()
        pool.resize(2)
        for i in range(1, 40):
            pool.submit(i, _work)
        got = pool.results(timeout=0.1)
        assert time.monotonic() - t0 < 2.0  # nothing waited for the slow actor
        assert got and len({pid for _, (_, pid) in got}) == 1  # the old actor kept working
        got += pool.drain()
        assert sorted(x for x, _ in got) == list(range(1, 40))
    finally:
        pool.shutdown()
