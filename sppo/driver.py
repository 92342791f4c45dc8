"""Entry point: `python -m sppo.driver [--config FILE] [--resume RUN_DIR] [key=value ...]`.

Connects to the Ray cluster it was submitted to (`ray job submit` sets RAY_ADDRESS), or to
`run.ray_address`, or starts a local Ray when there is none; checks the config against the
cluster's resources and its GPUs' memory (`sppo.plan`) before any work; starts the control
service when `service.enabled` (`cluster.service`, answering for the job through
`sppo.control`); then runs the rounds (`sppo.selfplay.SelfPlay`).

`--plan` prints the memory plan per role instead, offline, against `--gpus` GPUs of
`--gpu-memory-gb` GiB (defaults: 8, and `run.gpu_memory_gb` or 80), and starts nothing.

With no arguments it runs the embedded demo, `configs/demo.yaml`. Exit codes: 0 done (or the
plan fits), 2 bad config, data or resources (nothing was started), 1 the run failed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from sppo.config import Config, ConfigError, apply_overrides, from_dict, load_config

if TYPE_CHECKING:
    from cluster.service import ControlServer

log = logging.getLogger("sppo.driver")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
PLAN_GPUS = 8
PLAN_GPU_MEMORY_GB = 80.0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sppo.driver", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML config (default: {DEMO_CONFIG.relative_to(REPO_ROOT)})")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR after its last completed round")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit")
    p.add_argument("--plan", action="store_true",
                   help="print the memory plan per role and exit (2 when a role does not fit); "
                        "reads the models' config.json only, starts nothing")
    p.add_argument("--gpus", type=int, default=PLAN_GPUS,
                   help=f"--plan: GPUs available (default {PLAN_GPUS})")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="--plan: GiB per GPU (default: run.gpu_memory_gb, else "
                        f"{PLAN_GPU_MEMORY_GB:g})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path]:
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError([("--resume", f"{str(saved)!r} not found: not a run directory")])
        import yaml

        cfg = from_dict(apply_overrides(yaml.safe_load(saved.read_text()), args.overrides))
        return cfg, run_dir
    path = args.config or (DEMO_CONFIG if DEMO_CONFIG.is_file() else None)
    cfg = load_config(path, args.overrides)
    return cfg, Path(cfg.run.output_dir) / cfg.run.name


def check_paths(cfg: Config) -> list[tuple[str, str]]:
    """Local paths in `cfg` that do not exist, as (field, message); checked before Ray starts.
    A hub id ("org/name") or a `builtin:` name is not a local path: it is resolved where it is
    loaded."""
    fields = [("model.path", cfg.model.path), ("data.path", cfg.data.path)]
    if cfg.judge.backend != "python":
        fields += [("judge.model_path", cfg.judge.model_path),
                   ("judge.backbone", cfg.judge.backbone)]
    out = []
    for name, value in fields:
        if not value or value.startswith("builtin:") or not _looks_local(value):
            continue
        path = Path(value).expanduser()
        if not path.exists():
            out.append((name, f"{value!r} does not exist (looked for {str(path.absolute())!r})"))
    return out


def _looks_local(value: str) -> bool:
    # What a hub id cannot be: it is "name" or "org/name", never "/..", "./..", "~/..", or
    # deeper than one slash; a data file name ends in its format's suffix.
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or \
        Path(value).suffix in (".jsonl", ".json", ".parquet")


def required_cpus(cfg: Config) -> float:
    p = cfg.pools
    trainer = 0 if cfg.trainer.use_gpu else cfg.trainer.num_workers
    return (p.generator.replicas * p.generator.num_cpus + p.judge.replicas * p.judge.num_cpus
            + trainer + 1)


def connect_ray(cfg: Config) -> None:
    """Join the cluster this job runs on, or start a local one sized for the config."""
    import ray

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
        num_cpus = max(os.cpu_count() or 1, int(required_cpus(cfg) + 0.999))
        log.info("no Ray cluster found: starting a local one with %d logical CPUs", num_cpus)
        # With the dashboard: it serves Ray's state API, which Ray Train 2.60's
        # PlacementGroupCleaner (always started, `_create_default_callbacks`) polls every
        # second; without it every poll logged "Failed to query Ray Train Controller actor
        # state. State API may be temporarily unavailable".
        ray.init(num_cpus=num_cpus, include_dashboard=True, runtime_env={"env_vars": env})


def print_plan(cfg: Config, gpus: int, gpu_memory_gb: Optional[float]) -> int:
    """`--plan`: print the memory plan against `gpus` GPUs of `gpu_memory_gb` GiB, offline.
    Returns 0 when every role fits, 2 (problems on stderr, each naming the fields to change)
    when one does not or the GPUs are too few."""
    from cluster.placement import check_resources
    from sppo.model_facts import ModelConfigError
    from sppo.plan import build_plan

    memory = gpu_memory_gb or cfg.run.gpu_memory_gb or PLAN_GPU_MEMORY_GB
    try:
        plan = build_plan(cfg, memory)
    except ModelConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.format())
    # CPUs are not part of the plan: only the GPU count is checked.
    problems = plan.problems + check_resources(cfg, {"GPU": float(gpus), "CPU": math.inf})
    if problems:
        print(f"error: this config does not fit {gpus} GPUs of {memory:g} GiB:\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 2
    print("\nfits: " + (f"{gpus} GPUs of {memory:g} GiB" if _gpu_roles(cfg) else
                         "no role uses a GPU"))
    return 0


def _gpu_roles(cfg: Config) -> list[str]:
    p = cfg.pools
    return [role for role, on in (("trainer", cfg.trainer.use_gpu),
                                  ("generator", p.generator.num_gpus > 0),
                                  ("judge", p.judge.num_gpus > 0
                                   and cfg.judge.backend != "python")) if on]


def check_memory(cfg: Config, nodes: list[dict]) -> list[str]:
    """The memory plan against the cluster's GPUs (`nodes`: `ray.nodes()`): its problems, each
    naming a role and the fields to change; [] when every role fits.

    GPU memory per role: `run.gpu_memory_gb`, else the accelerator type of the nodes the role
    runs on (its `role`-labelled nodes on a labelled cluster, else every GPU node). A role whose
    memory is unknown, or a model whose config.json cannot be read here, is not checked: the
    driver says so in a warning and goes on."""
    from cluster.placement import ROLE_LABEL, is_role_labelled, live_nodes
    from sppo.model_facts import ModelConfigError
    from sppo.plan import build_plan, gpu_memory_gib

    roles = _gpu_roles(cfg)
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


def start_service(cfg: Config, run_dir: Path, job) -> "ControlServer":
    """Start the control service for `job` and write `<run_dir>/service.json` (its URL and
    where the token is; never the token itself)."""
    import json

    from cluster.service import TOKEN_FILE, ControlServer, create_app, resolve_token
    from sppo.control import SelfPlayControl

    s = cfg.service
    from_env = bool(os.environ.get(s.token_env, "").strip())
    token = resolve_token(s.token_env, run_dir)
    server = ControlServer(create_app(SelfPlayControl(job), token), s.host, s.port).start()
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


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg, run_dir = resolve_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from sppo.config import dump_yaml

        print(dump_yaml(cfg), end="")
        return 0
    if args.plan:
        return print_plan(cfg, args.gpus, args.gpu_memory_gb)
    missing = check_paths(cfg)
    if missing:
        print(f"error: {ConfigError(missing)}", file=sys.stderr)
        return 2
    if not args.resume and (run_dir / "state.json").is_file():
        print(f"error: {run_dir} already holds a run; use --resume {run_dir} to continue it or "
              f"set run.name=... for a new one", file=sys.stderr)
        return 2

    import ray

    from cluster.placement import check_resources
    from sppo.data import DataError
    from sppo.selfplay import SelfPlay

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
    job = SelfPlay(cfg, run_dir, resume=bool(args.resume))
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
        if job.stage == "starting":
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


if __name__ == "__main__":
    sys.exit(main())
