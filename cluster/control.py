"""The running job as the control service sees it: `JobControl` (cluster/service.py) over the
`JobView` a self-play loop publishes (`cluster.job_view`).

The service calls these methods from its worker threads while the driver's thread runs the
rounds. They read the latest view and the run directory's files, or call the pools, which are
thread-safe (`actors.pool.Pool`); none of them reads the loop's own state or waits on the
round. In particular:
- `scale` resizes a pool at once; while a weight sync is in progress the generator pool defers
  it to the end of the sync (`hold_resizes`), and the pool's status shows the `target` size;
- `chat` templates the conversation with the policy's tokenizer and sends it to one prepared
  generator (`ready_actor`), which answers with the weights it holds between batches of the
  round (a generator's calls run one at a time, so a chat waits for its current batch).

Not here: HTTP, authentication and validation of request bodies (`cluster.service`), starting
the server (`sppo.driver`).
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any, Callable, Optional

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.job_view import JobView
from sppo.config import Config

__all__ = ["SelfPlayControl"]

log = logging.getLogger(__name__)

_POOLS = ("generator", "judge")


class SelfPlayControl:
    """`JobControl` for one self-play job (see `cluster.service.JobControl` for the shapes):
    `view()` returns the job's latest `JobView` (`SelfPlay.view`), `cfg` is its config and
    `run_dir` its run directory.

    `chat_timeout_s`: how long a chat may wait for its generator (it queues behind the batch
    that generator is running); `status_timeout_s`: how long `status` waits for the trainer's
    stream to answer before reporting it as unknown."""

    def __init__(self, view: Callable[[], JobView], cfg: Config, run_dir: Path, *,
                 chat_timeout_s: float = 120.0, status_timeout_s: float = 2.0):
        self.view, self.cfg, self.run_dir = view, cfg, Path(run_dir)
        self.chat_timeout_s = chat_timeout_s
        self.status_timeout_s = status_timeout_s

    # ------------------------------------------------------------------ reading

    def status(self) -> dict[str, Any]:
        view, cfg = self.view(), self.cfg
        progress = view.progress
        return {
            "run": cfg.run.name,
            "round": view.round,
            "rounds": cfg.run.rounds,
            "completed_rounds": view.completed_rounds,
            "checkpointed_rounds": view.checkpointed_rounds,
            "stage": view.stage,
            "progress": progress,
            "throughput": {
                "prompts_per_s": progress["prompts_per_s"] if progress else 0.0,
                "tokens_per_s": progress["tokens_per_s"] if progress else 0.0,
                "trainer_tokens_per_s": _number((view.last_report or {}).get(
                    "trainer", {}).get("tokens_per_s")),
            },
            "trainer": self._trainer_status(view),
            "pools": {name: self._pool_status(view, name) for name in _POOLS
                      if _pool(view, name) is not None},
            "weight_version": view.generators.version if view.generators is not None
            else view.completed_rounds,
        }

    def metrics(self) -> dict[str, float]:
        status = self.status()
        progress = status["progress"] or {}
        out: dict[str, float] = {
            "round": -1 if status["round"] is None else status["round"],
            "rounds_completed_total": status["completed_rounds"],
            "weight_version": status["weight_version"],
            "round_prompts": progress.get("prompts", 0),
            "round_prompts_done": progress.get("prompts_done", 0),
            "round_prompts_failed": progress.get("failed", 0),
            "round_rows": progress.get("rows", 0),
            "prompts_per_s": status["throughput"]["prompts_per_s"],
            "tokens_per_s": status["throughput"]["tokens_per_s"],
        }
        if status["throughput"]["trainer_tokens_per_s"] is not None:
            out["trainer_tokens_per_s"] = status["throughput"]["trainer_tokens_per_s"]
        reports = self.rounds()
        if reports:
            last = reports[-1]
            win = last.get("win_rate_vs_round0")
            if win:
                out["win_rate_vs_round0"] = win["mean"]
            if last.get("mean_loss") is not None:
                out["mean_loss"] = last["mean_loss"]
            out["prompts_failed_total"] = sum(r["prompts"]["failed"] for r in reports)
            out["prompts_annotated_total"] = sum(r["prompts"]["annotated"] for r in reports)
        return out

    def rounds(self) -> list[dict]:
        """The round reports on disk (so a resumed run lists the rounds of earlier sessions
        too), in round order."""
        folder = self.run_dir / "rounds"
        reports = []
        for path in folder.glob("round-*.json") if folder.is_dir() else []:
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:  # being replaced right now: skip this once
                log.warning("could not read %s: %s", path, exc)
        return sorted(reports, key=lambda r: r["round"])

    # ------------------------------------------------------------------ acting

    def scale(self, pool: str, replicas: int) -> dict[str, Any]:
        if pool not in _POOLS:
            raise ValueError(f"unknown pool {pool!r}; pools: {list(_POOLS)}")
        view = self.view()
        target = _pool(view, pool)
        if target is None or view.stage == "finished":
            raise ValueError(f"the {pool} pool is not running (job stage: {view.stage})")
        c = getattr(self.cfg.pools, pool)
        if not c.min_replicas <= replicas <= c.max_replicas:
            raise ValueError(f"pools.{pool}: replicas {replicas} is outside "
                             f"[min_replicas, max_replicas] = [{c.min_replicas}, "
                             f"{c.max_replicas}]")
        log.info("control service: resizing the %s pool from %d to %d", pool, target.size,
                 replicas)
        target.resize(replicas)
        return self._pool_status(view, pool)

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float,
             n: int) -> list[dict]:
        view = self.view()
        generators, tokenizer = view.generators, view.tokenizer
        if generators is None or tokenizer is None or view.stage == "finished":
            raise RuntimeError(f"no generator is running (job stage: {view.stage})")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the policy's tokenizer has no chat template")
        try:  # rendered, then tokenized without special tokens: the template holds them
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # a template that rejects this conversation (e.g. roles)
            raise ValueError(f"the chat template cannot render these messages: {exc}") from None
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        actor = generators.ready_actor()
        if actor is None:
            raise RuntimeError("no generator holds the current weights yet (starting or "
                               "re-syncing); retry shortly")
        ref = actor.chat.remote(list(token_ids), max_tokens=max_tokens,
                                temperature=temperature, top_p=top_p, n=n,
                                seed=secrets.randbits(30))
        try:
            return ray.get(ref, timeout=self.chat_timeout_s)
        except GetTimeoutError:
            ray.cancel(ref)  # do not leave it queued ahead of the round's batches
            raise RuntimeError(f"the generator did not answer within {self.chat_timeout_s:.0f}"
                               " s (busy with the round's batches); retry later") from None
        except RayActorError as exc:
            raise RuntimeError(f"the generator could not answer: {exc}") from None
        except RayTaskError as exc:  # the method raised: report its own message, no traceback
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, ValueError):  # e.g. prompt + max_tokens over the context
                raise ValueError(str(cause)) from None
            if isinstance(cause, RuntimeError):  # WeightsUnavailable: mid-update
                raise RuntimeError(f"the generator could not answer: {cause}") from None
            raise

    # ------------------------------------------------------------------ helpers

    def _pool_status(self, view: JobView, name: str) -> dict[str, Any]:
        c = getattr(self.cfg.pools, name)
        return {**_pool(view, name).status(), "min": c.min_replicas, "max": c.max_replicas,
                "autoscale": c.autoscale}

    def _trainer_status(self, view: JobView) -> Optional[dict]:
        if view.stream is None:
            return None
        try:
            return ray.get(view.stream.status.remote(), timeout=self.status_timeout_s)
        except (GetTimeoutError, RayActorError) as exc:
            return {"error": f"{type(exc).__name__}: the trainer stream did not answer"}


def _pool(view: JobView, name: str) -> Optional[Any]:
    return view.generators if name == "generator" else view.judges


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) else None
