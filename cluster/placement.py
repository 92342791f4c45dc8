"""Placement: which Ray nodes the generators, judges and trainer workers run on.

Nodes carry a Ray node label `role` with the value `generator`, `judge` or `trainer` (KubeRay
worker-group `labels`, `labels:` of a `ray up` node type, or `ray start --labels role=...`), and
each actor kind asks for its role with Ray's `label_selector` option (a hard constraint; the
autoscaler adds a node of the matching group when none has room). The head node is labelled
`role: head`, so a cluster is recognisably role-labelled from its first second, before any
worker has joined.

The rule: a cluster where no live node carries a `role` label (a laptop, CI, a plain
`ray start --head`) gets no selectors and everything may run anywhere. As soon as one node
carries the label, every role is placed strictly on its own nodes: falling back to "anywhere"
because the matching nodes have not registered yet (pods still starting, a group scaled to zero)
would put a GPU generator on a trainer node for the rest of the job. `check_resources` with the
node list reports a role that no node serves.

How a role's selector reaches its actors: the self-play loop (`cluster.selfplay`) passes
`role_selector` to the generator and judge factories (`actors.factory.ActorFactory` asks it per
actor; with tensor parallelism every bundle of the actor's placement group gets it) and the
trainer's selector to `actors.trainer.TrainerRun` (Ray Train V2 applies it to every worker's
bundle).

Deliberately not here: creating actors or placement groups (the pools and the trainer do that)
and autoscaling policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sppo.config import Config, PoolConfig

__all__ = [
    "ROLE_LABEL",
    "ROLES",
    "HEAD_ROLE",
    "live_nodes",
    "is_role_labelled",
    "role_selector",
    "check_resources",
    "actor_resources",
]

ROLE_LABEL = "role"
ROLES = ("generator", "judge", "trainer")
HEAD_ROLE = "head"  # marks a role-labelled cluster; no work is placed on it by role


def live_nodes(nodes: list[dict] | None = None) -> list[dict]:
    """The alive entries of `nodes`, or of `ray.nodes()` when None. Each entry is a dict with
    "Alive", "Labels" (dict of str) and "Resources" (dict of float), as `ray.nodes()` returns."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    return [n for n in nodes if n.get("Alive", True)]


def is_role_labelled(nodes: list[dict] | None = None) -> bool:
    """True when some live node carries the `role` label (whatever its value)."""
    return any(ROLE_LABEL in (n.get("Labels") or {}) for n in live_nodes(nodes))


def role_selector(role: str, nodes: list[dict] | None = None) -> dict[str, str] | None:
    """`{"role": role}` on a role-labelled cluster, None (run anywhere) otherwise.

    `nodes` defaults to `ray.nodes()` (needs a connected Ray); tests pass plain dicts."""
    _check_role(role)
    return {ROLE_LABEL: role} if is_role_labelled(nodes) else None


# --------------------------------------------------------------------------- resource check


@dataclass(frozen=True)
class _Demand:
    """What one role asks for: `count` units of `cpus`/`gpus` each, from config `field`."""

    role: str
    field: str
    count: int
    cpus: float
    gpus: float
    gpu_note: str = ""  # how the per-unit counts were derived, when not obvious
    cpu_note: str = ""


def _demands(cfg: Config) -> list[_Demand]:
    t = cfg.trainer
    # Ray Train's default per-worker resources: {"GPU": 1} with use_gpu, else {"CPU": 1}.
    return [
        _pool_demand("generator", cfg.pools.generator),
        _pool_demand("judge", cfg.pools.judge),
        _Demand("trainer", "trainer.num_workers", t.num_workers,
                0.0 if t.use_gpu else 1.0, 1.0 if t.use_gpu else 0.0,
                " (trainer.use_gpu is true)" if t.use_gpu else ""),
    ]


def _pool_demand(role: str, pool: PoolConfig) -> _Demand:
    """One pool's actors. With tensor parallelism (vLLM generators, LLM judges) each actor gets
    a placement group with one bundle per rank (the actor itself holds none; see
    `actors.factory.ActorFactory`): 1 GPU per rank on GPUs (num_gpus > 0), plus num_cpus in
    the first bundle; num_cpus per rank on CPU."""
    tp, field = pool.tensor_parallel_size, f"pools.{role}"
    if tp > 1 and pool.num_gpus > 0:
        return _Demand(role, field, pool.replicas, pool.num_cpus, float(tp),
                       gpu_note=f" (tensor_parallel_size {tp})")
    if tp > 1:
        return _Demand(role, field, pool.replicas, pool.num_cpus * tp, 0.0,
                       cpu_note=f" (num_cpus {_num(pool.num_cpus)} x tensor_parallel_size {tp})")
    return _Demand(role, field, pool.replicas, pool.num_cpus, pool.num_gpus)


def actor_resources(role: str, pool: PoolConfig) -> tuple[float, float]:
    """(CPUs, GPUs) one more actor of `pool` takes, its tensor-parallel ranks included (what
    an autoscaler must find room for)."""
    d = _pool_demand(role, pool)
    return d.cpus, d.gpus


def check_resources(cfg: Config, cluster_resources: dict[str, float],
                    nodes: list[dict] | None = None) -> list[str]:
    """Problems that keep the configured pools and trainer from starting; [] when they fit.

    `cluster_resources` is `ray.cluster_resources()`: the live nodes only, so on a cluster that
    autoscales up from fewer nodes a problem may be temporary; the caller decides. With `nodes`
    (`ray.nodes()`) on a role-labelled cluster each role is checked against its own nodes, which
    also reports a role that no node serves. Each message names the config field."""
    demands = _demands(cfg)
    problems: list[str] = []
    if nodes is not None:
        problems += _check_tensor_parallel(cfg, nodes)
    if nodes is not None and is_role_labelled(nodes):
        alive = live_nodes(nodes)
        for d in demands:
            mine = [n for n in alive if (n.get("Labels") or {}).get(ROLE_LABEL) == d.role]
            where = f"the nodes labelled {ROLE_LABEL}={d.role}"
            suffix = "" if mine else " (no such node)"
            for key in ("GPU", "CPU"):
                have = sum(float((n.get("Resources") or {}).get(key, 0.0)) for n in mine)
                problems += _check_one(d, key, have, where, suffix)
        return problems

    for key in ("GPU", "CPU"):
        have = float(cluster_resources.get(key, 0.0))
        for d in demands:
            problems += _check_one(d, key, have, "the cluster", "")
        parts = [(d, d.count * _each(d, key)) for d in demands]
        asked = [(d, need) for d, need in parts if need > 0]
        total = sum(need for _, need in asked)
        if len(asked) > 1 and _short(total, have) and all(
                not _short(need, have) for _, need in asked):
            fields = " + ".join(d.field for d, _ in asked)
            amounts = " + ".join(_num(need) for _, need in asked)
            problems.append(f"{fields} ask for {_amount(total, key)} together ({amounts}) "
                            f"but the cluster has {_num(have)}")
    return problems


def _check_tensor_parallel(cfg: Config, nodes: list[dict]) -> list[str]:
    """A tensor-parallel actor's ranks all go on one node (`actors.factory`: STRICT_PACK), so
    some node that may host the role must have `tensor_parallel_size` GPUs (CPUs on CPU)."""
    alive = live_nodes(nodes)
    labelled = is_role_labelled(alive)
    problems = []
    for role in ("generator", "judge"):
        pool = getattr(cfg.pools, role)
        tp = pool.tensor_parallel_size
        if tp <= 1:
            continue
        key, each = ("GPU", 1.0) if pool.num_gpus > 0 else ("CPU", pool.num_cpus)
        mine = [n for n in alive if (n.get("Labels") or {}).get(ROLE_LABEL) == role] \
            if labelled else alive
        if not mine:
            continue  # reported by the role-by-role check
        most = max(float((n.get("Resources") or {}).get(key, 0.0)) for n in mine)
        if _short(tp * each, most):
            where = f"nodes labelled {ROLE_LABEL}={role}" if labelled else "nodes"
            problems.append(
                f"pools.{role}.tensor_parallel_size {tp} needs {_amount(tp * each, key)} on "
                f"one node (its ranks are placed together) but the largest of the {where} "
                f"has {_num(most)}: lower pools.{role}.tensor_parallel_size to <= "
                f"{int(most // each) if each else 0}, or add nodes with more {key}s")
    return problems


def _check_one(d: _Demand, key: str, have: float, where: str, suffix: str) -> list[str]:
    each = _each(d, key)
    need = d.count * each
    if not _short(need, have):
        return []
    note = d.gpu_note if key == "GPU" else d.cpu_note
    return [f"{d.field} asks for {d.count} x {_amount(each, key)}{note} = {_amount(need, key)} "
            f"but {where} {'has' if where == 'the cluster' else 'have'} {_num(have)}{suffix}"]


def _each(d: _Demand, key: str) -> float:
    return d.gpus if key == "GPU" else d.cpus


def _short(need: float, have: float) -> bool:
    return need > have and not math.isclose(need, have, rel_tol=1e-9, abs_tol=1e-9)


def _num(x: float) -> str:
    return f"{x:g}"


def _amount(x: float, key: str) -> str:
    return f"{_num(x)} {key}" + ("" if x == 1 or 0 < x < 1 else "s")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
