"""Metrics to the tools users already read: TensorBoard, Weights & Biases, MLflow.

`Trackers(names, run_dir, ...)` opens the sinks `run.loggers` names; `metrics.jsonl` stays the
record of truth (written by `cluster.selfplay` whatever is configured). Per trainer step: the
step's scalars under `train/`, at a global step counted across rounds; per round: the round's
scalars under `round/` (win rate, mean loss, counts, stage times) at step = round, and a small
samples table (prompt, best and worst response with their win rates).

- `tensorboard`: event files in `<run_dir>/tensorboard`, written with tensorboardX (installed
  with Ray Train); the table is a Markdown text summary.
- `wandb`: `wandb.init(project=..., dir=run_dir, name=run name)`, the table a `wandb.Table`.
  Offline unless the user configured W&B (`WANDB_MODE`, `wandb login`): nothing here sets it.
- `mlflow`: a run in `tracking_uri` (default: a file store in `<run_dir>/mlruns`), the table
  through `mlflow.log_table`.

A named sink whose package is missing is an error at start (`TrackerError`, naming the extra to
install), never a silent no-op. What was run: TensorBoard's event files are read back in
tests/sppo/test_journal.py; W&B and MLflow run there when installed (they are optional
extras, not installed by the CI set-up), else those tests skip saying so.

Not here: what a round's metrics are (`cluster.selfplay`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

__all__ = ["Trackers", "TrackerError", "Sample", "samples_of"]

log = logging.getLogger(__name__)


class TrackerError(ValueError):
    """A configured metrics sink that cannot start."""


def _scalars(d: dict, prefix: str = "") -> dict[str, float]:
    """Flatten nested numbers: {"a": {"b": 1}} -> {"a/b": 1.0}; non-numbers are left out."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}".replace("+", "_")  # TensorBoard's tag characters
        if isinstance(v, dict):
            out.update(_scalars(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


Sample = dict  # {"prompt", "best", "best_win_rate", "worst", "worst_win_rate"}


def samples_of(prompt: str, texts: list[str], win_rates: list[float]) -> Sample:
    best = max(range(len(texts)), key=lambda i: win_rates[i])
    worst = min(range(len(texts)), key=lambda i: win_rates[i])
    return {"prompt": prompt, "best": texts[best], "best_win_rate": round(win_rates[best], 4),
            "worst": texts[worst], "worst_win_rate": round(win_rates[worst], 4)}


def _markdown(rows: list[Sample]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")[:300]

    cols = ["prompt", "best", "best_win_rate", "worst", "worst_win_rate"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class Trackers:
    def __init__(self, names: list[str], run_dir: Path, *, run_name: str, config: dict,
                 wandb_project: str = "sppo", mlflow_tracking_uri: Optional[str] = None):
        self.names = list(names)
        self._tb = self._wandb = self._mlflow = None
        self._step = 0
        if "tensorboard" in names:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as exc:
                raise TrackerError("run.loggers names tensorboard but tensorboardX is not "
                                   "installed: pip install tensorboardX") from exc
            self._tb = SummaryWriter(logdir=str(Path(run_dir) / "tensorboard"))
        if "wandb" in names:
            try:
                import wandb
            except ImportError as exc:
                raise TrackerError("run.loggers names wandb but it is not installed: "
                                   "pip install 'sppo-ray[wandb]'") from exc
            self._wandb = wandb.init(project=wandb_project, name=run_name, dir=str(run_dir),
                                     config=config, resume="allow")
        if "mlflow" in names:
            try:
                import mlflow
            except ImportError as exc:
                raise TrackerError("run.loggers names mlflow but it is not installed: "
                                   "pip install 'sppo-ray[mlflow]'") from exc
            if mlflow_tracking_uri is None:
                # A file store in the run directory: needs no server and no database driver
                # (mlflow-skinny has none). MLflow 3 keeps it but asks for this opt-in.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow_tracking_uri = (Path(run_dir) / "mlruns").absolute().as_uri()
            mlflow.set_tracking_uri(mlflow_tracking_uri)
            mlflow.set_experiment(run_name)
            self._mlflow = mlflow
            mlflow.start_run(run_name=run_name)
            mlflow.log_params(_flat(config))

    def log_steps(self, t: int, steps: list[dict]) -> None:
        for s in steps:
            self._step += 1
            values = _scalars({k: v for k, v in s.items() if k not in ("step", "round")},
                              "train/")
            self._write(values, self._step)

    def log_round(self, t: int, metrics: dict, samples: list[Sample]) -> None:
        self._write(_scalars(metrics, "round/"), t)
        if not samples:
            return
        if self._tb is not None:
            self._tb.add_text("samples", _markdown(samples), t)
        if self._wandb is not None:
            import wandb

            cols = list(samples[0])
            self._wandb.log({"samples": wandb.Table(columns=cols, data=[
                [r[c] for c in cols] for r in samples])}, commit=False)
        if self._mlflow is not None:
            self._mlflow.log_table({c: [r[c] for r in samples] for c in samples[0]},
                                   artifact_file=f"samples/round-{t}.json")

    def _write(self, values: dict[str, float], step: int) -> None:
        if not values:
            return
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()},
                                     step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
