"""One round's training rows, dealt into optimizer steps: `RoundRows`.

Rows arrive from the producers into a bounded buffer (`add`, bounded by the stream); a step is
formed from `global_batch_size` rows in arrival order and dealt evenly to the ranks (every rank
gets the same number of rows, so FSDP's collectives never hang). When the producers have
finished, the last step takes what is left rounded down to a multiple of the world size; the
remainder (< world size rows) is dropped with reason `remainder_after_even_split`, not carried
over: the rows were sampled from this round's policy, so training on them next round would be
off-policy. With `epochs > 1`, later epochs repeat the rows trained in epoch 0, reshuffled
(seeded). A rewind (a worker group restarted mid-round) puts every row trained so far back in
front of the buffer, so the round trains again from its start, never twice into the same
weights.

Plain Python, no asyncio and no Ray: the stream (`actors.stream.TrainStream`) holds one per round
under its lock and decides when to wait.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field
from typing import Optional

from sppo.records import TrainRow
from sppo.rows import TRUNCATED, deal_to_ranks, fit_row

__all__ = ["RoundRows", "StepSlice", "REMAINDER"]

REMAINDER = "remainder_after_even_split"


@dataclass
class StepSlice:
    """One rank's share of one optimizer step."""

    step: int
    epoch: int
    rows: list[TrainRow]  # this rank's rows, sorted by length; same count on every rank
    global_rows: int  # rows in the step over all ranks (the loss is their mean)


@dataclass
class RoundRows:
    """The rows of one round and the steps formed from them (see the module docstring)."""

    round_index: int
    world: int
    global_batch: int
    epochs: int
    seed: int
    buffer: collections.deque = field(default_factory=collections.deque)  # epoch-0 rows waiting
    producers_done: bool = False
    trained: list[TrainRow] = field(default_factory=list)  # epoch-0 rows placed in steps, in order
    repeat: collections.deque = field(default_factory=collections.deque)  # epoch >= 1 rows waiting
    epoch: int = 0
    next_form: int = 0  # the next step to form
    steps: dict[int, Optional[list[list[TrainRow]]]] = field(default_factory=dict)  # None: end
    fetched: dict[int, set[int]] = field(default_factory=dict)  # step -> ranks that took it
    epoch_of_step: dict[int, int] = field(default_factory=dict)
    rows_put: int = 0
    rows_trained: int = 0  # epoch-0 rows placed in steps
    truncated: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)
    handed_steps: int = 0  # steps every rank has received (since the last rewind)
    handed_rows: int = 0  # rows in those steps, all ranks

    # ------------------------------------------------------------------ producers

    def fit(self, row: TrainRow, max_length: int, *, cut_ok: bool,
            pair: bool) -> Optional[TrainRow]:
        """Count a row put for this round and fit it to `max_length` (`sppo.rows.fit_row`):
        the row to buffer, or None when it was dropped (counted by reason)."""
        self.rows_put += 1
        fitted, note = fit_row(row, max_length, cut_ok=cut_ok, pair=pair)
        if fitted is None:
            self.dropped[note] += 1
            return None
        self.truncated += note == TRUNCATED
        return fitted

    # ------------------------------------------------------------------ steps

    def form_next(self) -> bool:
        """Form step `next_form` if the rows for it are here; False means wait for more."""
        while True:
            source = self.buffer if self.epoch == 0 else self.repeat
            if len(source) >= self.global_batch:
                return self._place([source.popleft() for _ in range(self.global_batch)])
            if self.epoch == 0 and not self.producers_done:
                return False
            keep = len(source) - len(source) % self.world
            if keep:
                rows = [source.popleft() for _ in range(keep)]
                if source:  # epoch 0 only: repeated epochs hold a multiple of the world
                    self.dropped[REMAINDER] += len(source)
                    source.clear()
                return self._place(rows)
            if source:
                self.dropped[REMAINDER] += len(source)
                source.clear()
            if self.epoch + 1 < self.epochs and self.trained:
                self.epoch += 1
                again = list(self.trained)
                random.Random(f"{self.seed}-{self.round_index}-{self.epoch}").shuffle(again)
                self.repeat = collections.deque(again)
                continue
            self.steps[self.next_form] = None  # end of round
            self.next_form += 1
            return True

    def take(self, step: int, rank: int) -> Optional[StepSlice]:
        """Rank `rank`'s slice of formed step `step` (None: the round's end); frees the step's
        rows once every rank has taken its slice."""
        ranks = self.steps[step]
        seen = self.fetched.setdefault(step, set())
        seen.add(rank)
        if len(seen) == self.world:
            del self.steps[step], self.fetched[step]
            if ranks is not None:
                self.handed_steps += 1
                self.handed_rows += self.world * len(ranks[0])
        if ranks is None:
            return None
        return StepSlice(step=step, epoch=self.epoch_of_step[step], rows=ranks[rank],
                         global_rows=self.world * len(ranks[rank]))

    def _place(self, rows: list[TrainRow]) -> bool:
        if self.epoch == 0:
            self.trained.extend(rows)
            self.rows_trained += len(rows)
        self.steps[self.next_form] = deal_to_ranks(rows, self.world)
        self.epoch_of_step[self.next_form] = self.epoch
        self.next_form += 1
        return True

    # ------------------------------------------------------------------ restarts

    def rewind(self) -> tuple[int, int]:
        """Put every row trained so far back in front of the buffer and forget the steps;
        returns the (steps, rows) every rank had received, whose training is redone."""
        redone = self.handed_steps, self.handed_rows
        self.buffer.extendleft(reversed(self.trained))
        self.trained, self.repeat = [], collections.deque()
        self.rows_trained, self.epoch, self.next_form = 0, 0, 0
        self.handed_steps, self.handed_rows = 0, 0
        self.steps.clear(), self.fetched.clear(), self.epoch_of_step.clear()
        self.dropped.pop(REMAINDER, None)
        return redone

    def release(self) -> None:
        """The round is over: the rows are no longer needed."""
        self.trained, self.repeat = [], collections.deque()

    def counts(self) -> dict:
        """`rows_put == rows_trained + carried_over + sum(dropped)` once the round is over
        (`carried_over` is always 0, see the module docstring)."""
        return {"rows_put": self.rows_put, "rows_trained": self.rows_trained,
                "carried_over": 0, "dropped": dict(self.dropped), "truncated": self.truncated,
                "steps": len(self.epoch_of_step)}
