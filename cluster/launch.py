"""Running a validated config on a Ray cluster: what `python -m sppo.driver` hands over to.

`launch(cfg, run_dir, resume)` connects to the Ray cluster the job was submitted to (`ray job
submit` sets RAY_ADDRESS), or to `run.ray_address`, or starts a local one when there is none;
checks the config against the cluster's resources (`cluster.placement.check_resources`) and
its GPUs' memory (`sppo.plan`) before any actor starts; starts the control service when
`service.enabled` (`cluster.service` on `cluster.server`, answering for the job through
`cluster.control`); then
runs the rounds (`cluster.selfplay.SelfPlay`). It returns the driver's exit code: 0 done, 2 bad
config, data or resources (nothing was started); a failed run raises.

Not here: parsing the command line and the checks that need no cluster (`sppo.driver`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import ray

from cluster.control import SelfPlayControl
from cluster.cuda_driver import check_gpu_nodes, driver_problem
from cluster.placement import ROLE_LABEL, check_resources, is_role_labelled, live_nodes
from cluster.selfplay import SelfPlay
from cluster.server import TOKEN_FILE, ControlServer, resolve_token
from cluster.service import create_app
from sppo.config import Config
from sppo.data import DataError
from sppo.model_facts import ModelConfigError
from sppo.plan import build_plan, gpu_memory_gib, gpu_roles

__all__ = ["launch", "connect_ray", "check_memory", "check_output_dir", "in_ray_job_working_dir",
           "start_service", "required_cpus"]

log = logging.getLogger("sppo.driver")


def launch(cfg: Config, run_dir: Path, *, resume: bool) -> int:
    """Run the job; see the module docstring. Errors that mean "nothing was started" are
    printed to stderr and return 2."""
    connect_ray(cfg)
    problems = check_resources(cfg, ray.cluster_resources(), ray.nodes())
    if gpu_roles(cfg):  # torch's CUDA against each GPU node's driver, before any actor
        local = driver_problem()
        problems += ([f"this node: {local}"] if local else []) + check_gpu_nodes(ray.nodes())
    if problems:
        print("error: the cluster cannot run this config:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 2
    problems = check_memory(cfg, ray.nodes(), run_dir) + check_output_dir(cfg, ray.nodes())
    if problems:
        print("error: this config does not fit the cluster (GPU memory, the trainer nodes' host "
              "RAM or the run directory; `python -m sppo.driver --plan` prints the plan "
              "offline):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    log.info("run directory: %s", Path(run_dir).absolute())
    job = SelfPlay(cfg, run_dir, resume=resume)
    server = None
    if cfg.service.enabled:
        try:
            server = start_service(cfg, run_dir, job)
        except (RuntimeError, ValueError, OSError) as exc:
            print(f"error: service: {exc}", file=sys.stderr)
            return 2
    try:
        reports = job.run()
    except (DataError, FileNotFoundError, OSError, ValueError) as exc:
        if job.view().stage == "starting":
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        if server is not None:
            server.stop()
    last = reports[-1] if reports else None
    if last and last.get("win_rate_vs_round0"):
        w = last["win_rate_vs_round0"]
        log.info("final win rate against round 0: %.1f%% [%.1f, %.1f] over %d prompts",
                 100 * w["mean"], 100 * w["ci_low"], 100 * w["ci_high"], w["n"])
    log.info("done: %s", run_dir)
    return 0


def required_cpus(cfg: Config) -> float:
    """Logical CPUs the config's pools and trainer ask for, plus one for the driver."""
    p = cfg.pools
    trainer = 0 if cfg.trainer.use_gpu else cfg.trainer.num_workers
    return (p.generator.replicas * p.generator.num_cpus + p.judge.replicas * p.judge.num_cpus
            + trainer + 1)


def connect_ray(cfg: Config) -> None:
    """Join the cluster this job runs on, or start a local one sized for the config."""
    if ray.is_initialized():
        return
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
        return
    try:
        ray.init(address="auto", runtime_env={"env_vars": env})
        log.info("connected to the running Ray cluster")
    except ConnectionError:
        # Logical CPUs: actors here mostly wait on each other, so more than the cores is fine.
        num_cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(cfg)))
        log.info("no Ray cluster found: starting a local one with %d logical CPUs", num_cpus)
        # With the dashboard: it serves Ray's state API, which Ray Train 2.60's
        # PlacementGroupCleaner (always started, `_create_default_callbacks`) polls every
        # second; without it every poll logged "Failed to query Ray Train Controller actor
        # state. State API may be temporarily unavailable".
        ray.init(num_cpus=num_cpus, include_dashboard=True, runtime_env={"env_vars": env})


def check_memory(cfg: Config, nodes: list[dict], run_dir: Optional[Path] = None) -> list[str]:
    """The memory plan against the cluster (`nodes`: `ray.nodes()`): its problems, each naming
    a role and the fields to change; [] when everything fits.

    GPU memory per role: `run.gpu_memory_gb`, else the accelerator type of the nodes the role
    runs on (its `role`-labelled nodes on a labelled cluster, else every GPU node). A role whose
    memory is unknown, or a model whose config.json cannot be read here, is not checked: the
    driver says so in a warning and goes on. The trainer nodes' host RAM: checked against
    `run.trainer_node_memory_gb` when set; else against Ray's memory of the trainer nodes, a
    warning only (Ray counts what was free when the node started). The disk: what is free
    under `run_dir` (when given) against one round's checkpoint."""
    roles = gpu_roles(cfg)
    if not roles and run_dir is None and cfg.run.trainer_node_memory_gb is None:
        return []
    alive = live_nodes(nodes)
    labelled = is_role_labelled(alive)

    def of_role(role: str) -> list[dict]:
        return [n for n in alive if (n.get("Labels") or {}).get(ROLE_LABEL) == role] \
            if labelled else alive

    memory: dict[str, Optional[float]] = {}
    unknown = []
    for role in roles:
        if cfg.run.gpu_memory_gb:
            memory[role] = cfg.run.gpu_memory_gb
            continue
        memory[role], how = gpu_memory_gib(of_role(role))
        if memory[role] is None:
            unknown.append(f"{role} ({how})")
    trainers = of_role("trainer")
    gpus = [int((n.get("Resources") or {}).get("GPU", 0)) for n in trainers]
    ranks_per_node = min([g for g in gpus if g > 0], default=None) if cfg.trainer.use_gpu \
        else None
    node_gb, from_ray = cfg.run.trainer_node_memory_gb, False
    ray_memory = [float((n.get("Resources") or {}).get("memory", 0)) for n in trainers]
    if node_gb is None and ray_memory and min(ray_memory) > 0:
        node_gb, from_ray = min(ray_memory) / 2**30, True
    try:
        plan = build_plan(cfg, memory or None, ranks_per_node=ranks_per_node,
                          node_memory_gb=node_gb, disk_free=_disk_free(run_dir))
    except ModelConfigError as exc:
        log.warning("memory plan skipped: %s", exc)
        return []
    except Exception as exc:  # an estimate must not stop a run it cannot size
        log.warning("memory plan skipped: %s: %s", type(exc).__name__, exc)
        return []
    if roles:
        log.info("memory plan:\n%s", plan.format())
    if unknown:
        log.warning("GPU memory unknown for %s: not checked; set run.gpu_memory_gb to check it",
                    ", ".join(unknown))
    problems = plan.problems
    if from_ray:
        for problem in [q for q in problems if q in plan.host.problems and "host RAM" in q]:
            log.warning("%s (Ray's memory of the trainer nodes; set run.trainer_node_memory_gb "
                        "to check it)", problem)
            problems = [q for q in problems if q != problem]
    return problems


def in_ray_job_working_dir(cwd: Optional[Path] = None) -> bool:
    """Whether this process runs in the copy of a job's working directory that Ray unpacked
    (`ray job submit --working-dir`: `<ray temp>/session_*/runtime_resources/working_dir_files/
    _ray_pkg_<hash>`, as seen on Ray 2.60 here)."""
    parts = (cwd or Path.cwd()).absolute().parts
    return "working_dir_files" in parts or any(x.startswith("_ray_pkg_") for x in parts)


def check_output_dir(cfg: Config, nodes: list[dict], cwd: Optional[Path] = None) -> list[str]:
    """A relative `run.output_dir` in a Ray job's unpacked working directory resolves inside
    it, on the head node only: refused on a cluster of several nodes (the trainer workers
    write their checkpoints there, and no other node sees it), a warning on one node."""
    out = Path(cfg.run.output_dir).expanduser()
    if out.is_absolute() or not in_ray_job_working_dir(cwd):
        return []
    where = (cwd or Path.cwd()).absolute() / out
    why = (f"run.output_dir {cfg.run.output_dir!r} is relative and this job runs in Ray's "
           f"unpacked copy of its working directory, so the run's files go to {where}, not to "
           "your checkout")
    if len(live_nodes(nodes)) > 1:
        return [f"{why}; on a cluster of several nodes the trainer workers and the generators "
                "on other nodes cannot reach it: set run.output_dir to an absolute path on "
                "storage every node mounts (e.g. run.output_dir=/mnt/shared/runs)"]
    log.warning("%s; set run.output_dir to an absolute path to keep them elsewhere", why)
    return []


def _disk_free(run_dir: Optional[Path]) -> Optional[float]:
    """Bytes free on the volume `run_dir` is (or will be) on; None without a run_dir."""
    if run_dir is None:
        return None
    path = Path(run_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return float(shutil.disk_usage(path).free)


def start_service(cfg: Config, run_dir: Path, job: SelfPlay) -> ControlServer:
    """Start the control service for `job` and write `<run_dir>/service.json` (its URL and
    where the token is; never the token itself)."""
    s = cfg.service
    from_env = bool(os.environ.get(s.token_env, "").strip())
    token = resolve_token(s.token_env, run_dir)
    control = SelfPlayControl(job.view, cfg, run_dir)
    server = ControlServer(create_app(control, token), s.host, s.port).start()
    where = f"${s.token_env}" if from_env else str(run_dir / TOKEN_FILE)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # not made yet when the token is from $ENV
        (run_dir / "service.json").write_text(
            json.dumps({"url": server.url, "token": where}) + "\n")
    except OSError:
        server.stop()
        raise
    log.info("control service on %s (bearer token in %s); API schema at %s/openapi.json",
             server.url, where, server.url)
    return server
