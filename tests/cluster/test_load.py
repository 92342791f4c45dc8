"""Load: a 4,000-prompt round through `RoundPipeline` with real pools, bounded driver memory,
every prompt accounted for exactly once.

Real pools on the session's local Ray cluster: 3 HF generators on the tiny Llama (K=2 and 4 new
tokens, so that the round is about the number of records, not the model) and one Python judge
(`sppo.demo_judge:prefers_more_e`), batches of 64 prompts. The sink only counts rows: the real
`TrainStream` and FSDP trainer would make the round take minutes on a 2-core machine and hold
their rows in other processes anyway (bench/load.py runs the same round into the real
`TrainStream` actor, drained by a consumer).

Bounded memory, measured as `tracemalloc`'s peak of the driver's Python allocations during a
round above what was allocated when it started: a 1,000-prompt round, then a 4,000-prompt round
on the same warm pools. A pipeline that kept every generation would grow its peak by at least one
`Generation` record (as the driver holds it, measured here) per extra prompt; the bounded one
grows by its per-prompt bookkeeping only (ids, the set of finished prompts: about 300 B). The
test asserts less than half a record per extra prompt. Resident set size is printed, not
asserted (it also moves with Ray's C++ core worker and mapped object-store pages).
"""

from __future__ import annotations

import os
import pickle
import resource
import time
import tracemalloc

from actors.generator import GeneratorPool, make_generator_factory
from actors.judge import JudgePool, make_judge_factory
from sppo.config import GeneratorConfig, JudgeConfig, PoolConfig, SamplingConfig
from sppo.journal import JournalWriter, read_round
from cluster.pipeline import RoundPipeline
from sppo.records import Generation, Prompt
from sppo.rows import rows_from_annotated
from sppo.tiny import synthetic_prompts

K, MAX_NEW_TOKENS, BATCH, GENERATORS = 2, 4, 64, 3
# The small round is already past the in-flight plateau (3 x 2 x 64 prompts generating, up to
# 4 x 64 waiting for the judge, 2 x 64 judging), so the difference is per-prompt growth only.
# That plateau varies by a few hundred KiB with timing; 3,000 prompts between the rounds make
# it a small part of the per-prompt figure.
SMALL, LARGE = 1000, 4000
MiB = 2 ** 20


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def record_bytes(record) -> int:
    """Traced bytes of one record as the driver receives it (unpickled), averaged over 200."""
    blob = pickle.dumps(record)
    before = tracemalloc.get_traced_memory()[0]
    copies = [pickle.loads(blob) for _ in range(200)]
    size = (tracemalloc.get_traced_memory()[0] - before) // len(copies)
    del copies
    return size


def measured_round(gens, judges, prompts: list[Prompt], journal_dir) -> dict:
    """Run one round, journaled as the driver journals it; count what became of each prompt
    without holding it (a byte per prompt, allocated before the measurement starts)."""
    ends = bytearray(len(prompts))  # prompt n: rows seen + failures seen, must end as 1
    writer = JournalWriter(journal_dir, round=0, judge="python", meta={},
                           prompts={p.id: p for p in prompts}, chunk_prompts=64)

    def index(pid: str) -> int:
        return int(pid.rsplit("-", 1)[1])

    def sink(rows):
        for r in rows:
            ends[index(r.prompt_id)] += 1

    pipe = RoundPipeline(gens, judges, sink, lambda a: rows_from_annotated(a, "pair"),
                         generate_batch=BATCH, judge_batch=BATCH, record=writer.record)
    rss_before = rss_mib()
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    out = pipe.run(prompts)
    writer.flush()
    peak = tracemalloc.get_traced_memory()[1] - start
    for f in out.failed:
        ends[index(f.prompt_id)] += 1
    return {"outcome": out, "ends": ends, "traced_peak": peak,
            "rss_mib": (round(rss_before, 1), round(rss_mib(), 1))}


def test_large_round_bounded_driver_memory_and_every_prompt_accounted(ray_cluster,
                                                                     tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    sampling = SamplingConfig(k=K, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS)
    gen_cfg = PoolConfig(replicas=GENERATORS, max_replicas=GENERATORS, num_cpus=0.5,
                         batch_size=BATCH, max_in_flight=2)
    judge_cfg = PoolConfig(replicas=1, num_cpus=0.5, batch_size=BATCH, max_in_flight=2)
    gens = GeneratorPool(make_generator_factory(tiny_llama_dir, sampling, GeneratorConfig(),
                                                gen_cfg), gen_cfg)
    judges = JudgePool(make_judge_factory(JudgeConfig(), judge_cfg), judge_cfg)
    tracemalloc.start()
    try:
        # Warm pools (actors started, models loaded) and one real record's size.
        gens.submit(synthetic_prompts(tok, 4, "warm"))
        sample = next(g for g in gens.drain() if isinstance(g, Generation))
        gen_bytes = record_bytes(sample)
        rounds = {}
        for name, n in (("small", SMALL), ("large", LARGE)):
            prompts = synthetic_prompts(tok, n, name)
            t0 = time.perf_counter()
            rounds[name] = measured_round(gens, judges, prompts, tmp_path / name)
            rounds[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    finally:
        tracemalloc.stop()
        gens.shutdown()
        judges.shutdown()

    for name, n in (("small", SMALL), ("large", LARGE)):
        r, out = rounds[name], rounds[name]["outcome"]
        print(f"{name} round: {n} prompts in {r['wall_s']} s, {out.annotated} annotated, "
              f"{len(out.failed)} failed {out.failed_by_reason()}; driver traced peak "
              f"{r['traced_peak'] / MiB:.2f} MiB ({r['traced_peak'] / gen_bytes:.0f} "
              f"Generations' worth), RSS {r['rss_mib'][0]} -> {r['rss_mib'][1]} MiB")
        # Every prompt ended exactly once: a row or a failure, never both, never none.
        assert out.prompts == n == out.annotated + len(out.failed)
        assert r["ends"] == bytearray([1]) * n
        assert out.rows == out.annotated  # pair selection: one row per annotated prompt
        # The only failure a random tiny model may cause: two identical samples.
        assert set(out.failed_by_reason()) <= {f"generate: all {K} responses identical"}
        # The journal holds one row per prompt, with the round's counts.
        counts = read_round(tmp_path / name).counts()
        assert counts == {"prompts": n, "annotated": out.annotated, "failed": len(out.failed),
                          "rows": out.rows}
    per_prompt = (rounds["large"]["traced_peak"] - rounds["small"]["traced_peak"]) / (
        LARGE - SMALL)
    print(f"one Generation: {gen_bytes} B; peak growth per extra prompt: {per_prompt:.0f} B; "
          f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    assert gen_bytes > 500  # the yardstick is a real record, not an empty one
    assert per_prompt < gen_bytes / 2, (
        f"the driver's peak grew by {per_prompt:.0f} B per extra prompt, at least half a "
        f"Generation ({gen_bytes} B): the pipeline is holding records it has finished with")
