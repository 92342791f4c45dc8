"""Starting the actors of one pool: resources from its config, the nodes the caller names, and a
placement group per actor for tensor parallelism.

`ActorFactory(actor_cls, pool, args, label_selector=...)` is the zero-argument callable a pool
calls to start one actor (`actors.dispatch.ActorDispatcher`); `release()` removes the placement
groups it made (the pool calls it at shutdown). Used by the generator and the judge pools
(`actors.generator`, `actors.judge`); what differs between them is the actor class, its
arguments and the nodes it may use.

Not here: which nodes a role runs on (the cluster layer decides, `cluster.placement`, and passes
the decision in as `label_selector`), what the actors do, scaling decisions.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sppo.config import PoolConfig

__all__ = ["ActorFactory", "LabelSelector", "anywhere"]

# The Ray node labels an actor must run on ({"role": "generator"}), or None for anywhere; asked
# once per actor started, since nodes join and leave.
LabelSelector = Callable[[], Optional[dict[str, str]]]


def anywhere() -> None:
    """The `LabelSelector` of a cluster without role labels: any node."""
    return None


class ActorFactory:
    """`factory()` starts one `actor_cls(*args)` actor with `pool`'s resources on the nodes
    `label_selector()` names. Retries are the pool's job (it re-dispatches a dead actor's
    batch): `max_task_retries=0`. `max_concurrency` > 1 makes the actor threaded (vLLM:
    concurrent calls share the engine's batch). With `tensor_parallel` each actor gets its own
    placement group, one bundle per rank on one node (STRICT_PACK), the actor in the first."""

    def __init__(self, actor_cls: type, pool: PoolConfig, args: tuple, *,
                 label_selector: LabelSelector = anywhere, max_concurrency: int = 1,
                 tensor_parallel: bool = False):
        self._actor_cls, self._pool, self._args = actor_cls, pool, args
        self._label_selector = label_selector
        self._max_concurrency = max_concurrency
        self._tensor_parallel = tensor_parallel
        self._placement_groups: list = []

    def __call__(self) -> ActorHandle:
        p = self._pool
        options: dict[str, Any] = {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus,
                                   "max_restarts": p.max_restarts, "max_task_retries": 0}
        selector = self._label_selector()
        if self._max_concurrency > 1:
            options["max_concurrency"] = self._max_concurrency
        if self._tensor_parallel:
            # On GPUs vLLM starts one Ray worker per GPU bundle inside this group (the actor
            # captures its child tasks; read in vLLM 0.33's `RayExecutorV2`, not run on a GPU);
            # on CPU (vLLM's multiprocessing executor, run here) the bundles reserve each
            # rank's CPUs for the worker processes the actor starts. The group, not the actor,
            # carries the placement.
            # STRICT_PACK: every rank on one node (tensor parallelism over TCP between nodes
            # would be far slower; a group that fits no node waits, and `--plan` /
            # `cluster.placement.check_resources` refuse such a config up front).
            unit = {"GPU": 1.0} if p.num_gpus > 0 else {"CPU": p.num_cpus}
            bundles = [{**unit, "CPU": p.num_cpus}] + [unit] * (p.tensor_parallel_size - 1)
            pg = placement_group(bundles, strategy="STRICT_PACK", **(
                {"bundle_label_selector": [selector] * len(bundles)} if selector else {}))
            self._placement_groups.append(pg)
            options.update(num_cpus=0, num_gpus=0,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               placement_group=pg, placement_group_bundle_index=0,
                               placement_group_capture_child_tasks=True))
        elif selector is not None:
            options["label_selector"] = selector
        return ray.remote(self._actor_cls).options(**options).remote(*self._args)

    @property
    def placement_groups(self) -> list:
        """The placement groups made so far (one per tensor-parallel actor)."""
        return list(self._placement_groups)

    def release(self) -> None:
        for pg in self._placement_groups:
            remove_placement_group(pg)
        self._placement_groups.clear()
