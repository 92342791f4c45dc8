"""A resizable pool of Ray actors with least-loaded dispatch and bounded in-flight work.

Shared by the generator and judge pools. The pool owns actor handles and the calls in flight on
them; it does not know what the actors do. Callers pass a typed call (a lambda on the handle,
`lambda actor, batch: actor.generate.remote(batch)`), never a method name.

Guarantees, relied on by the pipeline's "every prompt exactly once" accounting:
- every submitted item comes back from `results()` exactly once, as its result or as a
  `PoolCallError` naming the reason;
- an item whose actor died mid-call is dispatched again (to any live actor) up to
  `max_attempts` times; an actor that has died for good is replaced so the pool keeps its size;
- `resize(n)` grows at once and shrinks by draining: a removed actor takes no new work and is
  killed once its in-flight calls have returned;
- a new or restarted actor takes work only once it has answered `__ray_ready__`, checked
  without waiting, so a slow start (a vLLM engine loading, a node being added) never blocks
  the caller; one that does not come up within `_READY_TIMEOUT_S` is replaced;
- an actor that raises `NeedsPrepare` (e.g. a generator restarted by Ray with stale weights)
  gets `prepare(actor)` run again and the item re-dispatched, not counted as an attempt.

`ActorPool` is not thread-safe; `BatchedPool`, the base of the generator and judge pools, is
(see its docstring).

Not here: timeouts on hung calls, autoscaling decisions (a policy object outside decides and
calls `resize`), and anything about what the items are.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from sppo.records import Failed

__all__ = ["ActorPool", "BatchedPool", "PoolCallError", "NeedsPrepare"]

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 300.0  # how long a restarting actor may take to come back
_MAX_PREPARE_FAILURES = 5  # fresh actors dying in a row before the pool gives up
_LOCK_SLICE_S = 0.2  # longest a waiting BatchedPool call holds its lock at a time
_READY_POLL_S = 1.0  # results(None) re-checks starting actors at least this often


class NeedsPrepare(Exception):
    """Raised by an actor method to say: run the pool's `prepare` on me, then call me again."""


class PoolCallError(RuntimeError):
    """The result slot for an item that could not be processed; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Task:
    item: Any
    call: Callable[[Any, Any], "ray.ObjectRef"]
    attempts: int = 0


@dataclass
class _Slot:
    actor: Any
    id: int
    in_flight: dict = field(default_factory=dict)  # ObjectRef -> _Task
    draining: bool = False
    prepared: bool = False
    # Pending `__ray_ready__` call while the actor starts or restarts (None: it answered).
    # Work goes only to answered actors, so a slow start (a vLLM engine loading, a node still
    # being added) never blocks the caller; the pool checks without waiting.
    starting: Any = None
    starting_since: float = 0.0


class ActorPool:
    def __init__(
        self,
        make_actor: Callable[[], Any],
        size: int,
        max_in_flight: int,
        *,
        prepare: Optional[Callable[[Any], None]] = None,
        max_attempts: int = 3,
        name: str = "pool",
    ):
        if size < 0 or max_in_flight < 1 or max_attempts < 1:
            raise ValueError(f"{name}: need size >= 0, max_in_flight >= 1, max_attempts >= 1 "
                             f"(got {size}, {max_in_flight}, {max_attempts})")
        self._make_actor = make_actor
        self._max_in_flight = max_in_flight
        self._prepare = prepare
        self._max_attempts = max_attempts
        self.name = name
        self._ids = itertools.count()
        self._slots: list[_Slot] = []
        self._queue: deque[_Task] = deque()
        self._owner: dict[Any, _Slot] = {}  # ObjectRef -> slot running it
        self._ready: list[tuple[Any, Any]] = []  # results found outside results()
        self.restarts_seen = 0  # calls that failed because their actor died
        self.replaced = 0  # actors replaced after dying for good
        self._prepare_failures = 0
        self.resize(size)

    # ------------------------------------------------------------------ public API

    @property
    def size(self) -> int:
        """Live actors that take new work (draining ones excluded)."""
        return sum(not s.draining for s in self._slots)

    def actors(self) -> list:
        return [s.actor for s in self._slots if not s.draining]

    def submit(self, item: Any, call: Callable[[Any, Any], "ray.ObjectRef"]) -> None:
        """Queue `item`; it is dispatched as soon as an actor has a free slot. Never blocks."""
        self._queue.append(_Task(item, call))
        self._dispatch()

    def free_slots(self) -> int:
        """Free in-flight slots on live actors minus queued items (negative: backlog)."""
        free = sum(self._max_in_flight - len(s.in_flight) for s in self._slots if not s.draining)
        return free - len(self._queue)

    def num_pending(self) -> int:
        """Items submitted and not yet returned by `results()`."""
        return len(self._queue) + len(self._owner) + len(self._ready)

    def num_in_flight(self) -> int:
        return len(self._owner)

    def num_queued(self) -> int:
        return len(self._queue)

    def results(self, timeout: Optional[float] = None) -> list[tuple[Any, Any]]:
        """Completed `(item, result)` pairs; waits up to `timeout` (None: until one is done).

        Returns [] on timeout or when nothing is pending. A failed item's result is a
        `PoolCallError`.
        """
        out, self._ready = self._ready, []
        while not out:
            refs = list(self._owner)
            # With work queued, an actor coming up is worth waking for too.
            starting = [s.starting for s in self._slots if s.starting is not None
                        and not s.draining] if self._queue else []
            if not refs and not starting:
                break
            ready, _ = ray.wait(refs + starting, num_returns=1,
                                timeout=_READY_POLL_S if timeout is None and starting
                                else timeout)
            if ready and refs:
                for ref in ray.wait(refs, num_returns=len(refs), timeout=0)[0]:
                    self._collect(ref, out)
            self._reap()
            self._dispatch()
            if timeout is not None:
                break  # one wait per call when a timeout is given
        self._reap()
        self._dispatch()
        return out

    def drain(self) -> list[tuple[Any, Any]]:
        """Wait for every pending item; returns all their results."""
        out: list[tuple[Any, Any]] = []
        while self.num_pending():
            got = self.results()
            if not got and not self._owner and self._queue and self.size == 0:
                raise RuntimeError(f"{self.name}: {len(self._queue)} item(s) queued but the "
                                   f"pool has no live actor (size {self.size})")
            out.extend(got)
        return out

    def resize(self, n: int) -> None:
        """Grow to `n` actors now, or shrink by draining the least-busy ones."""
        if n < 0:
            raise ValueError(f"{self.name}: size must be >= 0 (got {n})")
        live = [s for s in self._slots if not s.draining]
        if n > len(live):
            # Un-drain first: cheaper than a new actor, and their work is still in flight.
            for s in self._slots:
                if s.draining and len(live) < n:
                    s.draining = False
                    live.append(s)
            while len(live) < n:
                slot = self._new_slot()
                self._slots.append(slot)
                live.append(slot)
        elif n < len(live):
            for s in sorted(live, key=lambda s: len(s.in_flight))[: len(live) - n]:
                s.draining = True
        self._reap()
        self._dispatch()

    def ready_actor(self) -> Optional[Any]:
        """The least-busy live actor that has been prepared and not seen dying, or None."""
        ready = [s for s in self._slots if not s.draining and s.prepared and s.starting is None]
        return min(ready, key=lambda s: (len(s.in_flight), s.id)).actor if ready else None

    def call_all(self, call: Callable[[Any], "ray.ObjectRef"]) -> list:
        """Run `call(actor)` on every live actor and return the results (blocking)."""
        return ray.get([call(s.actor) for s in self._slots if not s.draining])

    def shutdown(self) -> None:
        for s in self._slots:
            ray.kill(s.actor)
        self._slots.clear()
        self._owner.clear()

    # ------------------------------------------------------------------ internals

    def _new_slot(self) -> _Slot:
        actor = self._make_actor()
        return _Slot(actor, next(self._ids), starting=actor.__ray_ready__.remote(),
                     starting_since=time.monotonic())

    def _dispatch(self) -> None:
        while self._queue:
            free = [s for s in self._slots
                    if not s.draining and len(s.in_flight) < self._max_in_flight]
            free = [s for s in free if self._up(s)]
            if not free:
                return
            slot = min(free, key=lambda s: (len(s.in_flight), s.id))
            if not slot.prepared and not self._prepare_slot(slot):
                continue
            task = self._queue.popleft()
            task.attempts += 1
            ref = task.call(slot.actor, task.item)
            slot.in_flight[ref] = task
            self._owner[ref] = slot

    def _up(self, slot: _Slot) -> bool:
        """Whether the actor has answered since it (re)started; checks without waiting.
        Replaces an actor that is dead for good or has not come up in `_READY_TIMEOUT_S`."""
        if slot.starting is None:
            return True
        if not ray.wait([slot.starting], timeout=0)[0]:
            if time.monotonic() - slot.starting_since > _READY_TIMEOUT_S:
                self._prepare_failures += 1
                self._give_up_check(f"not up after {_READY_TIMEOUT_S:.0f}s")
                self._replace(slot, f"not up after {_READY_TIMEOUT_S:.0f}s")
            return False
        try:
            ray.get(slot.starting)
            slot.starting = None
            return True
        except ActorUnavailableError:  # restarting: "may be available later"; ask again
            slot.starting = slot.actor.__ray_ready__.remote()
        except RayActorError as exc:  # dead for good
            self._prepare_failures += 1
            self._give_up_check(str(exc))
            self._replace(slot, f"{exc.__class__.__name__} while starting")
        return False

    def _give_up_check(self, last: str) -> None:
        if self._prepare_failures > _MAX_PREPARE_FAILURES:
            raise RuntimeError(f"{self.name}: {self._prepare_failures} actors in a row died "
                               f"before taking work; last error: {last}")

    def _prepare_slot(self, slot: _Slot) -> bool:
        """Run `prepare` on a new or restarted actor; replace it if it is dead for good."""
        try:
            if self._prepare is not None:
                self._prepare(slot.actor)
            slot.prepared = True
            self._prepare_failures = 0
            return True
        except (RayActorError, GetTimeoutError) as exc:
            self._prepare_failures += 1
            self._give_up_check(str(exc))
            self._replace(slot, f"{exc.__class__.__name__} while preparing it")
            return False

    def _collect(self, ref, out: list) -> None:
        slot = self._owner.pop(ref)
        task = slot.in_flight.pop(ref)
        try:
            out.append((task.item, ray.get(ref)))
        except NeedsPrepare:
            slot.prepared = False
            task.attempts -= 1  # not the item's fault
            self._queue.appendleft(task)
        except RayActorError as exc:
            self.restarts_seen += 1
            # Restarted (re-ran __init__) or dead for good: no new work until it answers
            # again (or is replaced), then prepare it.
            slot.prepared = False
            if slot.starting is None:
                slot.starting = slot.actor.__ray_ready__.remote()
                slot.starting_since = time.monotonic()
            if task.attempts < self._max_attempts:
                log.warning("%s: actor died with an item in flight; retrying it (attempt %d/%d)",
                            self.name, task.attempts + 1, self._max_attempts)
                self._queue.appendleft(task)
            else:
                out.append((task.item, PoolCallError(
                    f"actor died {task.attempts} time(s) while processing this item: {exc}")))
        except Exception as exc:  # the actor method itself raised: not retried
            # Ray's RayTaskError prints the remote traceback; the reason is the cause itself.
            cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
            out.append((task.item, PoolCallError(f"{type(cause).__name__}: {cause}")))

    def _replace(self, slot: _Slot, why: str) -> None:
        """Retire a dead actor (its in-flight calls fail on their own and are retried) and
        start a fresh one in its place, unless it was being drained anyway."""
        log.warning("%s: replacing actor %d (%s)", self.name, slot.id, why)
        was_live = not slot.draining
        slot.draining = True
        if was_live:
            self.replaced += 1
            self._slots.append(self._new_slot())

    def _reap(self) -> None:
        for s in [s for s in self._slots if s.draining and not s.in_flight]:
            self._slots.remove(s)
            try:
                ray.kill(s.actor)
            except Exception:  # already gone
                pass



class BatchedPool:
    """Items in, one record per item out: an `ActorPool` fed in batches of
    `pool_cfg.batch_size`, where a batch the pool gave up on becomes one `Failed` record per
    item. The generator and judge pools are this with their own call and stage name; counts
    (`free_slots`, `num_pending`) are in items, not batches.

    Thread-safe, unlike `ActorPool`: the driver's loop feeds it while the control service
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
                 prepare: Optional[Callable[[Any], None]] = None, pool_cls: type = ActorPool):
        self._factory = factory
        self._batch_size = pool_cfg.batch_size
        self._pending = 0  # items submitted, records not yet returned
        self._lock = threading.RLock()
        self._holds = 0  # open hold_resizes() windows
        self._deferred: Optional[int] = None  # a resize asked for during a hold
        self._closed = False  # shut down: no more resizes (they would start actors)
        self._pool = pool_cls(factory, pool_cfg.replicas, pool_cfg.max_in_flight,
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
                self._pool.submit(items[i: i + self._batch_size], self._call)
            self._pending += len(items)

    def results(self, timeout: Optional[float] = None) -> list:
        """Records of finished batches (waits up to `timeout`; None: until one is done or
        nothing is pending)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _LOCK_SLICE_S if deadline is None else max(0.0, deadline - time.monotonic())
            with self._lock:
                running = self._pool.num_in_flight() > 0
                got = self._records(self._pool.results(min(left, _LOCK_SLICE_S)))
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
                if not got and self._pool.size == 0 and not self._pool.num_in_flight():
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
            return self._pool.free_slots() * self._batch_size

    def num_pending(self) -> int:
        """Items submitted whose records have not been returned yet."""
        return self._pending

    def num_in_flight(self) -> int:
        """Batches running on actors."""
        with self._lock:
            return self._pool.num_in_flight()

    def num_queued(self) -> int:
        """Batches waiting for a free actor slot."""
        with self._lock:
            return self._pool.num_queued()

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
            self._pool.resize(n)

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
                    self._pool.resize(n)

    @property
    def size(self) -> int:
        with self._lock:
            return self._pool.size

    def status(self) -> dict[str, int]:
        """Counts for the control service: live actors, the size asked for (differs from
        `size` while a resize is deferred), items pending, batches in flight, calls that
        failed because their actor died and actors replaced."""
        with self._lock:
            return {"size": self._pool.size,
                    "target": self._pool.size if self._deferred is None else self._deferred,
                    "pending": self._pending, "in_flight": self._pool.num_in_flight(),
                    "actor_deaths": self._pool.restarts_seen, "replaced": self._pool.replaced}

    def actors(self) -> list:
        with self._lock:
            return self._pool.actors()

    def ready_actor(self) -> Optional[Any]:
        """The least-busy live actor that has been prepared (holds the current state), or
        None; for calls outside the batch flow, such as chat."""
        with self._lock:
            return self._pool.ready_actor()

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            self._pool.shutdown()
        release = getattr(self._factory, "release", None)  # e.g. placement groups
        if release is not None:
            release()
