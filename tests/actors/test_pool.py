"""Tests of actors/pool.py on a real local Ray cluster with small echo actors: batches,
thread safety (the control service resizes from its own threads), deferred resizes, chat picks.
"""

from __future__ import annotations

import threading
import time

import pytest
import ray

from actors.dispatch import PoolCallError
from actors.pool import Pool
from ray_echo import Echo
from sppo.config import PoolConfig


def _factory(delay=0.05):
    return lambda: ray.remote(Echo).options(num_cpus=0.1).remote(delay)


class EchoBatches(Pool):
    """A Pool of echo actors: one record (the item) per item."""

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
        pool.resize(0)  # no actor left at all (the control service keeps >= min_replicas)
        pool.submit([2])
        with pytest.raises(RuntimeError, match="no live actor"):
            pool.drain()
    finally:
        pool.shutdown()
