"""Entry point: `python -m sppo.driver [--config FILE] [--resume RUN_DIR] [key=value ...]`.

The command line: parses the arguments, builds and validates the config, checks what needs no
cluster (local paths, a run directory that already holds a run) and hands over to
`cluster.launch`, which connects to Ray, checks the cluster's resources and runs the rounds.
The one module of `sppo/` that imports upward (`cluster`).

`--plan` prints the memory plan per role instead, offline, against `--gpus` GPUs of
`--gpu-memory-gb` GiB on nodes of `--gpus-per-node` (defaults: 8, `run.gpu_memory_gb` or 80,
and one node of all of them), the trainer nodes' host RAM (checked against
`run.trainer_node_memory_gb` when set) and the run directory's disk, and starts nothing.

With no arguments it runs the embedded demo, `configs/demo.yaml`. Exit codes: 0 done (or the
plan fits), 2 bad config, data or resources (nothing was started), 1 the run failed.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Optional

import yaml

from cluster.placement import check_resources  # imports no Ray until called
from sppo.config import Config, ConfigError, apply_overrides, dump_yaml, from_dict, load_config
from sppo.model_facts import ModelConfigError
from sppo.plan import build_plan, gpu_roles

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
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="--plan: GPUs per node, for tensor-parallel groups, which stay on one "
                        "node (default: --gpus)")
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


def print_plan(cfg: Config, gpus: int, gpu_memory_gb: Optional[float],
               gpus_per_node: Optional[int] = None) -> int:
    """`--plan`: print the memory plan against `gpus` GPUs of `gpu_memory_gb` GiB on nodes of
    `gpus_per_node` GPUs (default: one node of all of them), offline.
    Returns 0 when every role fits, 2 (problems on stderr, each naming the fields to change)
    when one does not or the GPUs are too few."""
    memory = gpu_memory_gb or cfg.run.gpu_memory_gb or PLAN_GPU_MEMORY_GB
    per_node = gpus if gpus_per_node is None else gpus_per_node
    try:
        plan = build_plan(cfg, memory, ranks_per_node=per_node if cfg.trainer.use_gpu else None)
    except ModelConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.format())
    # CPUs are not part of the plan: only the GPU count is checked.
    problems = plan.problems + check_resources(
        cfg, {"GPU": float(gpus), "CPU": math.inf},
        [{"Alive": True, "Resources": {"GPU": float(per_node), "CPU": math.inf}}])
    if problems:
        print(f"error: this config does not fit {gpus} GPUs of {memory:g} GiB:\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 2
    print("\nfits: " + (f"{gpus} GPUs of {memory:g} GiB" if gpu_roles(cfg) else
                         "no role uses a GPU"))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg, run_dir = resolve_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    if args.plan:
        return print_plan(cfg, args.gpus, args.gpu_memory_gb, args.gpus_per_node)
    missing = check_paths(cfg)
    if missing:
        print(f"error: {ConfigError(missing)}", file=sys.stderr)
        return 2
    if not args.resume and (run_dir / "state.json").is_file():
        print(f"error: {run_dir} already holds a run; use --resume {run_dir} to continue it or "
              f"set run.name=... for a new one", file=sys.stderr)
        return 2
    # Deferred: imports Ray, the actors and transformers (seconds), which the checks above,
    # --plan and --print-config do not need.
    from cluster.launch import launch

    return launch(cfg, run_dir, resume=bool(args.resume))


if __name__ == "__main__":
    sys.exit(main())
