"""The round journal: every prompt of a round, judged or failed, kept as a Parquet dataset.

    <run_dir>/rounds/round-<t>/meta.json            what the journal was written under
    <run_dir>/rounds/round-<t>/part-00000.parquet   one chunk of records, in arrival order
    <run_dir>/rounds/round-<t>/part-00001.parquet   ...

One row per prompt (`SCHEMA`): the prompt (id, the user's text, the chat-templated text and its
token ids), the K responses (text, token ids, token counts, finish reasons, the sampled
log-probs when the generators returned them), the judge's (K, K) logits and P, the win rates,
the training rows the prompt produced (as indices into its responses), the weight version that
sampled it, the judge's identity; a failed prompt has `status = "failed"` with the stage and the
reason, and its prompt columns. `datasets.load_dataset("parquet", data_files=".../*.parquet")`
and `pandas.read_parquet(dir)` both read it.

Writing (`JournalWriter`): records are buffered and written as one Parquet file per chunk
(`chunk_prompts` records, or whatever arrived within `flush_s`), to a hidden temporary name
renamed into place, so a crash loses at most the chunk in memory and never damages a file
already written; the driver holds at most one chunk. Reading (`read_round`): every file is
read whole; a file that does not read (truncated, corrupt) or does not have the schema's
columns is an error naming it, or with `on_corrupt="skip"` is reported, renamed to
`*.corrupt` (so it is never read again) and its prompts are simply not in the journal.

Not here: when the journal is written (the pipeline's `record` hook, `cluster.selfplay`), export
for other trainers (`sppo.export`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from sppo.records import Annotated, Failed, Generation, Prompt, TrainRow

__all__ = ["SCHEMA", "JournalError", "JournalWriter", "RoundJournal", "read_round",
           "round_dir", "fingerprint", "check_fingerprint", "rows_of"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

_ROW = pa.struct([("chosen", pa.int32()), ("rejected", pa.int32()),  # -1: no rejected
                  ("chosen_p", pa.float64()), ("rejected_p", pa.float64())])

SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("round", pa.int32()),
    ("status", pa.string()),  # "annotated" | "failed"
    ("stage", pa.string()),  # failed only: "data" | "generate" | "judge" | "select" | "train"
    ("reason", pa.string()),  # failed only
    ("prompt", pa.string()),  # the user's prompt, before the chat template
    ("prompt_text", pa.string()),  # the rendered prompt the policy saw
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("reference", pa.string()),
    ("responses", pa.list_(pa.string())),  # (K,)
    ("response_token_ids", pa.list_(pa.list_(pa.int32()))),  # (K, len)
    ("response_tokens", pa.list_(pa.int32())),  # (K,)
    ("finish_reasons", pa.list_(pa.string())),  # (K,)
    ("logprobs", pa.list_(pa.float64())),  # (K,) summed sampled-token log-probs, or null
    ("logits", pa.list_(pa.list_(pa.float64()))),  # (K, K) judge logits, i shown first
    ("probs", pa.list_(pa.list_(pa.float64()))),  # (K, K) P[i][j], P + P^T = 1
    ("win_rates", pa.list_(pa.float64())),  # (K,)
    ("rows", pa.list_(_ROW)),  # the training rows this prompt produced
    ("weight_version", pa.int32()),
    ("judge", pa.string()),
])


class JournalError(ValueError):
    """A journal that cannot be used as asked (corrupt file, different config, wrong round)."""


def round_dir(run_dir: Union[str, Path], t: int) -> Path:
    return Path(run_dir) / "rounds" / f"round-{t}"


# --------------------------------------------------------------------------- converting


def _index_of(ids: list[int], responses: list[list[int]]) -> int:
    for i, r in enumerate(responses):
        if list(r) == list(ids):
            return i
    raise ValueError("a training row's response is not one of the prompt's responses")


def _prompt_columns(p: Prompt) -> dict:
    return {"prompt_id": p.id, "prompt": p.raw, "prompt_text": p.text,
            "prompt_token_ids": list(p.token_ids), "reference": p.reference}


def to_row(rec: Union[Annotated, Failed], rows: list[TrainRow], *, round: int, judge: str,
           prompt: Optional[Prompt] = None) -> dict:
    """One journal row (a dict of `SCHEMA`'s columns). `prompt`: the failed prompt's record,
    when the caller has it (a `Failed` carries only the id)."""
    out: dict = {name: None for name in SCHEMA.names}
    out.update(round=round, judge=judge)
    if isinstance(rec, Failed):
        if prompt is not None:
            out.update(_prompt_columns(prompt))
        out.update(prompt_id=rec.prompt_id, status="failed", stage=rec.stage, reason=rec.reason)
        return out
    g = rec.generation
    out.update(_prompt_columns(g.prompt))
    out.update(status="annotated", responses=list(g.texts),
               response_token_ids=[list(r) for r in g.response_ids],
               response_tokens=[len(r) for r in g.response_ids],
               finish_reasons=list(g.finish_reasons), logprobs=g.logprobs,
               logits=rec.logits, probs=rec.probs, win_rates=list(rec.win_rates),
               weight_version=g.weight_version,
               rows=[{"chosen": _index_of(r.chosen_ids, g.response_ids),
                      "rejected": _index_of(r.rejected_ids, g.response_ids) if r.is_pair else -1,
                      "chosen_p": r.chosen_p, "rejected_p": r.rejected_p} for r in rows])
    return out


def annotated_of(row: dict) -> Annotated:
    """The `Annotated` record a journal row was written from."""
    prompt = Prompt(id=row["prompt_id"], text=row["prompt_text"],
                    token_ids=tuple(row["prompt_token_ids"]), raw=row["prompt"] or "",
                    reference=row["reference"])
    gen = Generation(prompt=prompt, response_ids=[list(r) for r in row["response_token_ids"]],
                     texts=list(row["responses"]), finish_reasons=list(row["finish_reasons"]),
                     logprobs=None if row["logprobs"] is None else list(row["logprobs"]),
                     weight_version=row["weight_version"])
    return Annotated(generation=gen, logits=[list(x) for x in row["logits"]],
                     probs=[list(x) for x in row["probs"]], win_rates=list(row["win_rates"]))


def rows_of(row: dict) -> list[TrainRow]:
    """The training rows a journal row records, rebuilt exactly (ids, targets, log-probs)."""
    ids, logps = row["response_token_ids"], row["logprobs"]
    out = []
    for r in row["rows"] or []:
        c, j = r["chosen"], r["rejected"]
        out.append(TrainRow(
            prompt_id=row["prompt_id"], prompt_ids=list(row["prompt_token_ids"]),
            chosen_ids=list(ids[c]), chosen_p=r["chosen_p"],
            rejected_ids=list(ids[j]) if j >= 0 else [], rejected_p=r["rejected_p"],
            chosen_ref_logp=None if logps is None else float(logps[c]),
            rejected_ref_logp=None if logps is None or j < 0 else float(logps[j])))
    return out


def failed_of(row: dict) -> Failed:
    return Failed(row["prompt_id"], row["stage"], row["reason"])


# --------------------------------------------------------------------------- config check


def fingerprint(cfg, prompt_ids: Iterable[str]) -> dict:
    """What a round's records depend on, flat ("sampling.k": 4, ...): a journal is reused only
    under the same values. The sampling and judge sections whole (but for the judge's batch
    size), the model and generator backend, the prompts' rendering, the selection rule, and
    `prompt_ids`, the round's shard (which covers the data, its split and `data.max_prompts`)."""
    import dataclasses
    import hashlib

    ids = sorted(prompt_ids)
    d = cfg.data
    out = {"model.path": cfg.model.path, "model.dtype": cfg.model.dtype,
           "generator.backend": cfg.generator.backend,
           "trainer.selection": cfg.trainer.selection}
    out.update({f"sampling.{k}": v for k, v in dataclasses.asdict(cfg.sampling).items()})
    out.update({f"judge.{k}": v for k, v in dataclasses.asdict(cfg.judge).items()
                if k != "batch_size"})
    out.update({f"data.{k}": getattr(d, k) for k in (
        "path", "split", "prompt_column", "messages_column", "id_column", "max_prompt_length",
        "use_chat_template")})
    out["round prompts"] = (f"{len(ids)} ids, sha256 "
                            f"{hashlib.sha256(chr(0).join(ids).encode()).hexdigest()[:16]}")
    return out


def judge_identity(cfg) -> str:
    j = cfg.judge
    return f"{j.backend}:{j.function if j.backend == 'python' else j.model_path}"


def check_fingerprint(directory: Path, expected: dict) -> None:
    """Raise `JournalError` naming every value that differs from the journal's meta.json."""
    meta = json.loads((directory / "meta.json").read_text())
    saved = meta.get("fingerprint", {})
    diff = [f"{k}: journal {saved.get(k)!r}, now {v!r}" for k, v in expected.items()
            if saved.get(k) != v]
    if diff:
        raise JournalError(f"{directory} was written under a different config; resuming it "
                           "would mix two experiments' data in one round. Differs: "
                           + "; ".join(diff) + ". Resume with the journal's values, or move "
                           "the directory away to redo the round.")


# --------------------------------------------------------------------------- writing


class JournalWriter:
    """Appends one round's records to its journal directory in Parquet chunks (see the module
    docstring). Continues after the parts already there (a resumed round)."""

    def __init__(self, directory: Path, *, round: int, judge: str, meta: dict,
                 prompts: dict[str, Prompt], chunk_prompts: int = 64, flush_s: float = 60.0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "meta.json"
        # Kept when parts exist (the caller checked them against `meta`); else (re)written:
        # a run stopped before its first chunk leaves a meta.json that described nothing.
        if not any(self.dir.glob("part-*.parquet")):
            tmp = self.dir / ".meta.json.tmp"
            tmp.write_text(json.dumps({"format": FORMAT_VERSION, "round": round,
                                       "fingerprint": meta}, indent=2))
            tmp.replace(meta_path)
        self.round, self.judge, self.prompts = round, judge, prompts
        self.chunk_prompts, self.flush_s = chunk_prompts, flush_s
        self._buf: list[dict] = []
        self._since = time.monotonic()
        self._seq = 1 + max((int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.parquet")
                             if p.stem.split("-")[1].isdigit()), default=-1)
        self.files: list[Path] = []
        self.written = 0

    def record(self, rec: Union[Annotated, Failed], rows: list[TrainRow]) -> None:
        pid = rec.prompt_id if isinstance(rec, Failed) else rec.prompt.id
        self._buf.append(to_row(rec, rows, round=self.round, judge=self.judge,
                                prompt=self.prompts.get(pid)))
        if len(self._buf) >= self.chunk_prompts or \
                time.monotonic() - self._since >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self._since = time.monotonic()
        if not self._buf:
            return
        path = self.dir / f"part-{self._seq:05d}.parquet"
        tmp = self.dir / f".{path.name}.tmp"  # hidden: no glob of *.parquet reads it
        pq.write_table(pa.Table.from_pylist(self._buf, schema=SCHEMA), tmp)
        tmp.replace(path)  # atomic: a reader sees the whole file or none of it
        self.files.append(path)
        self.written += len(self._buf)
        self._seq += 1
        self._buf = []


# --------------------------------------------------------------------------- reading


@dataclass
class RoundJournal:
    """A round's journal as read: `rows` (dicts of `SCHEMA`'s columns), one per prompt, in
    file order; `files` read; `skipped` files as (path, reason)."""

    directory: Path
    rows: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def ids(self) -> set[str]:
        return {r["prompt_id"] for r in self.rows}

    def counts(self) -> dict[str, int]:
        annotated = sum(r["status"] == "annotated" for r in self.rows)
        return {"prompts": len(self.rows), "annotated": annotated,
                "failed": len(self.rows) - annotated,
                "rows": sum(len(r["rows"] or []) for r in self.rows)}


def read_round(directory: Union[str, Path], *, on_corrupt: Literal["error", "skip"] = "error",
               quarantine: bool = True,
               hint: str = "run.journal_on_corrupt=skip redoes its prompts") -> RoundJournal:
    """Read every chunk of a round's journal (see the module docstring for corrupt files;
    `quarantine=False` skips them without renaming, for a journal read as someone's data).
    A prompt id in two chunks is an error naming both files."""
    directory = Path(directory)
    out = RoundJournal(directory)
    seen: dict[str, Path] = {}
    for path in sorted(directory.glob("part-*.parquet")):
        try:
            table = pq.read_table(path)
            missing = [n for n in SCHEMA.names if n not in table.column_names]
            if missing:
                raise JournalError(f"missing columns {missing}")
            rows = table.select(SCHEMA.names).to_pylist()
        except (pa.ArrowException, OSError, JournalError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if on_corrupt == "error":
                raise JournalError(f"journal chunk {path} does not read ({reason}); {hint}") \
                    from exc
            if quarantine:
                path.replace(path.with_name(path.name + ".corrupt"))
            log.warning("journal chunk %s does not read (%s): skipped%s", path, reason,
                        ", renamed to *.corrupt; its prompts will be redone" if quarantine
                        else "; its prompts are left out")
            out.skipped.append((str(path), reason))
            continue
        for row in rows:
            pid = row["prompt_id"]
            if pid in seen:
                raise JournalError(f"prompt {pid!r} is journaled twice: in {seen[pid]} and "
                                   f"{path}")
            seen[pid] = path
        out.rows.extend(rows)
        out.files.append(path)
    return out
