"""`python -m sppo.export RUN_DIR [--round T] [--out DIR] [--format parquet|jsonl]`: a run's
judged data as preference pairs for other trainers.

Per journaled round (`sppo.journal`) one file `<out>/round-<t>.<format>` (default out:
`<RUN_DIR>/export`), one row per judged prompt, in the column layout of TRL's DPO-style
trainers ("standard" format: `prompt`, `chosen`, `rejected` as text) plus the SPPO columns:

    prompt              the chat-templated prompt the policy was sampled with
    chosen, rejected    the responses of highest and lowest win rate (first of equals), the
                        pair SPPO's `trainer.selection: pair` trains on
    chosen_win_rate, rejected_win_rate   their win rates p_i = mean_j P[i][j]
    prompt_raw, prompt_id, round, weight_version, chosen_index, rejected_index,
    responses, win_rates, probs           all K responses, their win rates and the K x K P

A prompt whose K responses all have the same win rate has no pair and is counted, not written;
failed prompts are counted. `datasets.load_dataset("parquet", data_files=...)` reads the files.

Not here: the journal's format and reading (`sppo.journal`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from sppo.journal import JournalError, read_round

__all__ = ["export_round", "pairs_of", "main"]


def pairs_of(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """The export rows of a round's journal rows, and counts (pairs, failed, no_pair)."""
    out, counts = [], {"prompts": len(rows), "pairs": 0, "failed": 0, "no_pair": 0}
    for r in rows:
        if r["status"] != "annotated":
            counts["failed"] += 1
            continue
        p = r["win_rates"]
        c = max(range(len(p)), key=p.__getitem__)  # first of equals, as sppo.rows does
        j = min(range(len(p)), key=p.__getitem__)
        if p[c] == p[j]:
            counts["no_pair"] += 1
            continue
        out.append({"prompt": r["prompt_text"], "chosen": r["responses"][c],
                    "rejected": r["responses"][j], "chosen_win_rate": p[c],
                    "rejected_win_rate": p[j], "prompt_raw": r["prompt"],
                    "prompt_id": r["prompt_id"], "round": r["round"],
                    "weight_version": r["weight_version"], "chosen_index": c,
                    "rejected_index": j, "responses": r["responses"], "win_rates": p,
                    "probs": r["probs"]})
    counts["pairs"] = len(out)
    return out, counts


def export_round(journal_dir: Path, out: Path, fmt: str = "parquet", *,
                 skip_corrupt: bool = False) -> dict[str, int]:
    journal = read_round(journal_dir, on_corrupt="skip" if skip_corrupt else "error",
                         quarantine=False, hint="--skip-corrupt leaves it out")
    rows, counts = pairs_of(journal.rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({}), out)
    else:
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts["skipped_files"] = len(journal.skipped)
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sppo.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--round", type=int, default=None, help="one round (default: every round)")
    p.add_argument("--out", type=Path, default=None, help="output directory (RUN_DIR/export)")
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out chunks that do not read (reported) instead of stopping")
    args = p.parse_args(argv)
    rounds_dir = args.run_dir / "rounds"
    found = sorted((int(d.name.split("-")[1]), d) for d in rounds_dir.glob("round-*")
                   if d.is_dir() and d.name.split("-")[1].isdigit()) \
        if rounds_dir.is_dir() else []
    if args.round is not None:
        found = [(t, d) for t, d in found if t == args.round]
    if not found:
        what = f"round {args.round}" if args.round is not None else "any round"
        print(f"error: no journal for {what} under {rounds_dir}", file=sys.stderr)
        return 2
    out_dir = args.out or args.run_dir / "export"
    for t, d in found:
        path = out_dir / f"round-{t}.{args.format}"
        try:
            counts = export_round(d, path, args.format, skip_corrupt=args.skip_corrupt)
        except JournalError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"round {t}: {counts['pairs']} pairs of {counts['prompts']} prompts "
              f"({counts['failed']} failed, {counts['no_pair']} without a preference"
              + (f", {counts['skipped_files']} unreadable chunk(s) left out"
                 if counts["skipped_files"] else "") + f") -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
