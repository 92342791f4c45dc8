"""The running job as the control service sees it: `JobControl` (cluster/service.py) over a
`SelfPlay`.

The service calls these methods from its worker threads while the driver's thread runs the
rounds. They only read the job's counters and files, or call the pools, which are thread-safe
(`actors.batched_pool.BatchedPool`); none of them waits on the round. In particular:
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
from typing import TYPE_CHECKING, Any, Optional

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

if TYPE_CHECKING:
    from sppo.selfplay import SelfPlay

__all__ = ["SelfPlayControl"]

log = logging.getLogger(__name__)

_POOLS = ("generator", "judge")


class SelfPlayControl:
    """`JobControl` for one `SelfPlay` job (see `cluster.service.JobControl` for the shapes).

    `chat_timeout_s`: how long a chat may wait for its generator (it queues behind the batch
    that generator is running); `status_timeout_s`: how long `status` waits for the trainer's
    stream to answer before reporting it as unknown."""

    def __init__(self, job: "SelfPlay", *, chat_timeout_s: float = 120.0,
                 status_timeout_s: float = 2.0):
        self.job = job
        self.chat_timeout_s = chat_timeout_s
        self.status_timeout_s = status_timeout_s

    # ------------------------------------------------------------------ reading

    def status(self) -> dict[str, Any]:
        job, cfg = self.job, self.job.cfg
        progress = job.pipeline.snapshot() if job.pipeline is not None else None
        return {
            "run": cfg.run.name,
            "round": job.current_round,
            "rounds": cfg.run.rounds,
            "completed_rounds": job.state["completed_rounds"],
            "stage": job.stage,
            "progress": progress,
            "throughput": {
                "prompts_per_s": progress["prompts_per_s"] if progress else 0.0,
                "tokens_per_s": progress["tokens_per_s"] if progress else 0.0,
                "trainer_tokens_per_s": self._last_report_value("trainer", "tokens_per_s"),
            },
            "trainer": self._trainer_status(),
            "pools": {name: self._pool_status(name) for name in _POOLS
                      if self._pool(name) is not None},
            "weight_version": self._weight_version(),
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
        folder = self.job.run_dir / "rounds"
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
        target = self._pool(pool)
        if target is None or self.job.stage == "finished":
            raise ValueError(f"the {pool} pool is not running (job stage: {self.job.stage})")
        c = getattr(self.job.cfg.pools, pool)
        if not c.min_replicas <= replicas <= c.max_replicas:
            raise ValueError(f"pools.{pool}: replicas {replicas} is outside "
                             f"[min_replicas, max_replicas] = [{c.min_replicas}, "
                             f"{c.max_replicas}]")
        log.info("control service: resizing the %s pool from %d to %d", pool, target.size,
                 replicas)
        target.resize(replicas)
        return self._pool_status(pool)

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float,
             n: int) -> list[dict]:
        job = self.job
        generators, tokenizer = self._pool("generator"), getattr(job, "tokenizer", None)
        if generators is None or tokenizer is None or job.stage == "finished":
            raise RuntimeError(f"no generator is running (job stage: {job.stage})")
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

    def _pool(self, name: str) -> Optional[Any]:
        return getattr(self.job, "generators" if name == "generator" else "judges", None)

    def _pool_status(self, name: str) -> dict[str, Any]:
        c = getattr(self.job.cfg.pools, name)
        return {**self._pool(name).status(), "min": c.min_replicas, "max": c.max_replicas,
                "autoscale": c.autoscale}

    def _weight_version(self) -> int:
        generators = self._pool("generator")
        return generators.version if generators is not None else \
            self.job.state["completed_rounds"]

    def _trainer_status(self) -> Optional[dict]:
        stream = getattr(self.job, "stream", None)
        if stream is None:
            return None
        try:
            return ray.get(stream.status.remote(), timeout=self.status_timeout_s)
        except (GetTimeoutError, RayActorError) as exc:
            return {"error": f"{type(exc).__name__}: the trainer stream did not answer"}

    def _last_report_value(self, section: str, key: str) -> Optional[float]:
        reports = self.job.reports
        value = reports[-1].get(section, {}).get(key) if reports else None
        return float(value) if isinstance(value, (int, float)) else None
