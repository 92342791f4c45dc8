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
import sys
from pathlib import Path
from typing import Optional

import ray

from cluster.control import SelfPlayControl
from cluster.placement import ROLE_LABEL, check_resources, is_role_labelled, live_nodes
from cluster.selfplay import SelfPlay
from cluster.server import TOKEN_FILE, ControlServer, resolve_token
from cluster.service import create_app
from sppo.config import Config
from sppo.data import DataError
from sppo.model_facts import ModelConfigError
from sppo.plan import build_plan, gpu_memory_gib, gpu_roles

__all__ = ["launch", "connect_ray", "check_memory", "start_service", "required_cpus"]

log = logging.getLogger("sppo.driver")


def launch(cfg: Config, run_dir: Path, *, resume: bool) -> int:
    """Run the job; see the module docstring. Errors that mean "nothing was started" are
    printed to stderr and return 2."""
    connect_ray(cfg)
    problems = check_resources(cfg, ray.cluster_resources(), ray.nodes())
    if problems:
        print("error: the cluster cannot run this config:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 2
    problems = check_memory(cfg, ray.nodes())
    if problems:
        print("error: this config does not fit the cluster's GPU memory (memory plan above; "
              "`python -m sppo.driver --plan` prints it offline):\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 2
    log.info("run directory: %s", run_dir)
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


def check_memory(cfg: Config, nodes: list[dict]) -> list[str]:
    """The memory plan against the cluster's GPUs (`nodes`: `ray.nodes()`): its problems, each
    naming a role and the fields to change; [] when every role fits.

    GPU memory per role: `run.gpu_memory_gb`, else the accelerator type of the nodes the role
    runs on (its `role`-labelled nodes on a labelled cluster, else every GPU node). A role whose
    memory is unknown, or a model whose config.json cannot be read here, is not checked: the
    driver says so in a warning and goes on."""
    roles = gpu_roles(cfg)
    if not roles:
        return []
    alive = live_nodes(nodes)
    labelled = is_role_labelled(alive)
    memory: dict[str, Optional[float]] = {}
    unknown = []
    for role in roles:
        if cfg.run.gpu_memory_gb:
            memory[role] = cfg.run.gpu_memory_gb
            continue
        mine = [n for n in alive if (n.get("Labels") or {}).get(ROLE_LABEL) == role] \
            if labelled else alive
        memory[role], how = gpu_memory_gib(mine)
        if memory[role] is None:
            unknown.append(f"{role} ({how})")
    try:
        plan = build_plan(cfg, memory)
    except ModelConfigError as exc:
        log.warning("memory plan skipped: %s", exc)
        return []
    except Exception as exc:  # an estimate must not stop a run it cannot size
        log.warning("memory plan skipped: %s: %s", type(exc).__name__, exc)
        return []
    log.info("memory plan:\n%s", plan.format())
    if unknown:
        log.warning("GPU memory unknown for %s: not checked; set run.gpu_memory_gb to check it",
                    ", ".join(unknown))
    return plan.problems


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
