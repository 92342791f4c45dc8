"""`ActorDispatcher`: a resizable set of Ray actors with least-loaded dispatch and bounded
in-flight work (not Ray's `ray.util.ActorPool`, which neither resizes nor replaces actors).

Under the generator and judge pools (`actors.pool.Pool`). The dispatcher owns actor handles and
the calls in flight on them; it does not know what the actors do. Callers pass a typed call (a
lambda on the handle, `lambda actor, batch: actor.generate.remote(batch)`), never a method
name.

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

`ActorDispatcher` is not thread-safe; `actors.pool.Pool`, the base of the generator and judge
pools, wraps it thread-safely.

Not here: timeouts on hung calls, autoscaling decisions (a policy object outside decides and
calls `resize`), and anything about what the items are.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError


__all__ = ["ActorDispatcher", "PoolCallError", "NeedsPrepare"]

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 300.0  # how long a restarting actor may take to come back
_MAX_PREPARE_FAILURES = 5  # fresh actors dying in a row before the pool gives up
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


class ActorDispatcher:
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
