"""The streaming round: prompts -> generator pool -> judge pool -> trainer stream, all at once.

All three stages run concurrently with a bound on the work in flight at each: generation is
only submitted while the generator pool has free slots and the judge backlog is below its bound,
judging only while the judge pool has free slots, and handing rows to the trainer blocks when
its buffer is full. So a slow trainer slows the judges, slow judges slow generation, and the
driver's memory stays bounded by (pool slots x batch size) records per stage.

Accounting: every prompt of the round ends as exactly one annotated record (its rows went to
the trainer) or one `Failed` record with the stage and reason. `RoundOutcome` carries the
counts, the failures and each stage's busy time (for the throughput report and the bench).

Not here: the pools themselves (`actors/`), the trainer (`actors.trainer`) or weight sync; this
module only depends on their small duck-typed interfaces below, so tests and the bench can run
it with real pools of any backend.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Union

from sppo.records import Annotated, Failed, Generation, Prompt, RoundOutcome, TrainRow

__all__ = ["RoundPipeline", "RoundOutcome", "Backlog", "StageClock", "screen_generation"]

log = logging.getLogger(__name__)


class _Pool(Protocol):
    def submit(self, batch: list) -> None: ...
    def results(self, timeout: Optional[float] = None) -> list: ...
    def free_slots(self) -> int: ...
    def num_pending(self) -> int: ...


@dataclass
class StageClock:
    """Busy time of a stage: wall time during which it had at least one item in flight."""

    busy_s: float = 0.0
    _since: Optional[float] = None

    def update(self, busy: bool, now: float) -> None:
        if busy and self._since is None:
            self._since = now
        elif not busy and self._since is not None:
            self.busy_s += now - self._since
            self._since = None


def screen_generation(gen: Generation) -> Optional[str]:
    """Reason to drop a generation before judging (no preference signal), or None."""
    if any(len(ids) == 0 for ids in gen.response_ids):
        n = sum(len(ids) == 0 for ids in gen.response_ids)
        return f"empty responses: {n} of {gen.k} responses have no tokens"
    if len({tuple(ids) for ids in gen.response_ids}) == 1:
        return f"all {gen.k} responses identical"
    return None


RowsOrReason = Union[list[TrainRow], str]


@dataclass(frozen=True)
class Backlog:
    """Items waiting for each stage, passed to `tick` once per pipeline poll: prompts waiting
    for a generator slot, generations waiting for a judge slot (the pools' own queues stay
    empty: the pipeline submits only into free slots and keeps the backlog itself)."""

    generate: int
    judge: int


class RoundPipeline:
    """Runs one round's prompts through the three stages concurrently.

    `to_rows(annotated)` turns a judged prompt into training rows, or returns a reason string
    when the prompt carries no training signal (e.g. all responses scored equal in pair mode).
    `sink(rows)` hands rows to the trainer and blocks while its buffer is full.
    `tick(backlog)`, when given, runs once per poll on the pipeline's thread, between pool
    calls: the place for an autoscaling step (`cluster.autoscale.scale_pool`).
    `record(record, rows)`, when given, sees every prompt's final record once, as it is
    accounted: an `Annotated` one with the rows it produced, or a `Failed` one with [] (the
    round journal, `sppo.journal`). `progress(dict)` is called every `progress_every_s` (a
    log line) and `observe(dict)` every `observe_every_s` (the job's published view), both
    with the round's counts so far and once more at its end.
    """

    def __init__(
        self,
        generators: _Pool,
        judges: _Pool,
        sink: Callable[[list[TrainRow]], None],
        to_rows: Callable[[Annotated], RowsOrReason],
        *,
        generate_batch: int,
        judge_batch: int,
        max_judge_backlog: Optional[int] = None,
        screen: Callable[[Generation], Optional[str]] = screen_generation,
        progress: Optional[Callable[[dict], None]] = None,
        progress_every_s: float = 5.0,
        poll_s: float = 0.02,
        tick: Optional[Callable[[Backlog], None]] = None,
        record: Optional[Callable[[Union[Annotated, Failed], list[TrainRow]], None]] = None,
        observe: Optional[Callable[[dict], None]] = None,
        observe_every_s: float = 0.25,
    ):
        self.generators, self.judges = generators, judges
        self.sink, self.to_rows, self.screen = sink, to_rows, screen
        self.generate_batch, self.judge_batch = generate_batch, judge_batch
        self.max_judge_backlog = max_judge_backlog or 4 * judge_batch
        self.progress, self.progress_every_s, self.poll_s = progress, progress_every_s, poll_s
        self.tick, self.record = tick, record
        self.observe, self.observe_every_s = observe, observe_every_s

    def run(self, prompts: Sequence[Prompt]) -> RoundOutcome:
        out = RoundOutcome(prompts=len(prompts))
        ids = [p.id for p in prompts]
        expected = set(ids)
        if len(expected) != len(ids):
            repeated = [pid for pid, n in Counter(ids).items() if n > 1]
            raise ValueError(f"prompt ids must be unique within a round: {len(repeated)} "
                             f"repeated, e.g. {repeated[:5]}")
        todo: deque[Prompt] = deque(prompts)
        to_judge: deque[Generation] = deque()  # generated, waiting for a judge slot
        done: set[str] = set()
        clocks = {"generate": StageClock(), "judge": StageClock()}
        start = last_report = last_observed = time.perf_counter()

        def finish(pid: str) -> None:
            if pid not in expected:  # else it would stand in for one of ours, silently
                raise RuntimeError(f"a record for prompt {pid!r}, which is not in this round "
                                   "(a stage answered under another id)")
            if pid in done:
                raise RuntimeError(f"prompt {pid!r} completed twice")
            done.add(pid)

        def fail(f: Failed) -> None:
            finish(f.prompt_id)
            out.failed.append(f)
            if self.record:
                self.record(f, [])

        while len(done) < len(prompts):
            # 1. Feed generation while it has room and the judge backlog is bounded.
            while todo and self.generators.free_slots() > 0 and \
                    len(to_judge) < self.max_judge_backlog:
                batch = [todo.popleft() for _ in range(min(self.generate_batch, len(todo)))]
                self.generators.submit(batch)
            # 2. Feed the judges.
            while to_judge and self.judges.free_slots() > 0:
                batch = [to_judge.popleft() for _ in range(min(self.judge_batch, len(to_judge)))]
                self.judges.submit(batch)
            now = time.perf_counter()
            clocks["generate"].update(self.generators.num_pending() > 0, now)
            clocks["judge"].update(self.judges.num_pending() > 0, now)

            # 3. Collect. Wait on whichever stage has work, briefly on each when both do.
            gen_busy, judge_busy = self.generators.num_pending() > 0, self.judges.num_pending() > 0
            wait = self.poll_s if (gen_busy and judge_busy) else 1.0
            if gen_busy:
                for rec in self.generators.results(timeout=wait):
                    if isinstance(rec, Failed):
                        fail(rec)
                        continue
                    out.generated += 1
                    out.response_tokens += sum(len(r) for r in rec.response_ids)
                    reason = self.screen(rec)
                    if reason:
                        fail(Failed(rec.prompt.id, "generate", reason))
                    else:
                        to_judge.append(rec)
            if judge_busy:
                rows: list[TrainRow] = []
                for rec in self.judges.results(timeout=wait):
                    if isinstance(rec, Failed):
                        fail(rec)
                        continue
                    made = self.to_rows(rec)
                    if isinstance(made, str):
                        fail(Failed(rec.prompt.id, "select", made))
                        continue
                    finish(rec.prompt.id)
                    out.annotated += 1
                    rows.extend(made)
                    if self.record:
                        self.record(rec, made)
                if rows:
                    t0 = time.perf_counter()
                    self.sink(rows)  # blocks while the trainer's buffer is full
                    out.sink_busy_s += time.perf_counter() - t0
                    out.rows += len(rows)
            if not gen_busy and not judge_busy and to_judge:
                time.sleep(self.poll_s)  # judges at capacity 0 (resizing): wait, don't spin
            if not gen_busy and not judge_busy and not todo and not to_judge \
                    and len(done) < len(prompts):
                missing = sorted(set(ids) - done)[:5]
                raise RuntimeError(f"pipeline stalled with {len(prompts) - len(done)} prompt(s) "
                                   f"unaccounted for, e.g. {missing}")
            if self.tick:
                # Generation only counts as backed up while it is what holds prompts back
                # (not while the judges' backlog is full).
                gen_backlog = len(todo) if len(to_judge) < self.max_judge_backlog else 0
                self.tick(Backlog(generate=gen_backlog, judge=len(to_judge)))
            now = time.perf_counter()
            if self.progress and now - last_report >= self.progress_every_s:
                last_report = now
                self.progress(self._progress(out, len(done), now - start))
            if self.observe and now - last_observed >= self.observe_every_s:
                last_observed = now
                self.observe(self._progress(out, len(done), now - start))

        now = time.perf_counter()
        for c in clocks.values():
            c.update(False, now)
        out.wall_s = now - start
        out.generate_busy_s = clocks["generate"].busy_s
        out.judge_busy_s = clocks["judge"].busy_s
        final = self._progress(out, len(done), out.wall_s)
        if self.progress:
            self.progress(final)
        if self.observe:
            self.observe(final)
        return out

    @staticmethod
    def _progress(out: RoundOutcome, done: int, elapsed: float) -> dict:
        return {
            "prompts_done": done, "prompts": out.prompts, "generated": out.generated,
            "judged": out.annotated, "failed": len(out.failed), "rows": out.rows,
            "elapsed_s": round(elapsed, 1),
            "prompts_per_s": round(done / elapsed, 2) if elapsed > 0 else 0.0,
            "tokens_per_s": round(out.response_tokens / elapsed, 1) if elapsed > 0 else 0.0,
        }
