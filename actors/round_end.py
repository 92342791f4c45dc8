"""The end of a round on the trainer ranks, at any model size: the weights streamed from the
FSDP2 shards to the generators, then the round's checkpoint written without one host ever
holding the model.

- `stream_weights(model, hand_off)`: every rank gathers one bucket of parameters at a time from
  the shards (`DTensor.full_tensor()` of each, cast to the generators' dtype first, on the
  training device), rank 0 hands the bucket to `hand_off` (`actors.weights.HandOff`: the
  collective sync or the object store) and every rank frees it. No rank holds more than its
  shards plus about two buckets (the one gathered and the one still being sent); on a GPU the
  buckets never pass through host memory.
- `write_checkpoint(model, out, ...)`: `out/hf`, a Hugging Face directory in the model's dtype
  (`AutoModelForCausalLM.from_pretrained` loads it): each rank writes its own shards of the
  tensors, one output file of about `file_bytes` at a time (torch.distributed.checkpoint's
  `HuggingFaceStorageWriter`), then each rank stitches its share of the output files
  (`consolidate_safetensors_files_on_every_rank`: one tensor in memory at a time);
  `out/state`, the fp32 training state, sharded (`torch.distributed.checkpoint`, in parts of
  at most `part_bytes`: its writer keeps a file's tensors until the file is written, so a
  rank holds a part's share of them, never its whole shard twice); then `out/round.json`,
  last, after every rank finished: a round directory without it is incomplete and is never
  resumed from.
- `read_state(model, out)`: the training state back into the shards.
- `full_state_dict(model)`: the way it was done before (rank 0 gathers the whole model in fp32
  on the host), kept only to measure against (bench/round_end.py, tests/actors/test_round_end.py).

Every function here is collective: all ranks call it together. Written for one host or a shared
filesystem (every rank writes into `out`, and consolidating reads the other ranks' shards).
No Ray: the tests run it on plain gloo process groups. The CUDA lines (the buckets cast and
gathered on the device) are written against torch 2.13's DTensor and not run on a GPU.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from actors.sharded_model import tied_names
from actors.weights import HandOff, HandOffResult
from sppo.config import CHECKPOINT_CHUNK_BYTES

__all__ = ["stream_weights", "write_checkpoint", "read_state", "full_state_dict",
           "checkpoint_complete", "checkpoint_dtype", "ROUND_MARKER"]

ROUND_MARKER = "round.json"  # written last: the round's checkpoint is complete


def _full(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The whole tensor on every rank, in `dtype` if it is floating point (cast on its device
    before the gather, so the gather moves the smaller dtype)."""
    if t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def _all_ok(ok: bool, device: torch.device) -> bool:
    """Collective: whether every rank's `ok` holds (so that all ranks raise together)."""
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def stream_weights(model: torch.nn.Module, hand_off: Optional[HandOff], *, round_index: int,
                   device: torch.device) -> tuple[Optional[HandOffResult], dict[str, Any]]:
    """Gather the model bucket by bucket and give each bucket to `hand_off` on rank 0 (other
    ranks pass the same hand-off or None: only its `layout` is used there). Returns rank 0's
    `HandOffResult` (None elsewhere) and the timings: `gather_s` (in the gathers), `send_s`
    (the rest: the hand-off's own work, its begin and end included, as rank 0 saw it),
    `hand_off_s` (all of it), bytes and buckets. A hand-off
    that raises on rank 0 does not leave the other ranks in a gather: the error is raised on
    every rank after the last bucket."""
    rank0 = dist.get_rank() == 0
    skip = tied_names(model)
    state = {n: t for n, t in model.state_dict().items() if n not in skip}
    layout = hand_off.layout(state.items())
    t0 = time.perf_counter()
    gather_s = 0.0
    error: Optional[BaseException] = None
    if rank0:
        try:
            hand_off.begin(layout, round_index)
        except Exception as exc:  # e.g. the driver named no targets; reported below
            error = exc
    for b, idx in enumerate(layout.buckets):
        g0 = time.perf_counter()
        tensors = {layout.specs[i].name: _full(state[layout.specs[i].name],
                                               layout.specs[i].torch_dtype) for i in idx}
        gather_s += time.perf_counter() - g0
        if rank0 and error is None:
            try:
                hand_off.put(b, tensors)
            except Exception as exc:
                error = exc
        del tensors
    result = None
    if rank0 and error is None:
        try:
            result = hand_off.end()
        except Exception as exc:
            error = exc
    if not _all_ok(error is None, device):
        raise RuntimeError(f"the weights' hand-off failed on rank 0: {error!r}"
                           if error else "the weights' hand-off failed on rank 0")
    total = time.perf_counter() - t0
    return result, {"gather_s": round(gather_s, 4), "send_s": round(total - gather_s, 4),
                    "hand_off_s": round(total, 4),
                    "bytes": layout.total_bytes, "buckets": len(layout.buckets)}


# --------------------------------------------------------------------------- the checkpoint


def _file_index(sizes: list[tuple[str, int]], files: int) -> dict[str, int]:
    """Names (in order) to output files 1..`files` of about equal bytes, contiguous, none
    empty."""
    total = sum(n for _, n in sizes) or 1
    out, cum = {}, 0
    for i, (name, nbytes) in enumerate(sizes):
        index = min(files, 1 + int(files * cum / total))
        index = max(index, files - (len(sizes) - i) + 1)  # leave one name per later file
        out[name] = index
        cum += nbytes
    return out


def _parts(sizes: list[tuple[str, int]], part_bytes: int) -> list[list[str]]:
    """Names (in order) in consecutive parts of at most `part_bytes` (a larger tensor alone)."""
    parts: list[list[str]] = []
    size = 0
    for name, nbytes in sizes:
        if not parts or (parts[-1] and size + nbytes > part_bytes):
            parts.append([])
            size = 0
        parts[-1].append(name)
        size += nbytes
    return parts


def _nbytes(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> int:
    d = dtype if dtype is not None and t.is_floating_point() else t.dtype
    return t.numel() * torch.empty((), dtype=d).element_size()


def checkpoint_dtype(model_path: str) -> torch.dtype:
    """The base model's dtype (its config's), float32 when it names none: the round
    checkpoints keep it whatever the training precision."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_path), "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def checkpoint_complete(path: Path) -> bool:
    """Whether the round directory `path` holds a complete checkpoint (its marker)."""
    return (Path(path) / ROUND_MARKER).is_file()


def write_checkpoint(model: torch.nn.Module, out: Path, *, dtype: torch.dtype,
                     model_path: str, tokenizer: Any, marker: dict[str, Any],
                     group: Optional[Any] = None, file_bytes: int = CHECKPOINT_CHUNK_BYTES,
                     part_bytes: int = CHECKPOINT_CHUNK_BYTES) -> dict[str, Any]:
    """Write the round's checkpoint into `out` (see the module docstring): `out/hf` in
    `dtype` with the base model's config (its dtype set to `dtype`), generation config and
    `tokenizer` (None: none); `out/state` (fp32, sharded); `out/round.json` (`marker`, by rank 0, last).
    `group` carries the writers' collectives (a gloo group beside an NCCL one). Returns the
    timings `hf_write_s`, `dcp_write_s`, and `storage_copy_s` (0: written in place)."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint._consolidate_hf_safetensors import \
        consolidate_safetensors_files_on_every_rank
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from transformers import AutoConfig, GenerationConfig

    out = Path(out)
    rank0 = dist.get_rank(group) == 0
    if rank0 and out.exists():  # an incomplete one from a failed attempt: start afresh
        shutil.rmtree(out)
    dist.barrier(group)
    t0 = time.perf_counter()
    skip = tied_names(model)
    shards_of = {n: t for n, t in model.state_dict().items() if n not in skip}
    sizes = [(n, _nbytes(t, dtype)) for n, t in shards_of.items()]
    files = min(len(sizes), max(1, math.ceil(sum(b for _, b in sizes) / file_bytes)))
    mapping = _file_index(sizes, files)
    shards = out / "hf" / ".shards"
    # One save per output file: each rank casts and holds that file's share only.
    for index in sorted(set(mapping.values())):
        part = {n: (t.to(dtype) if t.is_floating_point() else t)
                for n, t in shards_of.items() if mapping[n] == index}
        dcp_save(part, storage_writer=HuggingFaceStorageWriter(
            str(shards), fqn_to_index_mapping=mapping, save_distributed=True),
            process_group=group)
        del part
    consolidate_safetensors_files_on_every_rank(str(shards), str(out / "hf"), mapping,
                                                process_group=group)
    if rank0:
        shutil.rmtree(shards)
        config = AutoConfig.from_pretrained(model_path)
        config.dtype = dtype
        config.save_pretrained(out / "hf")
        try:
            GenerationConfig.from_pretrained(model_path).save_pretrained(out / "hf")
        except OSError:  # the base model has no generation_config.json
            pass
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "hf")
    hf_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    state = get_model_state_dict(model)
    parts = _parts([(n, _nbytes(t)) for n, t in state.items()], part_bytes)
    for k, names in enumerate(parts):
        dcp_save({n: state[n] for n in names}, checkpoint_id=str(out / "state" / f"part-{k:04d}"),
                 process_group=group)
    if rank0:
        (out / "state" / "parts.json").write_text(json.dumps(parts))
    dcp_s = time.perf_counter() - t1
    timings = {"hf_write_s": round(hf_s, 4), "dcp_write_s": round(dcp_s, 4),
               "storage_copy_s": 0.0}
    dist.barrier(group)  # every rank's files are in place
    if rank0:
        tmp = out / f".{ROUND_MARKER}.tmp"
        tmp.write_text(json.dumps({**marker, "write": timings}))
        tmp.replace(out / ROUND_MARKER)
    return timings


def read_state(model: torch.nn.Module, out: Path, group: Optional[Any] = None) -> dict:
    """Load `out/state` (written by `write_checkpoint`, or by an older version in one piece)
    into the model's shards; returns `out/round.json`."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    out = Path(out)
    state = get_model_state_dict(model)
    listing = out / "state" / "parts.json"
    if listing.is_file():
        for k, names in enumerate(json.loads(listing.read_text())):
            dcp_load({n: state[n] for n in names},
                     checkpoint_id=str(out / "state" / f"part-{k:04d}"), process_group=group)
    else:
        dcp_load(state, checkpoint_id=str(out / "state"), process_group=group)
    set_model_state_dict(model, state)
    return json.loads((out / ROUND_MARKER).read_text())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The old way, for comparison only: rank 0 gets the whole model in fp32 on the host (the
    other ranks an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
