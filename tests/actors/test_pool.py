"""Tests of actors/pool.py on a real local Ray cluster with small echo actors."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from actors.pool import ActorPool, BatchedPool, PoolCallError
from sppo.config import PoolConfig
from ray_echo import Echo


def _factory(delay=0.05, max_restarts=0):
    return lambda: ray.remote(Echo).options(num_cpus=0.1, max_restarts=max_restarts).remote(delay)


def _work(actor, x):
    return actor.work.remote(x)


def test_every_item_once_with_bounded_in_flight(ray_cluster):
    pool = ActorPool(_factory(), size=3, max_in_flight=2, name="echo")
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
    pool = ActorPool(_factory(delay=0.02), size=2, max_in_flight=2, name="echo")
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
    pool = ActorPool(_factory(), size=1, max_in_flight=2, name="echo")
    try:
        for x in ["a", "boom", "c"]:
            pool.submit(x, _work)
        got = dict(pool.drain())
        assert isinstance(got["boom"], PoolCallError) and "bad item boom" in got["boom"].reason
        assert got["a"][0] == "a" and got["c"][0] == "c"
    finally:
        pool.shutdown()


def _until_in_flight(pool: ActorPool, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.num_in_flight() < n:
        assert time.monotonic() < deadline, "work never went out"
        assert pool.results(timeout=0.05) == []  # dispatches to actors that came up


def test_actor_killed_mid_call_is_restarted_and_item_retried(ray_cluster):
    prepared = []

    def prepare(actor):
        prepared.append(actor)
        ray.get(actor.prepare.remote())

    pool = ActorPool(_factory(delay=1.0, max_restarts=2), size=1, max_in_flight=2,
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
    pool = ActorPool(_factory(delay=1.0, max_restarts=0), size=2, max_in_flight=1, name="echo")
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

    pool = ActorPool(_factory(), size=1, max_in_flight=1, prepare=prepare, name="echo")
    try:
        pool.submit("z", lambda actor, x: actor.work.remote(x, need_prepared=True))
        got = dict(pool.drain())
        assert got["z"][0] == "z"
        assert len(calls) == 2
    finally:
        pool.shutdown()


# ---------------------------------------------------------------------------- BatchedPool


class EchoBatches(BatchedPool):
    """A BatchedPool of echo actors: one record (the item) per item."""

    stage = "echo"

    def _call(self, actor, batch):
        return actor.work.remote(batch)

    @staticmethod
    def _item_id(item):
        return str(item)

    def _records(self, done):
        return super()._records([(batch, res if isinstance(res, PoolCallError) else res[0])
                                 for batch, res in done])


def _batched(size: int, delay: float = 0.05) -> EchoBatches:
    return EchoBatches(_factory(delay=delay), PoolConfig(replicas=size, batch_size=2,
                                                         max_in_flight=2))


def test_batched_pool_is_fed_and_resized_from_two_threads_losing_nothing(ray_cluster):
    """The driver's loop feeds the pool while another thread (the control service) resizes it:
    every item comes back once, and the resizes take effect while items are in flight."""
    pool = _batched(1, delay=0.02)
    got: list = []
    sizes: list[int] = []
    try:
        def resizer():
            for n in (3, 1, 2):
                time.sleep(0.3)
                pool.resize(n)
                sizes.append((n, pool.status()["in_flight"] > 0))

        thread = threading.Thread(target=resizer)
        pool.submit(range(0, 10))
        while not got:  # the first actor is up and working before the resizes start
            got.extend(pool.results(timeout=0.05))
        thread.start()
        for i in range(10, 200, 10):
            pool.submit(range(i, i + 10))
            got.extend(pool.results(timeout=0.05))
        got.extend(pool.drain())
        thread.join()
        assert sorted(got) == list(range(200))  # none lost, none twice
        assert [n for n, _ in sizes] == [3, 1, 2] and pool.size == 2
        assert any(busy for _, busy in sizes)  # at least one resize landed mid-stream
        assert pool.status()["pending"] == 0
    finally:
        pool.shutdown()


def test_hold_resizes_defers_to_the_end_of_the_window(ray_cluster):
    pool = _batched(1)
    try:
        with pool.hold_resizes():
            actors = pool.actors()
            pool.resize(2)
            pool.resize(3)  # the last one asked for wins
            assert pool.size == 1 and pool.actors() == actors
            assert pool.status()["target"] == 3
        assert pool.size == 3 and pool.status()["target"] == 3
    finally:
        pool.shutdown()


def test_ready_actor_is_a_prepared_live_one(ray_cluster):
    pool = _batched(2)
    try:
        assert pool.ready_actor() is None  # nothing prepared before any work
        pool.submit([1, 2])
        assert sorted(pool.drain()) == [1, 2]
        assert pool.ready_actor() in pool.actors()
    finally:
        pool.shutdown()


def test_results_wait_and_drain_report_a_pool_without_actors(ray_cluster):
    pool = _batched(1)
    try:
        t0 = time.monotonic()
        assert pool.results(timeout=0.3) == [] and time.monotonic() - t0 < 2  # nothing pending
        pool.submit([1])
        assert pool.results() == [1]  # None: waits until one is done
        pool._pool.resize(0)  # no actor left at all (the public bounds keep >= 1)
        pool.submit([2])
        with pytest.raises(RuntimeError, match="no live actor"):
            pool.drain()
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

    pool = ActorPool(make, size=1, max_in_flight=1, name="echo")
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
