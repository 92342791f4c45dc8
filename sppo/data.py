"""Prompt data: load a prompt set, render and tokenize it, check every row, split it into rounds.

`load_prompts(cfg, tokenizer)` reads a local `.jsonl` / `.json` / `.parquet` file or a Hugging
Face dataset name, renders each prompt with the tokenizer's chat template, tokenizes it and checks
it. A row that cannot be used (missing or empty prompt, one of only whitespace or invisible
characters, wrong type, malformed messages, too many tokens, duplicate id, unparseable JSONL
line) is a `BadRow` with its index and reason: skipped with a warning (`on_bad_row="skip"`) or,
with `on_bad_row="error"`, a `DataError` listing them all before any work starts. No row is
dropped silently; the counts are in `PromptSet.summary()`.

`split_rounds` shuffles under a seed, holds out evaluation prompts, caps the rest and cuts it into
one disjoint shard per self-play round (the paper uses three equal thirds of UltraFeedback).

JSONL is read here line by line (strict UTF-8) rather than through `datasets`: its JSON reader
reports a truncated or broken line without naming it, and it refuses a column whose type changes
between rows, which is exactly the row this module must report. `.json`, `.parquet` and dataset
names go through `datasets`. Deliberately not here: Ray, tokenizer loading, reference responses.
"""

from __future__ import annotations

import json
import logging
import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from sppo.config import DataConfig
from sppo.records import Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DataError", "BadRow", "PromptSet", "RoundSplit", "load_prompts", "split_rounds"]

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_LISTED = 10  # bad rows listed in warnings and errors; the rest are counted
_TOKENIZE_CHUNK = 1024
_INVISIBLE = {"Cc", "Cf"}  # Unicode control and format characters (NUL, zero-width space, ...)


class DataError(ValueError):
    """The prompt data cannot be used. `bad_rows` holds the rows at fault, if any."""

    def __init__(self, message: str, bad_rows: Optional[list["BadRow"]] = None):
        super().__init__(message)
        self.bad_rows = list(bad_rows or [])


@dataclass(frozen=True)
class BadRow:
    """A row that was not turned into a prompt. `index` counts rows from 0 in file order (blank
    JSONL lines are not rows); `line` is the 1-based line of a JSONL file, else None."""

    index: int
    id: Optional[str]
    reason: str
    line: Optional[int] = None

    def __str__(self) -> str:
        where = f"row {self.index}" + (f" (line {self.line})" if self.line is not None else "")
        who = f" id={self.id!r}" if self.id is not None else ""
        return f"{where}{who}: {self.reason}"


@dataclass
class PromptSet:
    prompts: list[Prompt]
    bad_rows: list[BadRow]
    total_rows: int
    source: str = ""

    def summary(self, max_listed: int = MAX_LISTED) -> str:
        head = (f"{len(self.prompts)} prompts from {self.total_rows} rows of {self.source}; "
                f"{len(self.bad_rows)} bad row(s) skipped")
        return head + _listing(self.bad_rows, max_listed)


@dataclass
class RoundSplit:
    eval: list[Prompt]
    shards: list[list[Prompt]] = field(default_factory=list)  # one per round, disjoint


# --------------------------------------------------------------------------- loading


def load_prompts(cfg: DataConfig, tokenizer: "PreTrainedTokenizerBase") -> PromptSet:
    """Load, render, tokenize and check every row of `cfg.path`. See the module docstring."""
    use_messages = bool(cfg.messages_column)
    if use_messages and not cfg.use_chat_template:
        raise DataError("data.messages_column needs data.use_chat_template=true: chat messages "
                        "can only be rendered with the tokenizer's chat template")
    if cfg.use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.use_chat_template is true but the tokenizer has no chat template; "
                        "set data.use_chat_template=false to use prompts as plain text")

    column = cfg.messages_column if use_messages else cfg.prompt_column
    needed = [c for c in (column, cfg.id_column) if c]
    source, rows, lines, bad = _read_rows(cfg, needed)
    if not rows:
        raise DataError(f"{source}: no rows")
    present = {k for r in rows if r is not None for k in r}
    if present:  # (empty when no JSONL line parsed; those rows are all reported as bad)
        _check_columns(source, needed, present)

    # Render (and collect problems) row by row; tokenize the survivors in batches.
    seen_ids: set[str] = set()
    pending: list[tuple[int, str, str, str]] = []  # (index, id, raw, text)
    for index, row in enumerate(rows):
        if row is None:  # a JSONL line that did not parse; already in `bad`
            continue
        reasons: list[str] = []
        pid = _row_id(row, index, cfg.id_column, reasons)
        if pid is not None:
            if pid in seen_ids:
                reasons.append(f"duplicate id {pid!r} (first seen in an earlier row)")
            seen_ids.add(pid)
        if use_messages:
            rendered = _render_messages(row, column, tokenizer, reasons)
        else:
            rendered = _render_prompt(row, column, tokenizer, cfg.use_chat_template, reasons)
        if reasons:
            bad.append(BadRow(index, pid, "; ".join(reasons), lines[index]))
        else:
            raw, text = rendered
            pending.append((index, pid, raw, text))

    prompts: list[Prompt] = []
    # With a chat template the rendered text already holds the special tokens (BOS etc.);
    # letting the tokenizer add them again would duplicate BOS.
    add_special = not cfg.use_chat_template
    counted = "after the chat template" if cfg.use_chat_template else "as plain text"
    for start in range(0, len(pending), _TOKENIZE_CHUNK):
        chunk = pending[start:start + _TOKENIZE_CHUNK]
        ids = tokenizer([t for _, _, _, t in chunk], add_special_tokens=add_special,
                        return_attention_mask=False)["input_ids"]
        for (index, pid, raw, text), token_ids in zip(chunk, ids):
            if len(token_ids) > cfg.max_prompt_length:
                bad.append(BadRow(index, pid,
                                  f"prompt is {len(token_ids)} tokens {counted}, "
                                  f"over data.max_prompt_length={cfg.max_prompt_length}",
                                  lines[index]))
            else:
                prompts.append(Prompt(id=pid, text=text, token_ids=tuple(token_ids), raw=raw))

    bad.sort(key=lambda b: b.index)
    result = PromptSet(prompts=prompts, bad_rows=bad, total_rows=len(rows), source=source)
    if bad and cfg.on_bad_row == "error":
        raise DataError(f"{source}: {len(bad)} bad row(s) of {len(rows)} "
                        f"(data.on_bad_row=error)" + _listing(bad, MAX_LISTED), bad)
    if not prompts:
        raise DataError(f"{source}: no usable prompts; {result.summary()}", bad)
    if bad:
        log.warning("%s", result.summary())
    return result


def _check_columns(source: str, needed: list[str], present) -> None:
    # A column absent from every row is one mistake (a wrong name), not N bad rows.
    for name in needed:
        if name not in present:
            raise DataError(f"{source}: column {name!r} not found in any row; "
                            f"columns: {sorted(present)}")


def _read_rows(cfg: DataConfig, columns: list[str]) -> tuple[str, list, list, list[BadRow]]:
    """(source name, rows, their 1-based line numbers or None, bad rows found while parsing).
    A row that failed to parse is None in `rows` and already has its BadRow. Rows read through
    `datasets` hold only `columns` (UltraFeedback's rows also carry whole responses)."""
    path = Path(cfg.path).expanduser()
    suffix = path.suffix.lower()
    looks_local = suffix in LOCAL_SUFFIXES or cfg.path.startswith(("/", "./", "../", "~"))
    if looks_local and not path.exists():
        raise DataError(f"data file not found: {cfg.path!r} (looked for {str(path.absolute())!r})")
    if suffix == ".jsonl" and path.is_file():
        return (str(path), *_read_jsonl(path))

    import datasets  # heavy; only when needed

    if suffix in (".json", ".parquet") and path.is_file():
        if suffix == ".json":  # `datasets` reports bad bytes without the file's line
            _decode_utf8(path, path.read_bytes())
        builder, files, name = suffix[1:], {cfg.split: str(path)}, str(path)
    elif path.exists():  # a local dataset directory
        builder, files, name = str(path), None, str(path)
    else:
        builder, files, name = cfg.path, None, f"dataset {cfg.path!r} (no such local path)"
    try:
        ds = datasets.load_dataset(builder, data_files=files, split=cfg.split)
    except Exception as exc:  # datasets raises many unrelated types; name the source instead
        raise DataError(f"cannot load {name} (split {cfg.split!r}): "
                        f"{type(exc).__name__}: {exc}{_root_cause(exc)}") from exc
    _check_columns(name, columns, ds.column_names)
    rows = ds.select_columns(columns).to_list()
    return name, rows, [None] * len(rows), []


def _decode_utf8(path: Path, blob: bytes) -> str:
    try:
        return blob.decode("utf-8-sig")  # strict; a leading BOM is tolerated
    except UnicodeDecodeError as exc:
        line = blob.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 "
                        f"(byte 0x{blob[exc.start]:02x}): {exc.reason}") from None


def _root_cause(exc: BaseException) -> str:
    # `datasets` wraps the useful error (e.g. DatasetGenerationError around a decode error).
    root, seen = exc, {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(root))
    return "" if root is exc else f" (cause: {type(root).__name__}: {root})"


def _read_jsonl(path: Path) -> tuple[list, list, list[BadRow]]:
    blob = path.read_bytes()
    text = _decode_utf8(path, blob)
    # Split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings.
    lines = text.split("\n")
    truncated = not text.endswith("\n")
    rows: list[Optional[dict]] = []
    numbers: list[int] = []
    bad: list[BadRow] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines (and the end of the file) are not rows
        index = len(rows)
        numbers.append(number)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = (" (the last line has no newline: the file looks truncated)"
                    if truncated and number == len(lines) else "")
            value, problem = None, f"invalid JSON ({exc.msg}, column {exc.colno}){hint}"
        else:
            problem = None if isinstance(value, dict) else \
                f"expected a JSON object, got {type(value).__name__}"
        if problem:
            bad.append(BadRow(index, None, problem, number))
            value = None
        rows.append(value)
    return rows, numbers, bad


# --------------------------------------------------------------------------- rows


def _row_id(row: dict, index: int, column: Optional[str], reasons: list[str]) -> Optional[str]:
    if not column:
        return f"row-{index}"
    value = row.get(column)
    if value is None:
        reasons.append(f"id column {column!r} is missing or null")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        reasons.append(f"id column {column!r} must be a string or integer "
                       f"(got {type(value).__name__})")
        return None
    value = str(value)
    if not value.strip():
        reasons.append(f"id column {column!r} is " + ("empty" if not value else "whitespace-only"))
        return None
    return value


def _text_problem(value: Any, what: str) -> Optional[str]:
    if value is None:
        return f"{what} is null"
    if not isinstance(value, str):
        return f"{what} is not a string (got {type(value).__name__}: {_short(value)})"
    if not value:
        return f"{what} is empty"
    if not value.strip():
        return f"{what} is whitespace-only"
    if all(c.isspace() or unicodedata.category(c) in _INVISIBLE for c in value):
        # e.g. zero-width spaces or NULs: the model would see an empty prompt.
        return (f"{what} has no visible characters (only whitespace, control or format "
                f"characters: {_short(value)})")
    return None


def _render_prompt(row: dict, column: str, tokenizer, use_template: bool,
                   reasons: list[str]) -> Optional[tuple[str, str]]:
    if column not in row:
        reasons.append(f"missing column {column!r}")
        return None
    problem = _text_problem(row[column], f"column {column!r}")
    if problem:
        reasons.append(problem)
        return None
    raw = row[column]
    if not use_template:
        return raw, raw
    text = _apply_template(tokenizer, [{"role": "user", "content": raw}], reasons)
    return (raw, text) if text is not None else None


def _render_messages(row: dict, column: str, tokenizer,
                     reasons: list[str]) -> Optional[tuple[str, str]]:
    if column not in row:
        reasons.append(f"missing column {column!r}")
        return None
    messages = row[column]
    if messages is None:
        reasons.append(f"column {column!r} is null")
        return None
    if not isinstance(messages, list):
        reasons.append(f"malformed messages: column {column!r} must be a list of "
                       f"{{role, content}} (got {type(messages).__name__})")
        return None
    if not messages:
        reasons.append(f"malformed messages: column {column!r} is an empty list")
        return None
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            reasons.append(f"malformed messages: message {i} must be {{role: str, content: str}} "
                           f"(got {_short(m)})")
            return None
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "user":
        reasons.append(f"malformed messages: the last message must be from the user "
                       f"(got role {clean[-1]['role']!r})")
        return None
    problem = _text_problem(clean[-1]["content"], "the last user message")
    if problem:
        reasons.append(problem)
        return None
    text = _apply_template(tokenizer, clean, reasons)
    # `raw` (for display and judges) is the final user turn.
    return (clean[-1]["content"], text) if text is not None else None


def _apply_template(tokenizer, messages: list[dict], reasons: list[str]) -> Optional[str]:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja's TemplateError, e.g. "roles must alternate"
        reasons.append(f"malformed messages: the chat template rejected them: {exc}")
        return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _listing(bad: list[BadRow], max_listed: int) -> str:
    if not bad:
        return ""
    lines = [f"\n  {b}" for b in bad[:max_listed]]
    if len(bad) > max_listed:
        lines.append(f"\n  ... and {len(bad) - max_listed} more")
    return "".join(lines)


# --------------------------------------------------------------------------- rounds


def split_rounds(prompts: list[Prompt], rounds: int, seed: int, eval_prompts: int = 0,
                 max_prompts: Optional[int] = None) -> RoundSplit:
    """Shuffle under `seed`; hold out `eval_prompts`; cap the rest at `max_prompts`; cut it into
    `rounds` disjoint shards whose sizes differ by at most one (earlier shards get the extra)."""
    if rounds <= 0:
        raise ValueError(f"rounds must be > 0 (got {rounds})")
    if eval_prompts < 0:
        raise ValueError(f"eval_prompts must be >= 0 (got {eval_prompts})")
    if max_prompts is not None and max_prompts <= 0:
        raise ValueError(f"max_prompts must be > 0 or None (got {max_prompts})")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    held, rest = order[:eval_prompts], order[eval_prompts:]
    if max_prompts is not None:
        rest = rest[:max_prompts]
    if len(rest) < rounds:
        raise ValueError(
            f"{len(prompts)} prompts leave {len(rest)} for training (after {eval_prompts} held "
            f"out for eval, max_prompts={max_prompts}): fewer than the {rounds} rounds")
    base, extra = divmod(len(rest), rounds)
    shards, start = [], 0
    for r in range(rounds):
        size = base + (1 if r < extra else 0)
        shards.append(rest[start:start + size])
        start += size
    return RoundSplit(eval=held, shards=shards)
