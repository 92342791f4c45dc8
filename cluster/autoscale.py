"""Autoscaling policy for one actor pool: grow when its queue backs up, shrink when idle.

The driver builds one policy per pool it wants autoscaled (STYLE 7: the decision-maker is passed
in) and, between batches, calls `scale_pool(pool, policy, room=..., queued=...)`, which reads the
pool's size and load, asks the policy and resizes. `QueueAutoscaler.decide` itself is plain
arithmetic on numbers and a clock passed in, so it is tested without Ray or sleeping.

Rules, one step at a time so a burst cannot overshoot:
- grow by one when more than `scale_up_backlog` items wait for a slot and the cluster has room
  for one more actor;
- shrink by one once the pool has had nothing queued or in flight for `scale_down_idle_s`;
- never outside [min_replicas, max_replicas] (an out-of-range size is corrected at once);
- after any change, including a manual resize through the control service (seen as a size the
  policy did not ask for), wait `cooldown_s` before the next one, so a new actor can start and
  take work before its effect is judged, and an operator's decision is not undone at once.

`PipelineAutoscaler` runs the policies from the streaming pipeline's `tick` (between pool
calls, on the driver's thread); the driver builds one for each pool whose config says
`autoscale: true`.

Not here: resizing itself (`actors.pool.Pool.resize` drains on shrink) and node-level autoscaling
(Ray's autoscaler or KubeRay adds nodes; `room` only says whether one more actor fits now).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import ray

log = logging.getLogger(__name__)

__all__ = ["QueueAutoscaler", "AutoscaleTarget", "PipelineAutoscaler", "cluster_has_room",
           "scale_pool"]

_EPS = 1e-9  # fractional resources: 0.1 * 10 must count as 1


class QueueAutoscaler:
    def __init__(self, min_replicas: int, max_replicas: int, scale_up_backlog: int,
                 scale_down_idle_s: float, cooldown_s: float):
        if not 0 <= min_replicas <= max_replicas:
            raise ValueError(f"QueueAutoscaler: need 0 <= min_replicas <= max_replicas "
                             f"(got {min_replicas}, {max_replicas})")
        if scale_up_backlog < 0 or scale_down_idle_s < 0 or cooldown_s < 0:
            raise ValueError(f"QueueAutoscaler: scale_up_backlog, scale_down_idle_s and "
                             f"cooldown_s must be >= 0 (got {scale_up_backlog}, "
                             f"{scale_down_idle_s}, {cooldown_s})")
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.scale_up_backlog = scale_up_backlog
        self.scale_down_idle_s = scale_down_idle_s
        self.cooldown_s = cooldown_s
        self._last_change: Optional[float] = None  # when the size last changed
        self._expected: Optional[int] = None  # the size we last returned
        self._idle_since: Optional[float] = None

    def decide(self, size: int, queued: int, in_flight: int, now: float, room: bool) -> int:
        """The size the pool should have. `queued`: items waiting for an actor slot;
        `in_flight`: items running on actors; `now`: a monotonic clock in seconds; `room`: one
        more actor fits in the cluster. Assumes the caller applies what it returns."""
        if self._expected is not None and size != self._expected:
            self._last_change = now  # resized by someone else: give their decision a cooldown
        if queued or in_flight:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now

        target = min(max(size, self.min_replicas), self.max_replicas)
        cooling = self._last_change is not None and now - self._last_change < self.cooldown_s
        if target == size and not cooling:
            if queued > self.scale_up_backlog and room and size < self.max_replicas:
                target = size + 1
            elif (self._idle_since is not None and now - self._idle_since >= self.scale_down_idle_s
                  and size > self.min_replicas):
                target = size - 1
                self._idle_since = now  # the next step down waits a full idle period again
        if target != size:
            self._last_change = now
        self._expected = target
        return target


def cluster_has_room(num_cpus: float, num_gpus: float) -> bool:
    """Whether the cluster has `num_cpus` and `num_gpus` free right now.

    Summed over nodes (`ray.available_resources()`), so on a multi-node cluster it can say yes
    while no single node fits; the new actor then waits for resources (or for the Ray
    autoscaler to add a node), which the pool tolerates."""
    free = ray.available_resources()
    return (free.get("CPU", 0.0) + _EPS >= num_cpus
            and free.get("GPU", 0.0) + _EPS >= num_gpus)


def scale_pool(pool, policy: QueueAutoscaler, *, room: bool, queued: Optional[int] = None,
               now: Optional[float] = None) -> int:
    """One autoscaling step for a pool (`actors.pool.Pool`): ask `policy`, resize if it says so.
    Returns the pool's size afterwards. Call it from the thread that owns the pool.

    `queued` defaults to the pool's own queue. A caller that submits only into free slots
    (as `cluster.pipeline` does) keeps the backlog itself, e.g. generations waiting for a judge,
    and must pass that count, or the pool never looks backed up."""
    now = time.monotonic() if now is None else now
    queued = pool.num_queued() if queued is None else queued
    target = policy.decide(pool.size, queued, pool.num_in_flight(), now, room)
    if target != pool.size:
        pool.resize(target)
    return pool.size


@dataclass
class AutoscaleTarget:
    """One pool under a policy: `backlog` names the `cluster.pipeline.Backlog` field that counts
    the items waiting for it ("generate" or "judge"); `num_cpus`/`num_gpus` are what one more
    actor needs."""

    pool: Any
    policy: QueueAutoscaler
    backlog: str
    num_cpus: float
    num_gpus: float


class PipelineAutoscaler:
    """The pipeline's `tick`: one autoscaling step per pool, at most every `every_s` seconds
    (the room check asks the cluster, which is not free at the pipeline's poll rate).
    `room` defaults to `cluster_has_room`; tests pass their own."""

    def __init__(self, pools: list[AutoscaleTarget], *, every_s: float = 1.0,
                 room: Optional[Callable[[float, float], bool]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.pools, self.every_s = pools, every_s
        self._room = room or cluster_has_room
        self._clock = clock
        self._last: Optional[float] = None

    def __call__(self, backlog: Any) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        for p in self.pools:
            before = p.pool.size
            after = scale_pool(p.pool, p.policy, room=self._room(p.num_cpus, p.num_gpus),
                               queued=getattr(backlog, p.backlog), now=now)
            if after != before:
                log.info("autoscale: %s pool %d -> %d actors (backlog %d)", p.backlog, before,
                         after, getattr(backlog, p.backlog))
