"""The bounded stream between the judges and the trainer workers, and the trainer's control line.
Over 400 lines: one actor's whole protocol (driver, producers, workers), each call documented.

One `TrainStream` actor per job, created by the driver (`create_stream`). Three parties use it:

- the driver: `mark_done(t, checkpoint)` once when it resumes a run after round t,
  `begin_round(t, expected_rows)`, then, once the producers have ended the round,
  `wait_round_done(t)` (or `TrainerRun.wait_round_done`, which also notices a dead trainer and
  a round that cannot finish, see `stalled`): the round's weights are at the generators; later
  `checkpoint_info(t)` / `wait_checkpoint(t)` for its checkpoint; `finish()` at the end;
  `step_metrics(t)` and `status()` to watch;
- producers (the pipeline): `put(t, rows)` blocks while the buffer holds `buffer_rows` rows,
  `end_round(t)` when the round's last row is in;
- trainer workers: rank 0 `attach()` when the worker group starts (it says where to resume);
  every rank `wait_round(t)`, then `next_step(t, rank, step, generation)` until it returns
  None; rank 0 also `log_step`, `round_counts`, `round_redone`, `handed_over` (the weights
  reached the generators) and `checkpoint_done` (the round's checkpoint is complete).
  `TrainerRun` calls `abort(reason)` if the run dies for good, so that nobody waits forever on
  a trainer that is gone.

A round ends in two steps (`actors.trainer`): `handed_over`, after which the driver syncs,
evaluates and begins the next round, whose rows flow in while the workers write the
checkpoint; then `checkpoint_done`. A round's rows are kept until its checkpoint is done.

Equal work on every rank, so FSDP collectives never hang: the actor forms each optimizer step's
global batch once (the first rank to ask triggers it) and every rank gets its slice, all slices
the same length (`actors.steps.RoundRows`: how rows become steps, the remainder dropped, the
epochs after the first). Rows that cannot fit `max_length` are dropped (or cut) at `put` time,
see `sppo.rows.fit_row`.

A restarted worker group resumes from the last complete round checkpoint (`attach` names it);
`attach` rewinds every later round so its rows are trained again from that checkpoint's weights
(they were lost with the failed workers' weights), never twice into the same weights. A round
that was handed over but not checkpointed is trained again for its checkpoint only: its
`wait_round` spec says `hand_off=False` (the generators already hold it). `round_redone` says
what a round redid that way (restarts, steps and rows), for the round's report. Asking for a
step twice is an error.

Waits that can never be satisfied fail instead of blocking: `abort` ends every wait on a dead
trainer; `wait_round` raises for a round the driver skipped and returns None after `finish`;
`sync_targets` raises for a round that is over. A round finishes only after its producers call
`end_round`, which the stream cannot foresee (a waiter may legitimately come first), so
`wait_round_done` itself waits; `stalled` says when a round has been left without `end_round`
and no producer is active, and `TrainerRun.wait_round_done` raises that message.

The class is plain asyncio (tested without Ray); `create_stream` makes it a Ray async actor.
What it keeps per round: its rows and steps (`RoundRows`), its lifecycle (begun, producers
done, handed over, checkpointed; restarts and what they redid; what producers and ranks are doing, for
`stalled`), the step metrics rank 0 logs, and the generators a collective sync sends to.
Not here: the training itself (`actors.trainer`) and building rows (`sppo.rows`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from actors.steps import RoundRows, StepSlice
from actors.weights import HandOffResult
from sppo.records import TrainRow

__all__ = ["RoundSpec", "StepSlice", "RoundResult", "TrainStream", "create_stream"]


@dataclass(frozen=True)
class RoundSpec:
    """What workers need to start a round."""

    round_index: int
    expected_rows: int  # sets the schedule's horizon (`sppo.optim.schedule_steps`)
    hand_off: bool = True  # False: trained again only for its checkpoint (already handed over)


@dataclass
class RoundResult:
    """What rank 0 hands the driver at the end of a round."""

    round_index: int
    report: dict[str, Any]  # counts and mean metrics of the round
    hand_off: HandOffResult  # what the weights' hand-off did (and the object-store buckets)
    checkpoint_path: str  # where the round's checkpoint is written (complete after
    # `checkpoint_done`: `actors.round_end.checkpoint_complete`); `<path>/hf` loads with
    # from_pretrained


@dataclass
class _Round:
    spec: RoundSpec
    rows: RoundRows
    result: Optional[RoundResult] = None  # handed over
    checkpoint: Optional[dict[str, Any]] = None  # checkpoint_done's info: path, write timings
    metrics: list[dict[str, Any]] = field(default_factory=list)  # rank 0's, per step
    restarts: int = 0  # worker groups that restarted while this round was unfinished
    steps_redone: int = 0  # steps every rank had received before those restarts
    rows_redone: int = 0  # rows in those steps (their training was lost: trained again)
    producer_at: float = field(default_factory=time.monotonic)  # last begin_round, put or end_round
    putting: int = 0  # `put` calls in progress (possibly blocked on a full buffer)
    waiting: dict[int, int] = field(default_factory=dict)  # rank -> step it waits in next_step for


class TrainStream:
    """See the module docstring. All methods are coroutines (one asyncio condition guards all
    state), so as a Ray actor it serves blocked producers and polling workers concurrently."""

    def __init__(self, *, world_size: int, global_batch_size: int, buffer_rows: int,
                 epochs: int, max_length: int, selection: Literal["pair", "all"],
                 reference: Literal["frozen", "sampled"], seed: int = 0):
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size {global_batch_size} must be a multiple of "
                             f"the world size {world_size}")
        if buffer_rows < global_batch_size:
            # A step waits for a full global batch in the buffer; a smaller buffer never fills.
            raise ValueError(f"buffer_rows {buffer_rows} must be >= global_batch_size "
                             f"{global_batch_size}")
        self._world = world_size
        self._gbs = global_batch_size
        self._capacity = buffer_rows
        self._epochs = epochs
        self._max_length = max_length
        self._pair = selection == "pair"
        self._sampled_ref = reference == "sampled"
        self._seed = seed
        self._cond = asyncio.Condition()
        self._rounds: dict[int, _Round] = {}
        self._current: Optional[int] = None
        self._finished = False
        self._generation = 0
        self._aborted: Optional[str] = None
        self._sync_targets: dict[int, list] = {}  # round -> generator handles to broadcast to

    # ------------------------------------------------------------------ driver

    async def begin_round(self, round_index: int, expected_rows: int) -> None:
        async with self._cond:
            cur = self._rounds.get(self._current) if self._current is not None else None
            if cur is not None and cur.result is None:
                raise RuntimeError(f"round {round_index} begun while round {self._current} "
                                   f"is still running")
            if self._current is not None and round_index <= self._current:
                raise ValueError(f"round {round_index} must come after round {self._current}")
            if self._finished:
                raise RuntimeError("the stream is finished")
            self._rounds[round_index] = self._new_round(RoundSpec(round_index, expected_rows))
            self._current = round_index
            self._cond.notify_all()

    async def mark_done(self, round_index: int, checkpoint_path: str) -> None:
        """Record round `round_index` as done by an earlier driver (`--resume`), with its
        complete checkpoint, before any round begins here: the trainer resumes from it."""
        async with self._cond:
            if self._current is not None:
                raise RuntimeError(f"mark_done({round_index}) after round {self._current} began")
            r = self._new_round(RoundSpec(round_index, 0))
            r.result = RoundResult(round_index, {}, HandOffResult(), checkpoint_path)
            r.checkpoint = {"path": checkpoint_path}
            self._rounds[round_index] = r
            self._current = round_index
            self._cond.notify_all()

    async def wait_round_done(self, round_index: int) -> RoundResult:
        """Rank 0's result of round `round_index`. Waits as long as it takes: a waiter may come
        before the producers end the round. `TrainerRun.wait_round_done` polls `stalled` so that
        a round nobody will end is reported instead of waited on forever."""
        async with self._cond:
            r = self._round(round_index)
            await self._cond.wait_for(lambda: r.result is not None or self._aborted)
            self._check_aborted()
            return r.result

    async def checkpoint_info(self, round_index: int) -> Optional[dict[str, Any]]:
        """Round `round_index`'s `checkpoint_done` info (its path and write timings), or None
        while it is being written."""
        async with self._cond:
            return self._round(round_index).checkpoint

    async def wait_checkpoint(self, round_index: int) -> dict[str, Any]:
        """Wait until round `round_index`'s checkpoint is complete; its info."""
        async with self._cond:
            r = self._round(round_index)
            await self._cond.wait_for(lambda: r.checkpoint is not None or self._aborted)
            self._check_aborted()
            return r.checkpoint

    async def abort(self, reason: str) -> None:
        """The trainer run died for good: every waiting and later call raises (so producers
        blocked in `put` and the driver in `wait_round_done` do not wait forever)."""
        async with self._cond:
            self._aborted = reason
            self._cond.notify_all()

    async def finish(self) -> None:
        """No more rounds: workers waiting for the next round get None and exit their loop."""
        async with self._cond:
            self._finished = True
            self._cond.notify_all()

    async def set_sync_targets(self, round_index: int, targets: list) -> None:
        """The driver names the generators that rank 0 broadcasts round `round_index`'s
        weights to (a collective hand-off waits for this)."""
        async with self._cond:
            self._sync_targets[round_index] = list(targets)
            self._cond.notify_all()

    async def sync_targets(self, round_index: int) -> list:
        """Rank 0's side: wait until the driver has named the round's broadcast targets.
        Raises once they can no longer come (the round is over, see `_targets_gone`)."""
        async with self._cond:
            await self._cond.wait_for(lambda: round_index in self._sync_targets
                                      or self._aborted or self._targets_gone(round_index))
            self._check_aborted()
            if round_index not in self._sync_targets:
                raise RuntimeError(f"no broadcast targets will be named for round {round_index}: "
                                   f"{self._targets_gone(round_index)}")
            # Kept until handed over: a worker group restarted before then hands over again.
            return list(self._sync_targets[round_index])

    async def stalled(self, round_index: int, idle_s: float) -> Optional[str]:
        """Why round `round_index` cannot finish, or None while it still may.

        A round finishes only after its producers call `end_round`. When they have not, no
        `put` is in progress and none has come for `idle_s` seconds, nobody is taken to be
        going to: the answer names what is missing, with the rows put and what the trainer
        ranks wait for. (A producer between two slow batches looks the same, hence `idle_s`.)
        """
        async with self._cond:
            r = self._round(round_index)
            idle = time.monotonic() - r.producer_at
            if r.result is not None or r.rows.producers_done or r.putting or idle < idle_s:
                return None
            by_step = collections.defaultdict(list)
            for rank, step in sorted(r.waiting.items()):
                by_step[step].append(str(rank))
            ranks = "; ".join(f"trainer rank{'s' if len(rs) > 1 else ''} {', '.join(rs)} "
                              f"waiting for step {step}" for step, rs in sorted(by_step.items())
                              ) or "no trainer rank waiting for rows yet"
            return (f"round {round_index} cannot finish: end_round({round_index}) was never "
                    f"called ({r.rows.rows_put} rows put, {len(r.rows.buffer)} buffered; "
                    f"{ranks}) and no "
                    f"producer has put rows for {idle:.1f} s")

    async def step_metrics(self, round_index: int, start: int = 0) -> list[dict[str, Any]]:
        async with self._cond:
            return list(self._round(round_index).metrics[start:])

    async def status(self) -> dict[str, Any]:
        async with self._cond:
            r = self._rounds.get(self._current) if self._current is not None else None
            if r is None:
                return {"round": None, "finished": self._finished}
            return {"round": self._current, "finished": self._finished,
                    "buffered": len(r.rows.buffer), "producers_done": r.rows.producers_done,
                    "steps_formed": r.rows.next_form, "done": r.result is not None,
                    **r.rows.counts()}

    # ------------------------------------------------------------------ producers

    async def put(self, round_index: int, rows: list[TrainRow]) -> None:
        """Add rows to the round; waits while the buffer is full."""
        async with self._cond:
            self._check_aborted()
            r = self._round(round_index)
            if r.rows.producers_done:
                raise RuntimeError(f"put after end_round({round_index})")
            r.putting += 1  # a put blocked on a full buffer is a producer at work (`stalled`)
            r.producer_at = time.monotonic()
            try:
                for row in rows:
                    if self._sampled_ref and (row.chosen_ref_logp is None or (
                            row.is_pair and row.rejected_ref_logp is None)):
                        raise ValueError(f"row of prompt {row.prompt_id!r} has no sampled-token "
                                         f"reference log-prob (trainer.reference = 'sampled')")
                    fitted = r.rows.fit(row, self._max_length, cut_ok=not self._sampled_ref,
                                        pair=self._pair)
                    if fitted is None:
                        continue
                    await self._cond.wait_for(
                        lambda: len(r.rows.buffer) < self._capacity or self._aborted)
                    self._check_aborted()
                    r.rows.buffer.append(fitted)
                    self._cond.notify_all()
            finally:
                r.putting -= 1
                r.producer_at = time.monotonic()

    async def end_round(self, round_index: int) -> None:
        async with self._cond:
            r = self._round(round_index)
            r.rows.producers_done, r.producer_at = True, time.monotonic()
            self._cond.notify_all()

    # ------------------------------------------------------------------ workers

    async def wait_round(self, round_index: int) -> Optional[RoundSpec]:
        """The spec of round `round_index` once the driver begins it; None after `finish()`.
        A round already handed over (a restarted group trains it again for its checkpoint)
        comes with `hand_off=False`.

        A driver that resumes a job must begin the round after the last round checkpoint (the
        trainer resumes from it); a later round is an error here, an earlier one waits.
        """
        async with self._cond:
            await self._cond.wait_for(
                lambda: round_index in self._rounds or self._finished or self._aborted
                or (self._current is not None and self._current > round_index))
            self._check_aborted()
            if round_index in self._rounds:
                r = self._rounds[round_index]
                return dataclasses.replace(r.spec, hand_off=r.result is None)
            if self._current is not None and self._current > round_index:
                raise RuntimeError(f"the trainer expects round {round_index} but the driver "
                                   f"began round {self._current}")
            return None

    async def next_step(self, round_index: int, rank: int, step: int,
                        generation: int) -> Optional[StepSlice]:
        """Rank `rank`'s slice of step `step`, or None when the round has no step `step`.

        Every rank gets None at the same step, so all leave the round loop together.
        `generation` is the worker group's, from `attach`: a call left over from a failed
        group must not take a slice meant for its replacement.
        """
        async with self._cond:
            r = self._round(round_index)
            try:
                while step not in r.rows.steps:
                    self._check_generation(generation)
                    if step < r.rows.next_form or r.checkpoint is not None:
                        # Forming more steps would never bring it back (an endless loop).
                        raise RuntimeError(f"round {round_index} step {step} was already "
                                           f"handed to every rank (rank {rank} asks again)")
                    if step > r.rows.next_form or not r.rows.form_next():
                        r.waiting[rank] = step  # reported by `stalled`
                        await self._cond.wait()
            finally:
                r.waiting.pop(rank, None)
            self._check_generation(generation)
            self._cond.notify_all()
            return r.rows.take(step, rank)

    async def log_step(self, round_index: int, metrics: dict[str, Any]) -> None:
        async with self._cond:
            self._round(round_index).metrics.append(dict(metrics))

    async def round_counts(self, round_index: int) -> dict[str, Any]:
        async with self._cond:
            return self._round(round_index).rows.counts()

    async def round_redone(self, round_index: int) -> dict[str, int]:
        """What worker-group restarts made round `round_index` redo: `worker_restarts`, and the
        `steps_redone` and `rows_redone` that every rank had received before them (their
        training was lost with the workers, so they were trained again)."""
        async with self._cond:
            return self._redone(self._round(round_index))

    async def handed_over(self, result: RoundResult) -> None:
        """Rank 0: the round's weights are at the generators (or in the object store);
        `wait_round_done` returns `result`. Its rows stay until `checkpoint_done`."""
        async with self._cond:
            r = self._round(result.round_index)
            r.result = result
            self._sync_targets.pop(result.round_index, None)
            self._cond.notify_all()

    async def checkpoint_done(self, round_index: int, info: dict[str, Any]) -> None:
        """Rank 0: round `round_index`'s checkpoint is complete (`info`: its path and write
        timings); it is the resume point from now on and the round's rows are let go."""
        async with self._cond:
            r = self._round(round_index)
            if r.result is None:
                raise RuntimeError(f"checkpoint_done({round_index}) before the round was "
                                   "handed over")
            r.checkpoint = {**info, **self._redone(r)}
            r.rows.release()
            self._cond.notify_all()

    async def attach(self) -> tuple[int, Optional[tuple[int, str]]]:
        """Called by rank 0 when a worker group starts. Returns (generation, resume): the
        group's generation (see `next_step`) and `(round, checkpoint_path)` of the latest
        complete round checkpoint, or None (start from the base model). Every later round
        begun so far is rewound: the group trains it again from that checkpoint."""
        async with self._cond:
            restart = self._generation > 0  # the first group may attach after begin_round
            self._generation += 1
            done = [t for t, r in self._rounds.items() if r.checkpoint is not None]
            resume = max(done) if done else None
            for t, r in self._rounds.items():
                if (resume is None or t > resume) and r.checkpoint is None:
                    steps, rows = r.rows.rewind()
                    r.metrics.clear()
                    if restart:
                        r.restarts += 1
                        r.steps_redone += steps
                        r.rows_redone += rows
            self._cond.notify_all()
            return self._generation, None if resume is None else (
                resume, self._rounds[resume].checkpoint["path"])

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _redone(r: _Round) -> dict[str, int]:
        return {"worker_restarts": r.restarts, "steps_redone": r.steps_redone,
                "rows_redone": r.rows_redone}

    def _round(self, round_index: int) -> _Round:
        if round_index not in self._rounds:
            raise KeyError(f"round {round_index} has not begun (current: {self._current})")
        return self._rounds[round_index]

    def _targets_gone(self, round_index: int) -> Optional[str]:
        """Why the driver will never name round `round_index`'s broadcast targets, if so."""
        r = self._rounds.get(round_index)
        if r is not None and r.result is not None:
            return f"round {round_index} is already done"
        if self._current is not None and self._current > round_index:
            return f"round {round_index} was skipped: the driver began round {self._current}"
        if self._finished and r is None:
            return f"the stream is finished and round {round_index} was never begun"
        return None

    def _check_aborted(self) -> None:
        if self._aborted is not None:
            raise RuntimeError(f"the trainer run failed: {self._aborted}")

    def _check_generation(self, generation: int) -> None:
        if generation != self._generation:
            raise RuntimeError(f"stale trainer worker (generation {generation}, current "
                               f"{self._generation})")

    def _new_round(self, spec: RoundSpec) -> _Round:
        return _Round(spec, RoundRows(spec.round_index, self._world, self._gbs, self._epochs,
                                      self._seed))


def create_stream(*, world_size: int, global_batch_size: int, buffer_rows: int, epochs: int,
                  max_length: int, selection: Literal["pair", "all"],
                  reference: Literal["frozen", "sampled"], seed: int = 0,
                  name: Optional[str] = None):
    """Start the `TrainStream` as a Ray async actor (no CPU reserved: it only moves rows)."""
    import ray

    return ray.remote(TrainStream).options(num_cpus=0, name=name).remote(
        world_size=world_size, global_batch_size=global_batch_size, buffer_rows=buffer_rows,
        epochs=epochs, max_length=max_length, selection=selection, reference=reference,
        seed=seed)
