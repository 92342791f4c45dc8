"""The self-play job: set up the pools and the trainer once, then run rounds.

One round reads on one screen (`SelfPlay.round`): generate + judge + train (streamed together
by `sppo.pipeline`), finish training, sync weights, checkpoint, evaluate; each a named, timed
step. Everything a round produces goes to the run directory:

    <run_dir>/config.yaml          resolved config
    <run_dir>/data_report.txt      bad prompt rows, each with index and reason
    <run_dir>/metrics.jsonl        one line per trainer step and per round
    <run_dir>/rounds/round-<t>.json  the round report (counts, failures, timings, win rate)
    <run_dir>/rounds/round-<t>/      the round journal: every prompt's record (`sppo.journal`)
    <run_dir>/tensorboard/           TensorBoard event files (`run.loggers`, `sppo.tracking`)
    <run_dir>/train/...            Ray Train checkpoints; `round-<t>/hf` loads with from_pretrained
    <run_dir>/eval_baseline.jsonl  pi_0's responses on the held-out prompts
    <run_dir>/progress.png         win rate against round 0 and loss per round
    <run_dir>/state.json           completed rounds and the latest checkpoint (for --resume)

A round stopped midway (the driver died) resumes from its journal: its prompts' rows go to the
trainer first (which restarts the round from its start checkpoint), and only the prompts
missing from the journal are generated and judged. With `data.annotated` the rounds' rows come
from existing journals and no generator or judge starts.

Not here: command-line parsing and connecting to Ray (`sppo.driver`), the pools and trainer
(`actors/`), the maths (`sppo.preference`, `sppo.loss`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import ray

from actors.generator import GeneratorPool, make_generator_factory
from actors.judge import JudgePool, make_judge_factory
from actors.stream import create_stream
from actors.trainer import TrainerRun, object_store_hand_off
from actors.weight_sync import CollectiveHandOff
from actors.weights import resolve_backend
from cluster.autoscale import AutoscaledPool, PipelineAutoscaler, QueueAutoscaler
from cluster.placement import actor_resources
from sppo.config import Config, dump_yaml, logger_names, to_dict
from sppo.data import load_prompts, split_rounds
from sppo.evaluate import cross_win_rate, merge_for_eval, plot_progress, summarize
from sppo.journal import JournalWriter, RoundJournal, fingerprint, judge_identity, read_round, \
    round_dir
from sppo.pipeline import Backlog, RoundOutcome, RoundPipeline
from sppo.records import Annotated, Generation, Prompt, TrainRow
from sppo.replay import annotated_sources, replay, stopped_round_journal
from sppo.rows import rows_from_annotated
from sppo.tracking import Trackers, samples_of
from sppo.tiny import resolve_model_path

log = logging.getLogger("sppo.driver")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _gen_from_dict(d: dict) -> Generation:
    p = d["prompt"]
    prompt = Prompt(id=p["id"], text=p["text"], token_ids=tuple(p["token_ids"]), raw=p["raw"],
                    reference=p.get("reference"))
    return Generation(prompt=prompt, response_ids=d["response_ids"], texts=d["texts"],
                      finish_reasons=d["finish_reasons"], logprobs=d.get("logprobs"),
                      weight_version=d.get("weight_version", 0))


class SelfPlay:
    """The job. `tick`, when given, runs once per poll of the streaming pipeline (between
    pool calls); by default it is the autoscaler of the pools whose config says
    `autoscale: true` (`cluster.autoscale.PipelineAutoscaler`), or nothing.

    Read by the control service from its own threads (`sppo.control`): `stage`,
    `current_round`, `pipeline` (the round in progress), `state`, and the pools, which are
    thread-safe."""

    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool = False,
                 tick: Optional[Callable[[Backlog], None]] = None):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.state_path = self.run_dir / "state.json"
        self.state = json.loads(self.state_path.read_text()) if resume and \
            self.state_path.is_file() else {"completed_rounds": 0, "checkpoint": None}
        self.reports: list[dict] = []
        self.stage = "starting"
        self.current_round: Optional[int] = None
        self.pipeline: Optional[RoundPipeline] = None
        self.tick = tick
        self.generators: Optional[GeneratorPool] = None
        self.judges: Optional[JudgePool] = None
        self.trackers: Optional[Trackers] = None
        self.resume_journal: Optional[RoundJournal] = None  # the stopped round's records

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.base_model = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        if cfg.data.annotated:
            self.sources = annotated_sources(cfg.data.annotated, cfg.run.rounds)
        else:
            self._load_prompts()

        self._adopt_trained_rounds()
        start = self.state["completed_rounds"]
        gen_model = self.state["checkpoint"] if start else self.base_model
        if start < cfg.run.rounds and not cfg.data.annotated and cfg.run.journal:
            self.resume_journal = stopped_round_journal(
                self.run_dir, start, fingerprint(cfg, [p.id for p in self.split.shards[start]]),
                resume=self.resume, on_corrupt=cfg.run.journal_on_corrupt)
        self.trackers = Trackers(logger_names(cfg.run.loggers), self.run_dir,
                                 run_name=cfg.run.name, config=to_dict(cfg),
                                 wandb_project=cfg.run.wandb_project,
                                 mlflow_tracking_uri=cfg.run.mlflow_tracking_uri)
        # Written once the checks passed: a run refused above leaves the directory as it was.
        (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        if not cfg.data.annotated:
            self.generators = GeneratorPool(
                make_generator_factory(gen_model, cfg.sampling, cfg.generator,
                                       cfg.pools.generator, dtype=cfg.model.dtype),
                cfg.pools.generator)
            if start:  # generators start from the checkpoint: its weights are version `start`
                self.generators.mark_synced(start, gen_model)
            self.judges = JudgePool(make_judge_factory(cfg.judge, cfg.pools.judge),
                                    cfg.pools.judge)
            if self.tick is None:
                self.tick = self._autoscaler()
        t = cfg.trainer
        self.stream = create_stream(world_size=t.num_workers, global_batch_size=t.global_batch_size,
                                    buffer_rows=max(t.stream_buffer, t.global_batch_size),
                                    epochs=t.epochs, max_length=t.max_length,
                                    selection=t.selection, reference=t.reference,
                                    seed=cfg.run.seed)
        if start:  # the trainer must resume from this round's checkpoint, not an older one
            ray.get(self.stream.mark_done.remote(start - 1, str(Path(gen_model).parent)))
        self.sync_method = cfg.weight_sync.method
        if cfg.data.annotated:  # no generators to send to: the weights stay in the checkpoint
            self.sync_method = "object_store"
        elif self.sync_method == "auto":
            # NCCL between GPUs, and always for vLLM (its weights live in its workers); HF
            # generators on CPU take the object store (shared memory on a node), which
            # measured faster there than gloo over loopback (bench/weights.py).
            self.sync_method = "collective" if t.use_gpu or cfg.generator.backend == "vllm" \
                else "object_store"
        if self.sync_method == "collective":
            hand_off = CollectiveHandOff(self.stream,
                                         backend=resolve_backend(cfg.weight_sync.backend, t.use_gpu),
                                         bucket_mb=cfg.weight_sync.bucket_mb,
                                         timeout_s=cfg.weight_sync.timeout_s,
                                         dtype=cfg.model.dtype)
        else:
            hand_off = object_store_hand_off
        self.trainer = TrainerRun(model_path=self.base_model, trainer=t, stream=self.stream,
                                  storage_path=str(self.run_dir), name="train",
                                  hand_off=hand_off).start()

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
            complete = all((d / f).is_file() for f in ("round.json", "hf/config.json",
                                                       "state/.metadata"))
            if complete and d.name.split("-")[-1].isdigit():
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
                self.baseline = self._baseline() if self.generators is not None else {}
            for t in range(self.state["completed_rounds"], self.cfg.run.rounds):
                self.reports.append(self.round(t))
            self.trainer.finish(timeout_s=600)
        finally:
            for pool in (self.generators, self.judges):
                if pool is not None:
                    pool.shutdown()
            if self.trackers is not None:
                self.trackers.close()
        self.stage = "finished"
        return self.reports

    def round(self, t: int) -> dict:
        """generate + judge + train (streamed) -> finish training -> sync -> checkpoint -> evaluate."""
        timings: dict = {}
        self.current_round = t
        with self._step("generate+judge+train", timings):
            if self.cfg.data.annotated:
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
                sync = self._sync(t, result)
        with self._step("checkpoint", timings):
            steps = ray.get(self.stream.step_metrics.remote(t))
            self._log_metrics(t, steps)
        with self._step("evaluate", timings):
            win = self.evaluate(t + 1)
        # The judges' own counts (the LLM judge's truncated responses, bounded pairs, failures
        # by kind), each since its actor started.
        judge_counters = self.judges.counters() if self.judges is not None else {}
        report = {"round": t, "prompts": outcome.summary(), "failed": [
                      dataclasses.asdict(f) for f in outcome.failed], "journal": journal,
                  "judge_counters_since_start": judge_counters,
                  "trainer": result.report, "sync": sync, "timings_s": timings,
                  "checkpoint": str(Path(result.checkpoint_path) / "hf"),
                  "win_rate_vs_round0": win.as_dict() if win else None,
                  "mean_loss": (sum(s["loss"] for s in steps) / len(steps)) if steps else None}
        _write_json(self.run_dir / "rounds" / f"round-{t}.json", report)
        self.state = {"completed_rounds": t + 1, "checkpoint": report["checkpoint"]}
        _write_json(self.state_path, self.state)
        self._append_metrics({"kind": "round", "round": t, **{
            k: report[k] for k in ("win_rate_vs_round0", "mean_loss", "timings_s")},
            "accounted": outcome.summary()})
        self.trackers.log_round(t, {"win_rate_vs_round0": (win.as_dict() if win else {}).get(
            "mean"), "mean_loss": report["mean_loss"], "prompts": outcome.summary(),
            "timings_s": timings}, self._samples)
        plot_progress(self.run_dir)
        log.info("round %d done: %d annotated, %d failed, %d rows; win rate vs round 0: %s; "
                 "timings %s", t, outcome.annotated, len(outcome.failed), outcome.rows,
                 win if win else "n/a", {k: round(v, 1) for k, v in timings.items()})
        return report

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
        replayed = replay(journal.rows if journal else [], put=lambda rows: self._put(t, rows),
                          batch_rows=cfg.trainer.global_batch_size, offer=self._offer_sample)
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

        self.pipeline = RoundPipeline(
            self.generators, self.judges, sink=lambda rows: self._put(t, rows),
            to_rows=lambda a: rows_from_annotated(a, cfg.trainer.selection),
            generate_batch=cfg.pools.generator.batch_size,
            judge_batch=cfg.pools.judge.batch_size,
            progress=lambda p: log.info("round %d progress: %s", t, p), tick=self.tick,
            record=record)
        outcome = self.pipeline.run(todo)
        if writer is not None:
            writer.flush()
        outcome = replayed.merge(outcome, redone=len(todo) if journal else 0)
        info = {"dir": str(round_dir(self.run_dir, t)) if writer else None,
                "files_written": len(writer.files) if writer else 0,
                "files_read": [str(f) for f in journal.files] if journal else [],
                "skipped_files": [dict(file=f, reason=r) for f, r in journal.skipped]
                if journal else []}
        return outcome, info

    def _journaled_round(self, t: int) -> tuple[RoundOutcome, dict]:
        """`data.annotated`: round `t`'s rows from its source journal, rebuilt for this
        config's trainer.selection; nothing is sampled or judged."""
        src = self.sources[t]
        journal = read_round(src, on_corrupt=self.cfg.run.journal_on_corrupt, quarantine=False)
        log.info("round %d/%d: %d prompts from the journal %s", t + 1, self.cfg.run.rounds,
                 len(journal.rows), src)
        self._begin_round(t, len(journal.rows))
        outcome = replay(journal.rows, put=lambda rows: self._put(t, rows),
                         batch_rows=self.cfg.trainer.global_batch_size,
                         selection=self.cfg.trainer.selection, offer=self._offer_sample)
        return outcome, {"dir": None, "source": str(src), "files_read": [
            str(f) for f in journal.files], "skipped_files": [
            dict(file=f, reason=r) for f, r in journal.skipped]}

    def _begin_round(self, t: int, prompts: int) -> None:
        per_prompt = 1 if self.cfg.trainer.selection == "pair" else self.cfg.sampling.k
        self._samples: list[dict] = []
        ray.get(self.stream.begin_round.remote(t, prompts * per_prompt))

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
        scaled = [AutoscaledPool(pool, QueueAutoscaler(
                      c.min_replicas, c.max_replicas, c.scale_up_backlog, c.scale_down_idle_s,
                      c.scale_cooldown_s), backlog, *actor_resources(role, c))
                  for pool, c, backlog, role in (
                      (self.generators, self.cfg.pools.generator, "generate", "generator"),
                      (self.judges, self.cfg.pools.judge, "judge", "judge"))
                  if c.autoscale]
        return PipelineAutoscaler(scaled) if scaled else None

    def _sync(self, t: int, result) -> dict:
        version = t + 1
        if self.generators is None:  # data.annotated: the round's checkpoint is the result
            return {"method": "none", "reason": "no generators (data.annotated)"}
        if self.sync_method == "collective":
            stats = dict(result.weights)
            # Generators that missed the sync (failed, replaced after the names were taken,
            # restarted) reload the round's checkpoint instead.
            self.generators.mark_synced(version, str(Path(result.checkpoint_path) / "hf"))
            self.generators.ensure_synced()
        else:
            t0 = time.perf_counter()
            arrays = ray.get(result.weights)
            self.generators.broadcast_object_store(arrays, version, self.cfg.weight_sync.bucket_mb)
            stats = {"method": "object_store", "seconds": time.perf_counter() - t0,
                     "bytes": sum(a.nbytes for a in arrays.values())}
        versions = self.generators.versions()
        if any(v is not None and v != version for v in versions):
            raise RuntimeError(f"after round {t} the generators hold weight versions "
                               f"{versions}, expected all {version}")
        stats["generator_versions"] = versions
        # A generator restarting now (its process or engine died) holds no weights worth
        # naming: it is synced to `version` before its next batch (it refuses work until).
        stats["restarting"] = sum(v is None for v in versions)
        return stats

    def _generate_all(self, prompts: list[Prompt]) -> dict[str, Generation]:
        self.generators.submit(prompts)
        out = {}
        for rec in self.generators.drain():
            if isinstance(rec, Generation):
                out[rec.prompt.id] = rec
            else:
                log.warning("evaluation prompt %s failed: %s", rec.prompt_id, rec.reason)
        return out

    def _baseline(self) -> dict[str, Generation]:
        """pi_0's responses on the held-out prompts (saved, so a resumed run reuses them)."""
        path = self.run_dir / "eval_baseline.jsonl"
        if path.is_file():
            return {g.prompt.id: g for g in map(_gen_from_dict, map(
                json.loads, path.read_text().splitlines()))}
        if self.state["completed_rounds"]:
            log.warning("no saved round-0 responses: evaluation is against the resumed policy")
        gens = self._generate_all(self.split.eval) if self.split.eval else {}
        path.write_text("".join(json.dumps(dataclasses.asdict(g)) + "\n" for g in gens.values()))
        return gens

    def evaluate(self, version: int):
        """Win rate of the current generators' policy against pi_0 on the held-out prompts."""
        if not self.baseline:
            return None
        current = self._generate_all([g.prompt for g in self.baseline.values()])
        merged = [merge_for_eval(current[pid], base) for pid, base in self.baseline.items()
                  if pid in current]
        self.judges.submit(merged)
        per_prompt = [cross_win_rate(rec.probs, len(rec.probs) // 2)
                      for rec in self.judges.drain() if isinstance(rec, Annotated)]
        return summarize(per_prompt)

    # ------------------------------------------------------------------ output

    @contextlib.contextmanager
    def _step(self, name: str, timings: dict):
        self.stage = name
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
