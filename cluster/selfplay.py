"""The self-play job: set up the pools and the trainer once, then run rounds.
Over 400 lines: the job's set-up, its round and each of the round's steps, read in order.

One round reads on one screen (`SelfPlay.round`): generate + judge + train (streamed together
by `cluster.pipeline`), finish training, sync weights, log the step metrics, evaluate; each a
named, timed step. Everything a round produces goes to the run directory:

    <run_dir>/config.yaml          resolved config
    <run_dir>/data_report.txt      bad prompt rows, each with index and reason
    <run_dir>/metrics.jsonl        one line per trainer step and per round
    <run_dir>/rounds/round-<t>.json  the round report (counts, failures, timings, win rate)
    <run_dir>/rounds/round-<t>/      the round journal: every prompt's record (`sppo.journal`)
    <run_dir>/tensorboard/           TensorBoard event files (`run.loggers`, `sppo.tracking`)
    <run_dir>/train/round-<t>/       the round's checkpoint: `hf/` loads with from_pretrained,
                                     `state/` the sharded training state, `round.json` last
    <run_dir>/eval_baseline.jsonl  pi_0's responses on the held-out prompts
    <run_dir>/progress.png         win rate against round 0 and loss per round
    <run_dir>/state.json           completed rounds and the latest checkpoint (for --resume)

A round ends generators first, disk after: once the trainer has handed the weights over the
driver syncs, evaluates and begins the next round while the trainer writes the checkpoint; the
round counts as completed (state.json) only once its checkpoint is complete, so a stop during
the write resumes from the round before, whose checkpoint is the resume point until then.

A round stopped midway (the driver died) resumes from its journal: its prompts' rows go to the
trainer first (which restarts the round from its start checkpoint), and only the prompts
missing from the journal are generated and judged. With `data.from_journal` the rounds' rows
come from existing journals and no generator or judge starts.

The actors are placed by role on a role-labelled cluster (`cluster.placement`): the decision is
made here and passed to the factories and the trainer as a label selector.

Not here: command-line parsing (`sppo.driver`), connecting to Ray (`cluster.launch`), the pools
and trainer (`actors/`), the maths (`sppo.preference`, `sppo.loss`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import ray
from transformers import AutoTokenizer

from actors.generator import GeneratorPool, make_generator_factory
from actors.judge import JudgePool, make_judge_factory
from actors.stream import RoundResult, create_stream
from actors.round_end import checkpoint_complete
from actors.trainer import TrainerRun
from actors.weights.object_store import ObjectStoreHandOff
from actors.weights.sender import CollectiveHandOff
from actors.weights.transport import resolve_backend
from cluster.autoscale import AutoscaleTarget, PipelineAutoscaler, QueueAutoscaler
from cluster.evaluation import Evaluation
from cluster.job_view import JobView
from cluster.pipeline import Backlog, RoundPipeline
from cluster.placement import actor_resources, role_selector
from sppo.config import Config, dump_yaml, logger_names, to_dict
from sppo.data import load_prompts, split_rounds
from sppo.evaluate import plot_progress
from sppo.journal import JournalWriter, RoundJournal, fingerprint, judge_identity, read_round, \
    round_dir
from sppo.records import Annotated, Prompt, RoundOutcome, TrainRow
from sppo.resume import feed_journal, journal_sources, set_aside_later_rounds, \
    stopped_round_journal
from sppo.rows import rows_from_annotated, rows_per_prompt
from sppo.tiny import resolve_model_path
from sppo.tracking import Trackers, samples_of

__all__ = ["SelfPlay"]

log = logging.getLogger("sppo.driver")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


class SelfPlay:
    """The job. `tick`, when given, runs once per poll of the streaming pipeline (between
    pool calls); by default it is the autoscaler of the pools whose config says
    `autoscale: true` (`cluster.autoscale.PipelineAutoscaler`), or nothing.

    The control service reads `view()` (a `JobView` the job publishes) from its own threads,
    never the job's attributes."""

    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool = False,
                 tick: Optional[Callable[[Backlog], None]] = None):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.state_path = self.run_dir / "state.json"
        self.state = json.loads(self.state_path.read_text()) if resume and \
            self.state_path.is_file() else {"completed_rounds": 0, "checkpoint": None}
        self.reports: list[dict] = []
        self.tick = tick
        self.generators: Optional[GeneratorPool] = None
        self.judges: Optional[JudgePool] = None
        self.evaluation: Optional[Evaluation] = None
        self.trackers: Optional[Trackers] = None
        self.resume_journal: Optional[RoundJournal] = None  # the stopped round's records
        self._view = JobView(completed_rounds=self.state["completed_rounds"],
                             checkpointed_rounds=self.state["completed_rounds"])
        self._unrecorded: dict[int, dict] = {}  # round -> report, checkpoint being written
        self.next_round = self.state["completed_rounds"]  # rounds may be done, not yet recorded
        self._checked_at = 0.0
        self._view_lock = threading.Lock()

    # ------------------------------------------------------------------ the view

    def view(self) -> JobView:
        """The job as the control service sees it (safe from any thread)."""
        with self._view_lock:
            return self._view

    def _publish(self, **changes) -> None:
        with self._view_lock:
            self._view = dataclasses.replace(self._view, **changes)

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.base_model = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        if cfg.data.from_journal:
            self.sources = journal_sources(cfg.data.from_journal, cfg.run.rounds)
        else:
            self._load_prompts()

        self._adopt_trained_rounds()
        start = self.next_round = self.state["completed_rounds"]
        gen_model = self.state["checkpoint"] if start else self.base_model
        if start < cfg.run.rounds and not cfg.data.from_journal and cfg.run.journal:
            self.resume_journal = stopped_round_journal(
                self.run_dir, start, fingerprint(cfg, [p.id for p in self.split.shards[start]]),
                resume=self.resume, on_corrupt=cfg.run.journal_on_corrupt)
        self.trackers = Trackers(logger_names(cfg.run.loggers), self.run_dir,
                                 run_name=cfg.run.name, config=to_dict(cfg),
                                 wandb_project=cfg.run.wandb_project,
                                 mlflow_tracking_uri=cfg.run.mlflow_tracking_uri)
        # Written once the checks passed: a run refused above leaves the directory as it was.
        (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        if self.resume:  # what later rounds sampled from weights that are trained again
            set_aside_later_rounds(self.run_dir, start)
        if not cfg.data.from_journal:
            self._start_pools(gen_model, start)
        t = cfg.trainer
        self.stream = create_stream(world_size=t.num_workers, global_batch_size=t.global_batch_size,
                                    buffer_rows=max(t.stream_buffer, t.global_batch_size),
                                    epochs=t.epochs, max_length=t.max_length,
                                    selection=t.selection, reference=t.reference,
                                    seed=cfg.run.seed)
        if start:  # the trainer must resume from this round's checkpoint, not an older one
            ray.get(self.stream.mark_done.remote(start - 1, str(Path(gen_model).parent)))
        self.sync_method = self._sync_method()
        hand_off = CollectiveHandOff(self.stream,
                                     backend=resolve_backend(cfg.weight_sync.backend, t.use_gpu),
                                     bucket_mb=cfg.weight_sync.bucket_mb,
                                     timeout_s=cfg.weight_sync.timeout_s,
                                     dtype=cfg.model.dtype) \
            if self.sync_method == "collective" else \
            ObjectStoreHandOff(bucket_mb=cfg.weight_sync.bucket_mb, dtype=cfg.model.dtype)
        self.trainer = TrainerRun(model_path=self.base_model, trainer=t, stream=self.stream,
                                  storage_path=str(self.run_dir), name="train",
                                  hand_off=hand_off,
                                  label_selector=role_selector("trainer")).start()
        self._publish(stage="ready", generators=self.generators, judges=self.judges,
                      stream=self.stream, tokenizer=self.tokenizer)

    def _start_pools(self, gen_model: str, start: int) -> None:
        cfg = self.cfg
        # Placed on their role's nodes of a role-labelled cluster, anywhere otherwise; asked
        # per actor, since nodes join and leave.
        self.generators = GeneratorPool(
            make_generator_factory(gen_model, cfg.sampling, cfg.generator, cfg.pools.generator,
                                   dtype=cfg.model.dtype,
                                   label_selector=functools.partial(role_selector,
                                                                    "generator")),
            cfg.pools.generator)
        if start:  # generators start from the checkpoint: its weights are version `start`
            self.generators.mark_synced(start, gen_model)
        self.judges = JudgePool(
            make_judge_factory(cfg.judge, cfg.pools.judge,
                               label_selector=functools.partial(role_selector, "judge")),
            cfg.pools.judge)
        self.evaluation = Evaluation(self.generators, self.judges,
                                     self.run_dir / "eval_baseline.jsonl")
        if self.tick is None:
            self.tick = self._autoscaler()

    def _sync_method(self) -> str:
        cfg = self.cfg
        if cfg.data.from_journal:  # no generators to send to: the weights stay in the checkpoint
            return "object_store"
        if cfg.weight_sync.method != "auto":
            return cfg.weight_sync.method
        # NCCL between GPUs, and always for vLLM (its weights live in its workers); HF
        # generators on CPU take the object store (shared memory on a node), which measured
        # faster there than gloo over loopback (bench/weights.py).
        return "collective" if cfg.trainer.use_gpu or cfg.generator.backend == "vllm" \
            else "object_store"

    def _load_prompts(self) -> None:
        cfg = self.cfg
        prompts = load_prompts(cfg.data, self.tokenizer)  # raises before any work in "error" mode
        (self.run_dir / "data_report.txt").write_text(prompts.summary(max_listed=1000) + "\n")
        log.info("prompts: %s", prompts.summary(max_listed=5))
        self.split = split_rounds(prompts.prompts, cfg.run.rounds, cfg.data.seed,
                                  cfg.data.eval_prompts, cfg.data.max_prompts)
        log.info("rounds: %s prompts per round; %d held out for evaluation",
                 [len(s) for s in self.split.shards], len(self.split.eval))

    def _adopt_trained_rounds(self) -> None:
        """Continue after the newest complete round checkpoint when it is newer than
        state.json: the trainer checkpoints a round before the driver syncs, evaluates and
        records it, so a driver that stopped in between left a round trained but unrecorded.
        Ray Train resumes from that checkpoint; the driver must begin the round after it."""
        done = []
        for d in (self.run_dir / "train").glob("round-*"):
            if checkpoint_complete(d) and d.name.split("-")[-1].isdigit():
                done.append((int(d.name.split("-")[-1]), d))
        if not done or max(done)[0] < self.state["completed_rounds"]:
            return
        t, ckpt = max(done)
        log.warning("round %d was trained and checkpointed (%s) but the driver stopped before "
                    "recording it: continuing after it (its sampling and evaluation figures "
                    "are not in rounds/)", t, ckpt)
        self.state = {"completed_rounds": t + 1, "checkpoint": str(ckpt / "hf")}
        _write_json(self.state_path, self.state)

    # ------------------------------------------------------------------ the job

    def run(self) -> list[dict]:
        self.setup()
        try:
            with self._step("baseline", {}):
                if self.evaluation is not None:
                    self.evaluation.baseline(self.split.eval,
                                             resumed=bool(self.state["completed_rounds"]))
            for t in range(self.next_round, self.cfg.run.rounds):
                self.reports.append(self.round(t))
            self.record_checkpoints(wait=True)
            self.trainer.finish(timeout_s=600)
        finally:
            for pool in (self.generators, self.judges):
                if pool is not None:
                    pool.shutdown()
            if self.trackers is not None:
                self.trackers.close()
        self._publish(stage="finished")
        return self.reports

    def round(self, t: int) -> dict:
        """generate + judge + train (streamed) -> finish training -> sync -> metrics -> evaluate.
        The round's checkpoint is written meanwhile and recorded when complete
        (`record_checkpoints`: at the latest after the next round's training)."""
        timings: dict = {}
        self._publish(round=t, progress=None)
        with self._step("generate+judge+train", timings):
            if self.cfg.data.from_journal:
                outcome, journal = self._journaled_round(t)
            else:
                outcome, journal = self._stream_round(t, self.split.shards[t])
        # From naming the broadcast's receivers to the end of the sync the set of generators
        # must not change: a resize asked for meanwhile (control service) waits for the sync.
        with self.generators.hold_resizes() if self.generators is not None else \
                contextlib.nullcontext():
            self._end_stream(t)
            with self._step("train", timings):
                result = self.trainer.wait_round_done(t)
            with self._step("sync", timings):
                sync, generators_at, driver_send_s = self._sync(t, result)
        # The round before's checkpoint is complete once this round is handed over.
        self.record_checkpoints(wait=False)
        end_of_round = self._end_of_round(result, generators_at, driver_send_s)
        with self._step("metrics", timings):
            steps = ray.get(self.stream.step_metrics.remote(t))
            self._log_metrics(t, steps)
        with self._step("evaluate", timings):
            win = self.evaluation.win_rate() if self.evaluation is not None else None
        # The judges' own counts (the LLM judge's truncated responses, bounded pairs, failures
        # by kind), each since its actor started.
        judge_counters = self.judges.counters() if self.judges is not None else {}
        report = {"round": t, "prompts": outcome.summary(), "failed": [
                      dataclasses.asdict(f) for f in outcome.failed], "journal": journal,
                  "judge_counters_since_start": judge_counters,
                  "trainer": result.report, "sync": sync, "timings_s": timings,
                  "end_of_round": end_of_round,
                  "checkpoint": str(Path(result.checkpoint_path) / "hf"),
                  "checkpoint_complete": False,
                  "win_rate_vs_round0": win.as_dict() if win else None,
                  "mean_loss": (sum(s["loss"] for s in steps) / len(steps)) if steps else None}
        _write_json(self.run_dir / "rounds" / f"round-{t}.json", report)
        self._unrecorded[t] = report
        self.next_round = t + 1
        self._publish(completed_rounds=t + 1, last_report=report)
        self._append_metrics({"kind": "round", "round": t, **{
            k: report[k] for k in ("win_rate_vs_round0", "mean_loss", "timings_s",
                                   "end_of_round")},
            "accounted": outcome.summary()})
        self.trackers.log_round(t, {"win_rate_vs_round0": (win.as_dict() if win else {}).get(
            "mean"), "mean_loss": report["mean_loss"], "prompts": outcome.summary(),
            "timings_s": timings}, self._samples)
        plot_progress(self.run_dir)
        log.info("round %d done: %d annotated, %d failed, %d rows; win rate vs round 0: %s; "
                 "timings %s; end of round %s (checkpoint being written)", t,
                 outcome.annotated, len(outcome.failed), outcome.rows,
                 win if win else "n/a", {k: round(v, 1) for k, v in timings.items()},
                 end_of_round)
        return report

    def record_checkpoints(self, wait: bool) -> None:
        """Record the rounds whose checkpoint is now complete, oldest first (`wait`: wait for
        all of them): their report gains the write timings and `state.json` moves on to them,
        so `--resume` starts after the last complete one."""
        for t in sorted(self._unrecorded):
            info = self.trainer.wait_checkpoint(t) if wait else self.trainer.checkpoint_info(t)
            if info is None:
                return
            report = self._unrecorded.pop(t)
            report["end_of_round"].update({k: info.get(k) for k in (
                "hf_write_s", "dcp_write_s", "storage_copy_s")})
            report["checkpoint_complete"] = True
            _write_json(self.run_dir / "rounds" / f"round-{t}.json", report)
            self.state = {"completed_rounds": t + 1, "checkpoint": report["checkpoint"]}
            _write_json(self.state_path, self.state)
            self._publish(checkpointed_rounds=t + 1, **(
                {"last_report": report} if t == self.next_round - 1 else {}))
            log.info("round %d checkpoint complete (%s): %s", t, report["checkpoint"],
                     {k: info.get(k) for k in ("hf_write_s", "dcp_write_s")})

    def _tick(self, backlog: Backlog) -> None:
        """Once per pipeline poll: the autoscaler, and (at most once a second) the record of
        a checkpoint completed while this round samples."""
        if self.tick is not None:
            self.tick(backlog)
        if self._unrecorded and time.monotonic() - self._checked_at > 1.0:
            self._checked_at = time.monotonic()
            self.record_checkpoints(wait=False)

    # ------------------------------------------------------------------ steps

    def _stream_round(self, t: int, shard: list[Prompt]) -> tuple[RoundOutcome, dict]:
        """The round's prompts: those in a stopped run's journal go to the trainer from it,
        the rest through the pipeline, each journaled as it is accounted."""
        cfg = self.cfg
        journal, self.resume_journal = self.resume_journal, None
        done = journal.ids() if journal else set()
        todo = [p for p in shard if p.id not in done]
        log.info("round %d/%d: %d prompts%s", t + 1, cfg.run.rounds, len(shard),
                 f" ({len(done)} from the stopped round's journal, {len(todo)} to generate "
                 "and judge)" if journal else "")
        self._begin_round(t, len(shard))
        from_journal = feed_journal(journal.rows if journal else [],
                                    put=lambda rows: self._put(t, rows),
                                    batch_rows=cfg.trainer.global_batch_size,
                                    offer=self._offer_sample)
        writer = JournalWriter(round_dir(self.run_dir, t), round=t,
                               judge=judge_identity(cfg),
                               meta=fingerprint(cfg, [p.id for p in shard]),
                               prompts={p.id: p for p in todo},
                               chunk_prompts=cfg.run.journal_chunk_prompts,
                               flush_s=cfg.run.journal_flush_s) if cfg.run.journal else None

        def record(rec, rows: list[TrainRow]) -> None:
            if writer is not None:
                writer.record(rec, rows)
            if isinstance(rec, Annotated):
                self._offer_sample(rec.prompt.raw or rec.prompt.text, rec.generation.texts,
                                   rec.win_rates)

        def progress(p: dict) -> None:
            log.info("round %d progress: %s", t, p)

        pipeline = RoundPipeline(
            self.generators, self.judges, sink=lambda rows: self._put(t, rows),
            to_rows=lambda a: rows_from_annotated(a, cfg.trainer.selection),
            generate_batch=cfg.pools.generator.batch_size,
            judge_batch=cfg.pools.judge.batch_size, progress=progress, tick=self._tick,
            record=record, observe=lambda p: self._publish(progress=p))
        outcome = pipeline.run(todo)
        if writer is not None:
            writer.flush()
        outcome = from_journal.merge(outcome, redone=len(todo) if journal else 0)
        info = {"dir": str(round_dir(self.run_dir, t)) if writer else None,
                "files_written": len(writer.files) if writer else 0,
                "files_read": [str(f) for f in journal.files] if journal else [],
                "skipped_files": [dict(file=f, reason=r) for f, r in journal.skipped]
                if journal else []}
        return outcome, info

    def _journaled_round(self, t: int) -> tuple[RoundOutcome, dict]:
        """`data.from_journal`: round `t`'s rows from its source journal, rebuilt for this
        config's trainer.selection; nothing is sampled or judged."""
        src = self.sources[t]
        journal = read_round(src, on_corrupt=self.cfg.run.journal_on_corrupt, quarantine=False)
        log.info("round %d/%d: %d prompts from the journal %s", t + 1, self.cfg.run.rounds,
                 len(journal.rows), src)
        self._begin_round(t, len(journal.rows))
        outcome = feed_journal(journal.rows, put=lambda rows: self._put(t, rows),
                               batch_rows=self.cfg.trainer.global_batch_size,
                               selection=self.cfg.trainer.selection, offer=self._offer_sample)
        return outcome, {"dir": None, "source": str(src), "files_read": [
            str(f) for f in journal.files], "skipped_files": [
            dict(file=f, reason=r) for f, r in journal.skipped]}

    def _begin_round(self, t: int, prompts: int) -> None:
        self._samples: list[dict] = []
        rows = prompts * rows_per_prompt(self.cfg.trainer.selection, self.cfg.sampling.k)
        ray.get(self.stream.begin_round.remote(t, rows))

    def _put(self, t: int, rows: list[TrainRow]) -> None:
        ray.get(self.stream.put.remote(t, rows))  # blocks while the trainer's buffer is full

    def _offer_sample(self, prompt: str, texts: list[str], win_rates: list[float]) -> None:
        if len(self._samples) < self.cfg.run.samples_per_round:
            self._samples.append(samples_of(prompt, list(texts), list(win_rates)))

    def _end_stream(self, t: int) -> None:
        if self.sync_method == "collective":
            # Named before the stream ends: rank 0 broadcasts to exactly these generators.
            ray.get(self.stream.set_sync_targets.remote(t, self.generators.actors()))
        ray.get(self.stream.end_round.remote(t))

    def _autoscaler(self) -> Optional[PipelineAutoscaler]:
        # Room for one more actor: its tensor-parallel ranks included.
        scaled = [AutoscaleTarget(pool, QueueAutoscaler(
                      c.min_replicas, c.max_replicas, c.scale_up_backlog, c.scale_down_idle_s,
                      c.scale_cooldown_s), backlog, *actor_resources(role, c))
                  for pool, c, backlog, role in (
                      (self.generators, self.cfg.pools.generator, "generate", "generator"),
                      (self.judges, self.cfg.pools.judge, "judge", "judge"))
                  if c.autoscale]
        return PipelineAutoscaler(scaled) if scaled else None

    def _sync(self, t: int, result: RoundResult) -> tuple[dict, Optional[float], float]:
        """Every generator to version t+1: (the report's sync figures, the wall-clock time at
        which every live generator held it, None without generators; the seconds the driver
        spent sending: the object-store broadcast)."""
        version = t + 1
        if self.generators is None:  # data.from_journal: the round's checkpoint is the result
            return {"method": "none", "reason": "no generators (data.from_journal)"}, None, 0.0
        checkpoint = str(Path(result.checkpoint_path) / "hf")
        # A generator that missed the weights (failed its sync, restarted) reloads the round's
        # checkpoint, which is still being written: it waits for it.
        written = functools.partial(self.trainer.wait_checkpoint, t)
        stats, driver_send_s = dict(result.hand_off.stats), 0.0
        if self.sync_method == "collective":
            self.generators.mark_synced(version, checkpoint, written)
            # Those the sync reached held t+1 when the trainer's hand-off ended.
            at = time.time() if self.generators.ensure_synced() else \
                result.report.get("end_of_round", {}).get("handed_over_at", time.time())
        else:
            t0 = time.perf_counter()
            self.generators.broadcast_buckets(result.hand_off.buckets, version, checkpoint,
                                              written)
            at, driver_send_s = time.time(), time.perf_counter() - t0
            stats["seconds"] = round(driver_send_s, 4)
        versions = self.generators.versions()
        if any(v is not None and v != version for v in versions):
            raise RuntimeError(f"after round {t} the generators hold weight versions "
                               f"{versions}, expected all {version}")
        stats["generator_versions"] = versions
        # A generator restarting now (its process or engine died) holds no weights worth
        # naming: it is synced to `version` before its next batch (it refuses work until).
        stats["restarting"] = sum(v is None for v in versions)
        return stats, at, driver_send_s

    @staticmethod
    def _end_of_round(result: RoundResult, generators_at: Optional[float],
                      driver_send_s: float) -> dict:
        """The report's split of the end of the round (the write's figures come with the
        checkpoint, `record_checkpoints`): `gather_s` (trainer ranks gathering buckets from
        their shards), `send_s` (the rest of the hand-off, plus the driver's object-store
        broadcast), `to_generators_s` (from the last optimizer step to every generator at
        t+1; wall clocks of two processes, on one machine or NTP-synced nodes)."""
        end = dict(result.report.get("end_of_round", {}))
        end.pop("handed_over_at", None)
        if "send_s" in end:
            end["send_s"] = round(end["send_s"] + driver_send_s, 4)
        last = result.report.get("last_step_at")
        end["to_generators_s"] = round(generators_at - last, 4) \
            if generators_at is not None and last is not None else None
        return {**end, "hf_write_s": None, "dcp_write_s": None, "storage_copy_s": None}

    # ------------------------------------------------------------------ output

    @contextlib.contextmanager
    def _step(self, name: str, timings: dict):
        self._publish(stage=name)
        t0 = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t0, 3)

    def _append_metrics(self, line: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line, default=str) + "\n")

    def _log_metrics(self, t: int, steps: list[dict]) -> None:
        self.trackers.log_steps(t, steps)
        for s in steps:
            self._append_metrics({"kind": "step", "round": t, **s})
            if s.get("step", 0) % self.cfg.run.log_every == 0:
                log.info("round %d step %s: loss %.4g log-ratio %.4g grad-norm %.3g lr %.3g",
                         t, s.get("step"), s.get("loss", float("nan")),
                         s.get("log_ratio", float("nan")), s.get("grad_norm", float("nan")),
                         s.get("lr", float("nan")))
