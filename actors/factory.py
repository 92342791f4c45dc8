"""Starting the actors of one pool: resources from its config, placement by role, and a
placement group per actor for tensor parallelism.

`ActorFactory(actor_cls, role, pool, args)` is the zero-argument callable a pool calls to start
one actor (`actors.pool.ActorPool`); `release()` removes the placement groups it made (the pool
calls it at shutdown). Used by the generator and the judge pools (`actors.generator`,
`actors.judge`); what differs between them is only the actor class, its arguments and the role.

Not here: what the actors do, or scaling decisions.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.actor import ActorHandle

from sppo.config import PoolConfig

__all__ = ["ActorFactory"]


class ActorFactory:
    """`factory()` starts one `actor_cls(*args)` actor with `pool`'s resources, on `role`
    nodes of a role-labelled cluster (looked up per actor: nodes join and leave), anywhere
    otherwise. Retries are the pool's job (it re-dispatches a dead actor's batch):
    `max_task_retries=0`. `max_concurrency` > 1 makes the actor threaded (vLLM: concurrent
    calls share the engine's batch). With `tensor_parallel` each actor gets its own placement
    group, one bundle per rank, the actor in the first."""

    def __init__(self, actor_cls: type, role: str, pool: PoolConfig, args: tuple, *,
                 max_concurrency: int = 1, tensor_parallel: bool = False):
        self._actor_cls, self._role, self._pool, self._args = actor_cls, role, pool, args
        self._max_concurrency = max_concurrency
        self._tensor_parallel = tensor_parallel
        self._placement_groups: list = []

    def __call__(self) -> ActorHandle:
        from cluster.placement import actor_options

        p = self._pool
        options: dict[str, Any] = actor_options(self._role, p.num_cpus, p.num_gpus)
        options.update(max_restarts=p.max_restarts, max_task_retries=0)
        if self._max_concurrency > 1:
            options["max_concurrency"] = self._max_concurrency
        if self._tensor_parallel:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            # On GPUs vLLM starts one Ray worker per GPU bundle inside this group (the actor
            # captures its child tasks); on CPU (vLLM's multiprocessing executor) the bundles
            # reserve each rank's CPUs for the worker processes the actor starts. The group,
            # not the actor, carries the placement.
            unit = {"GPU": 1.0} if p.num_gpus > 0 else {"CPU": p.num_cpus}
            bundles = [{**unit, "CPU": p.num_cpus}] + [unit] * (p.tensor_parallel_size - 1)
            selector = options.pop("label_selector", None)
            pg = placement_group(bundles, strategy="PACK", **(
                {"bundle_label_selector": [selector] * len(bundles)} if selector else {}))
            self._placement_groups.append(pg)
            options.update(num_cpus=0, num_gpus=0,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               placement_group=pg, placement_group_bundle_index=0,
                               placement_group_capture_child_tasks=True))
        return ray.remote(self._actor_cls).options(**options).remote(*self._args)

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self._placement_groups:
            remove_placement_group(pg)
        self._placement_groups.clear()
