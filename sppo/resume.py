"""Rounds from journals (`sppo.journal`): a stopped round's records (resume mid-round), and
journaled data to train on (`data.from_journal`).

- `stopped_round_journal`: the journal a driver left in the round it stopped in, checked against
  the resumed config and read, before any actor starts.
- `journal_sources`: `data.from_journal`'s journal directory per round.
- `feed_journal`: journal rows to the trainer, counted as the pipeline counts (`RoundOutcome`).

Not here: writing the journal (`sppo.journal.JournalWriter`, driven by the pipeline's `record`
hook in `cluster.selfplay`), Ray (the caller's `put` hands rows to the trainer stream).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Literal, Optional

from sppo.journal import (JournalError, RoundJournal, annotated_of, check_fingerprint, failed_of,
                          read_round, round_dir, rows_of)
from sppo.records import RoundOutcome, TrainRow
from sppo.rows import rows_from_annotated

__all__ = ["stopped_round_journal", "set_aside_later_rounds", "journal_sources", "feed_journal"]

log = logging.getLogger("sppo.driver")


def stopped_round_journal(run_dir: Path, t: int, expected: dict, *, resume: bool,
                          on_corrupt: Literal["error", "skip"]) -> Optional[RoundJournal]:
    """Round `t`'s journal in `run_dir`, checked against `expected` (`sppo.journal.fingerprint`
    of the resumed config) and read; None when there is none. A journal found by a run that
    was not asked to resume is an error: the run would mix two runs' records."""
    d = round_dir(run_dir, t)
    if not any(d.glob("part-*.parquet")):
        return None
    if not resume:
        raise JournalError(f"{d} holds a journal of an earlier run of {run_dir}: continue it "
                           f"with --resume {run_dir}, or set run.name=... for a new run")
    check_fingerprint(d, expected)
    journal = read_round(d, on_corrupt=on_corrupt)
    log.info("round %d resumes from its journal %s: %d prompts recorded (%d files%s)", t, d,
             len(journal.rows), len(journal.files),
             f", {len(journal.skipped)} skipped" if journal.skipped else "")
    return journal


def set_aside_later_rounds(run_dir: Path, t: int) -> list[Path]:
    """Rename the journals of rounds after `t` (`rounds/round-<u>/`, u > t) to
    `round-<u>.set-aside-<n>/`: a run that resumes at round t trains it again, so what a later
    round sampled from the earlier attempt's weights is not mixed into the new one. Returns
    the new names."""
    moved = []
    for d in sorted(Path(run_dir, "rounds").glob("round-*")):
        index = d.name.removeprefix("round-")
        if not d.is_dir() or not index.isdigit() or int(index) <= t:
            continue
        n = 0
        while (target := d.with_name(f"{d.name}.set-aside-{n}")).exists():
            n += 1
        d.rename(target)
        log.warning("round %s's journal %s was sampled after round %d, which is trained again: "
                    "set aside as %s", index, d, t, target)
        moved.append(target)
    return moved


def journal_sources(path: str, rounds: int) -> list[Path]:
    """`data.from_journal`'s journal directory for each of `rounds` rounds: `path` is a run
    directory (round t reads rounds/round-<t>/) or one round's journal (then `rounds` must be
    1). Raises `JournalError` naming what is missing."""
    src = Path(path).expanduser()
    if (src / "meta.json").is_file() or any(src.glob("part-*.parquet")):
        if rounds != 1:
            raise JournalError(f"data.from_journal {str(src)!r} is one round's journal: set "
                               f"run.rounds=1 (got {rounds}), or give the run directory")
        dirs = [src]
    else:
        dirs = [round_dir(src, t) for t in range(rounds)]
    missing = [str(d) for d in dirs if not any(d.glob("part-*.parquet"))]
    if missing:
        raise JournalError(f"data.from_journal: no journal for {len(missing)} of {rounds} "
                           f"round(s): {missing[:3]} (lower run.rounds, or point data.from_journal "
                           "at a run directory with rounds/round-<t>/)")
    log.info("training on journaled data, no sampling or judging: %s", [str(d) for d in dirs])
    return dirs


def feed_journal(rows: list[dict], *, put: Callable[[list[TrainRow]], None], batch_rows: int,
           selection: Optional[str] = None,
           offer: Callable[[str, list[str], list[float]], None] = lambda *a: None
           ) -> RoundOutcome:
    """Send journal rows' training rows to `put` in batches of about `batch_rows`: the rows
    the journal recorded, or with `selection` rows rebuilt from each prompt's P for it.
    `offer(prompt, responses, win_rates)` sees each judged prompt (the samples table)."""
    t0 = time.perf_counter()
    out = RoundOutcome(prompts=len(rows), from_journal=len(rows))
    batch: list[TrainRow] = []
    for row in rows:
        if row["status"] != "annotated":
            out.failed.append(failed_of(row))
            continue
        made = rows_of(row) if selection is None else \
            rows_from_annotated(annotated_of(row), selection)  # type: ignore[arg-type]
        out.annotated += 1
        out.rows += len(made)
        batch.extend(made)
        offer(row["prompt"] or row["prompt_text"], row["responses"], row["win_rates"])
        if len(batch) >= batch_rows:
            put(batch)
            batch = []
    if batch:
        put(batch)
    out.wall_s = time.perf_counter() - t0
    return out
