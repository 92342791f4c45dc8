"""`Pool`: the generator and judge pools' shared base, an `ActorDispatcher` fed in batches and
made thread-safe for the control service. A "pool" in this project is always one of these two
(`pools.generator`, `pools.judge` in the config).

Not here: dispatch, retries and restarts (`actors.dispatch.ActorDispatcher`), what the actors
compute (`actors.generator`, `actors.judge`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator, Optional

import ray

from actors.dispatch import ActorDispatcher, PoolCallError
from sppo.records import Failed

__all__ = ["Pool"]

log = logging.getLogger(__name__)

_LOCK_SLICE_S = 0.2  # longest a waiting call holds the pool's lock at a time


class Pool:
    """Items in, one record per item out: an `ActorDispatcher` fed in batches of
    `pool_cfg.batch_size`, where a batch the pool gave up on becomes one `Failed` record per
    item. The generator and judge pools are this with their own call and stage name; counts
    (`free_slots`, `num_pending`) are in items, not batches.

    Thread-safe, unlike `ActorDispatcher`: the driver's loop feeds it while the control service
    resizes it and picks actors for chat from its own threads. Every method holds one lock,
    and a waiting `results`/`drain` holds it for at most `_LOCK_SLICE_S` at a time, so a
    resize usually waits a fraction of a second, never for a whole batch (the exceptions: a
    new actor's `prepare`, e.g. a generator joining after a sync reloads the latest
    checkpoint, and `GeneratorPool.broadcast_object_store` hold it while they run).
    `hold_resizes()` defers
    resizes over a window in which the set of actors must not change (a collective weight
    broadcast names its receivers in advance); the last one asked for is applied at its end."""

    stage = "pool"

    def __init__(self, factory: Callable[[], Any], pool_cfg, *,
                 prepare: Optional[Callable[[Any], None]] = None,
                 dispatcher_cls: type = ActorDispatcher):
        self._factory = factory
        self._batch_size = pool_cfg.batch_size
        self._pending = 0  # items submitted, records not yet returned
        self._lock = threading.RLock()
        self._holds = 0  # open hold_resizes() windows
        self._deferred: Optional[int] = None  # a resize asked for during a hold
        self._closed = False  # shut down: no more resizes (they would start actors)
        self._dispatcher = dispatcher_cls(factory, pool_cfg.replicas, pool_cfg.max_in_flight,
                              prepare=prepare, name=self.stage)

    def _call(self, actor: Any, batch: list) -> "ray.ObjectRef":
        raise NotImplementedError

    @staticmethod
    def _item_id(item: Any) -> str:
        raise NotImplementedError

    def submit(self, items) -> None:
        """Queue items in batches of `batch_size`; never blocks."""
        items = list(items)
        with self._lock:
            for i in range(0, len(items), self._batch_size):
                self._dispatcher.submit(items[i: i + self._batch_size], self._call)
            self._pending += len(items)

    def results(self, timeout: Optional[float] = None) -> list:
        """Records of finished batches (waits up to `timeout`; None: until one is done or
        nothing is pending)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _LOCK_SLICE_S if deadline is None else max(0.0, deadline - time.monotonic())
            with self._lock:
                running = self._dispatcher.num_in_flight() > 0
                got = self._records(self._dispatcher.results(min(left, _LOCK_SLICE_S)))
                if got or not self._pending:
                    return got
            if deadline is not None and time.monotonic() >= deadline:
                return got
            if not running:  # queued with no actor free (e.g. resizing): wait unlocked
                time.sleep(min(left, _LOCK_SLICE_S))

    def drain(self) -> list:
        """Wait for every pending item's record."""
        out: list = []
        while self.num_pending():
            got = self.results(timeout=_LOCK_SLICE_S)
            out.extend(got)
            with self._lock:
                if not got and self._dispatcher.size == 0 and not self._dispatcher.num_in_flight():
                    raise RuntimeError(f"{self.stage}: {self._pending} item(s) pending but "
                                       f"the pool has no live actor")
        return out

    def _records(self, done: list[tuple[list, Any]]) -> list:
        out: list = []
        for batch, res in done:
            if isinstance(res, PoolCallError):
                out.extend(Failed(self._item_id(x), self.stage, res.reason) for x in batch)
            else:
                out.extend(res)
        self._pending -= len(out)
        return out

    def free_slots(self) -> int:
        """Items that could start now without queueing (negative: a backlog)."""
        with self._lock:
            return self._dispatcher.free_slots() * self._batch_size

    def num_pending(self) -> int:
        """Items submitted whose records have not been returned yet."""
        return self._pending

    def num_in_flight(self) -> int:
        """Batches running on actors."""
        with self._lock:
            return self._dispatcher.num_in_flight()

    def num_queued(self) -> int:
        """Batches waiting for a free actor slot."""
        with self._lock:
            return self._dispatcher.num_queued()

    def resize(self, n: int) -> None:
        """Grow to `n` actors now or shrink by draining; deferred while resizes are held."""
        with self._lock:
            if self._closed:
                raise ValueError(f"the {self.stage} pool is shut down")
            if self._holds:
                self._deferred = n
                log.info("%s pool: resize to %d deferred until the weight sync is done",
                         self.stage, n)
                return
            self._dispatcher.resize(n)

    @contextlib.contextmanager
    def hold_resizes(self) -> Iterator[None]:
        """Keep the set of actors fixed inside the block; a resize asked for meanwhile is
        applied when the block ends."""
        with self._lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                if not self._holds and self._deferred is not None:
                    n, self._deferred = self._deferred, None
                    self._dispatcher.resize(n)

    @property
    def size(self) -> int:
        with self._lock:
            return self._dispatcher.size

    def status(self) -> dict[str, int]:
        """Counts for the control service: live actors, the size asked for (differs from
        `size` while a resize is deferred), items pending, batches in flight, calls that
        failed because their actor died and actors replaced."""
        with self._lock:
            return {"size": self._dispatcher.size,
                    "target": self._dispatcher.size if self._deferred is None else self._deferred,
                    "pending": self._pending, "in_flight": self._dispatcher.num_in_flight(),
                    "actor_deaths": self._dispatcher.restarts_seen,
                    "replaced": self._dispatcher.replaced}

    def actors(self) -> list:
        with self._lock:
            return self._dispatcher.actors()

    def ready_actor(self) -> Optional[Any]:
        """The least-busy live actor that has been prepared (holds the current state), or
        None; for calls outside the batch flow, such as chat."""
        with self._lock:
            return self._dispatcher.ready_actor()

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            self._dispatcher.shutdown()
        release = getattr(self._factory, "release", None)  # e.g. placement groups
        if release is not None:
            release()
