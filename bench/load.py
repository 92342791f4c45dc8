"""Load: one large streaming round, with the driver's memory measured and every prompt counted.

Runs rounds of `--prompts` prompts (default 2,000) through `cluster.pipeline.RoundPipeline` with
real pools on a local Ray cluster: HF generators on the tiny Llama (K=2, 4 new tokens: the
model is not the point, the number of records is) and the demo's Python judge. The rows go
into the real `actors.stream.TrainStream` actor, drained by a consumer actor standing in for
the trainer workers (`--sink count` counts them in the driver instead). A smaller round
(`--small`, default 1,000: past the in-flight plateau) runs first on the same pools; the
difference of the two peaks per extra prompt is what the driver keeps per prompt (a pipeline
holding its records would show at least one `Generation` per prompt; tests/sppo/test_load.py
asserts less than half of one).

Printed per round: prompts, annotated, failed, lost (prompts neither annotated nor failed, and
ids that came back twice or from outside the round), wall time, and the driver's memory:
- traced peak: `tracemalloc`'s peak of Python allocations during the round, above what was
  allocated when it started (what the pipeline holds: records in flight, its bookkeeping);
- RSS peak: the process's resident set sampled every 20 ms, above its value at the start
  (includes Ray's C++ core worker and mapped object-store pages, so it is noisier);
- ru_maxrss before and after (the process's lifetime high-water mark).
And one `Generation` record's traced size, so the peak can be read as "records held".
Each round is journaled as the driver journals it (`sppo.journal`, chunks of 64 prompts, in a
temporary directory removed at the end), so the peaks include the journal's chunk; `journal_s`
is the driver's time in the journal and `journal_share_of_round` the part of it spent on the
pipeline's thread as a share of the round's wall time.

    .venv/bin/python bench/load.py [--prompts 2000] [--small 1000] [--replicas 3] [--batch 64]
                                   [--sink stream|count]
    .venv/bin/python bench/load.py --smoke   # CI: rounds of 24 and 48 prompts, 1 generator
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402

from actors.generator import GeneratorPool, make_generator_factory  # noqa: E402
from actors.judge import JudgePool, make_judge_factory  # noqa: E402
from actors.stream import RoundResult, create_stream  # noqa: E402
from sppo.config import GeneratorConfig, JudgeConfig, PoolConfig, SamplingConfig  # noqa: E402
from sppo.journal import JournalWriter  # noqa: E402
from cluster.pipeline import RoundPipeline  # noqa: E402
from sppo.records import Failed, Generation  # noqa: E402
from sppo.rows import rows_from_annotated  # noqa: E402
from sppo.tiny import ensure_tiny_llama, synthetic_prompts  # noqa: E402

K, MAX_NEW_TOKENS = 2, 4
MiB = 2 ** 20


def rss_bytes() -> int:
    """This process's resident set size now (Linux: /proc/self/statm; no psutil needed)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident set size of this process, sampled on a thread while in use."""

    def __init__(self, every_s: float = 0.02):
        self.every_s = every_s
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def record_bytes(record) -> int:
    """Traced bytes of one record as the driver receives it (unpickled), averaged over 200."""
    blob = pickle.dumps(record)
    before = tracemalloc.get_traced_memory()[0]
    copies = [pickle.loads(blob) for _ in range(200)]
    size = (tracemalloc.get_traced_memory()[0] - before) // len(copies)
    del copies
    return size


@ray.remote(num_cpus=0)
class Consumer:
    """Stands in for the trainer workers: a world of one rank taking every step's rows."""

    def __init__(self, stream):
        self.stream = stream

    def drain(self, t: int) -> int:
        generation, _ = ray.get(self.stream.attach.remote())
        ray.get(self.stream.wait_round.remote(t))
        rows = step = 0
        while (s := ray.get(self.stream.next_step.remote(t, 0, step, generation))) is not None:
            rows, step = rows + len(s.rows), step + 1
        # Close the round as rank 0 does (no weights: nothing was trained).
        ray.get(self.stream.handed_over.remote(RoundResult(t, {"rows": rows}, None, "")))
        ray.get(self.stream.checkpoint_done.remote(t, {"path": ""}))
        return rows


def one_round(gens, judges, prompts, args, t: int, stream=None) -> dict:
    sink_rows = [0]
    consumer = done_ref = None
    if stream is not None:
        ray.get(stream.begin_round.remote(t, len(prompts)))
        consumer = Consumer.remote(stream)
        done_ref = consumer.drain.remote(t)

        def sink(rows):
            ray.get(stream.put.remote(t, rows))
            sink_rows[0] += len(rows)
    else:
        def sink(rows):
            sink_rows[0] += len(rows)

    # Journaled as the driver journals a round (sppo.journal): its chunk is part of the peak.
    writer = JournalWriter(Path(args.journal_dir) / f"round-{t}", round=t, judge="python",
                           meta={}, prompts={p.id: p for p in prompts}, chunk_prompts=64)
    journal_s = [0.0]  # the driver's time in the journal: records to Arrow, chunks to disk

    def record(rec, rows):
        t0 = time.perf_counter()
        writer.record(rec, rows)
        journal_s[0] += time.perf_counter() - t0

    pipe = RoundPipeline(gens, judges, sink, lambda a: rows_from_annotated(a, "pair"),
                         generate_batch=args.batch, judge_batch=args.batch, record=record)
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.reset_peak()
    traced_start = tracemalloc.get_traced_memory()[0]
    with RssSampler() as rss:
        out = pipe.run(prompts)
        record_s = journal_s[0]
        t0 = time.perf_counter()
        writer.flush()
        journal_s[0] += time.perf_counter() - t0
    traced_peak = tracemalloc.get_traced_memory()[1] - traced_start
    ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trained = None
    if stream is not None:
        ray.get(stream.end_round.remote(t))
        trained = ray.get(done_ref)
        ray.kill(consumer)

    ids = {p.id for p in prompts}
    failed_ids = [f.prompt_id for f in out.failed]
    lost = len(prompts) - out.annotated - len(out.failed)
    return {"prompts": len(prompts), "annotated": out.annotated, "failed": len(out.failed),
            "lost": lost, "failed_outside_round": len(set(failed_ids) - ids),
            "rows_to_sink": sink_rows[0], "rows_trained": trained,
            "failed_by_reason": out.failed_by_reason(), "wall_s": round(out.wall_s, 2),
            "prompts_per_s": round(len(prompts) / out.wall_s, 1),
            "journal_s": round(journal_s[0], 3), "journal_files": len(writer.files),
            # Time the pipeline's thread spent journaling, as a share of the round's wall time.
            "journal_share_of_round": round(record_s / out.wall_s, 4),
            "traced_peak_mib": round(traced_peak / MiB, 2),
            "rss_peak_growth_mib": round((rss.peak - rss.start) / MiB, 1),
            "ru_maxrss_mib": (round(ru_before / 1024, 1), round(ru_after / 1024, 1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--small", type=int, default=1000, help="a smaller round first (0: none)")
    ap.add_argument("--replicas", type=int, default=3, help="generator actors")
    ap.add_argument("--batch", type=int, default=64, help="prompts per generator/judge call")
    ap.add_argument("--sink", choices=["stream", "count"], default="stream")
    ap.add_argument("--smoke", action="store_true",
                    help="rounds of 24 and 48 prompts, 1 generator: the code path quickly "
                         "(tests/bench)")
    if ap.parse_known_args()[0].smoke:  # flags given explicitly still win
        ap.set_defaults(prompts=48, small=24, replicas=1, batch=8)
    args = ap.parse_args()
    args.journal_dir = tempfile.mkdtemp(prefix="sppo-load-journal-")

    model_dir = str(ensure_tiny_llama(Path(tempfile.gettempdir()) / "sppo-bench-tiny"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ray.init(num_cpus=16, include_dashboard=False, runtime_env={"env_vars": {
        "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    sampling = SamplingConfig(k=K, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS)
    gen_cfg = PoolConfig(replicas=args.replicas, max_replicas=args.replicas, num_cpus=0.5,
                         batch_size=args.batch, max_in_flight=2)
    judge_cfg = PoolConfig(replicas=1, num_cpus=0.5, batch_size=args.batch, max_in_flight=2)
    gens = GeneratorPool(make_generator_factory(model_dir, sampling, GeneratorConfig(), gen_cfg),
                         gen_cfg)
    judges = JudgePool(make_judge_factory(JudgeConfig(), judge_cfg), judge_cfg)
    stream = None
    if args.sink == "stream":
        stream = create_stream(world_size=1, global_batch_size=args.batch,
                               buffer_rows=4 * args.batch, epochs=1, max_length=512,
                               selection="pair", reference="frozen")
    tracemalloc.start()
    try:
        # Warm up (actors start, models load) and take one real record's size.
        gens.submit(synthetic_prompts(tok, 4, "warm"))
        sample = next(g for g in gens.drain() if isinstance(g, Generation))
        gen_bytes = record_bytes(sample)
        # Warm the journal too: pyarrow's first write allocates ~24 MiB once, which would
        # otherwise land in the first round's peak.
        warm = JournalWriter(Path(args.journal_dir) / "warm", round=0, judge="python", meta={},
                             prompts={}, chunk_prompts=1)
        warm.record(Failed(sample.prompt.id, "generate", "warm-up"), [])
        print(f"pools: {args.replicas} generators + 1 judge, batch {args.batch}, "
              f"max_in_flight 2; K={K}, {MAX_NEW_TOKENS} new tokens; sink: {args.sink}")
        print(f"one Generation as the driver holds it: {gen_bytes} B traced")
        rounds = [("small", args.small)] if args.small else []
        peaks = []
        for t, (name, n) in enumerate(rounds + [("large", args.prompts)]):
            report = one_round(gens, judges, synthetic_prompts(tok, n, name), args, t, stream)
            print(f"{name} round: {report}")
            held = report["traced_peak_mib"] * MiB / gen_bytes
            print(f"  traced peak = {held:.0f} Generation records' worth, for {n} prompts")
            peaks.append((n, report["traced_peak_mib"] * MiB))
        if len(peaks) == 2 and peaks[1][0] != peaks[0][0]:
            slope = (peaks[1][1] - peaks[0][1]) / (peaks[1][0] - peaks[0][0])
            print(f"driver peak growth per extra prompt: {slope:.0f} B "
                  f"({slope / gen_bytes:.2f} Generation)")
    finally:
        tracemalloc.stop()
        gens.shutdown()
        judges.shutdown()
        ray.shutdown()
        shutil.rmtree(args.journal_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
