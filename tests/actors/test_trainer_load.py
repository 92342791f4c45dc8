"""actors/sharded_model.py on 2 and 4 gloo ranks: no rank holds the full model while loading.

Each rank runs in a fresh process (tests/actors/load_rank.py) and measures its own peak host
memory (`HostMemory`: the kernel's high-water mark of resident memory, reset before the load)
while it builds the sharded model and fills it from a safetensors checkpoint.

What is measured is the growth of that peak with the model: the same load of two checkpoints
that differ only in their number of layers (2 and 16: 14M and 57M parameters, 55 and 219 MiB in
float32). The process's own allocations (torch's, the tokenizer's, a reading buffer the size of
the largest tensor: the embedding, the same in both) are the same in both runs and cancel, so
the bound is about the model's bytes alone, whatever the torch version adds: per extra byte of
its float32 shard a rank holds the shard, the bf16 slices `HuggingFaceStorageReader` reads for
it (half a byte) and the file's pages of them (mmap, half a byte, plus the pages the kernel maps
around each slice): measured 2.3-2.55 bytes on torch 2.13, bounded here by 3; a rank holding
the model whole would add at least `world` bytes (4 on 4 ranks: its fp32 copy alone). On torch
2.13 an absolute bound (shard x 1.5 + largest tensor + 32 MiB) passed by 1 MiB and failed on
2.14 by 3 MiB: what the process itself allocates moved.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import save_llama


LOAD_RANK = Path(__file__).with_name("load_rank.py")
MiB = 2**20


def _run_ranks(model_dir: Path, mode: str, tmp: Path, world: int = 2) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(LOAD_RANK), str(rank), str(world), str(port),
                               str(model_dir), mode, str(tmp / f"rank{rank}.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    try:
        for rank, p in enumerate(procs):
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"
    finally:  # a failed rank leaves the others waiting in gloo
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        res.update(torch.load(tmp / f"rank{r}.json.pt"))
    return results


def _full(results: list[dict], name: str) -> torch.Tensor:
    """The parameter put back together from the ranks' dim-0 shards."""
    return torch.cat([r["params"][name] for r in results])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, tuple[Path, dict[str, torch.Tensor]]]:
    """layers -> (checkpoint dir, its weights in float32): bf16 on disk (as published
    checkpoints are), float32 master weights in the trainer; the same vocabulary and width."""
    out = {}
    for layers in (2, 16):
        path = tmp_path_factory.mktemp(f"ckpt-{layers}-layers")
        out[layers] = path, save_llama(path, tied=False, vocab=8192, hidden=512, layers=layers,
                                        dtype=torch.bfloat16)
    return out


def _growth(small: list[dict], large: list[dict], key: str) -> list[int]:
    return [b[key] - a[key] for a, b in zip(small, large)]


def test_sharded_read_no_rank_holds_the_full_model_and_shards_equal_the_checkpoint(
        checkpoints, tmp_path):
    (small_dir, small), (large_dir, large) = checkpoints[2], checkpoints[16]
    extra = sum(v.numel() * 4 for v in large.values()) - sum(v.numel() * 4 for v in small.values())
    world = 4
    runs = [_run_ranks(d, "sharded_read", tmp_path / f"{n}", world=world)
            for n, d in ((2, small_dir), (16, large_dir))]
    assert all(r["how"] == "sharded_read" for run in runs for r in run)
    peak_growth = _growth(*runs, "peak_increase")
    shard_growth = _growth(*runs, "shard_bytes")
    for rank, (grew, shard) in enumerate(zip(peak_growth, shard_growth)):
        assert shard == pytest.approx(extra / world, rel=0.01)
        assert grew < 3.0 * shard, (
            f"rank {rank}: 14 more layers raised the load's peak by {grew / MiB:.0f} MiB, its "
            f"shard by {shard / MiB:.0f} MiB (the whole model by {extra / MiB:.0f} MiB)")
    for name, value in large.items():
        assert torch.equal(_full(runs[1], name), value), name  # exact: bf16 -> fp32 is exact
    # The measurement can see a full copy: the broadcast path's rank 0 loads one, so its peak
    # grows by the whole model's extra bytes; the other rank's by its shard's.
    broadcast = [_run_ranks(d, "broadcast_from_rank0", tmp_path / f"b{n}", world=2)
                 for n, d in ((2, small_dir), (16, large_dir))]
    assert broadcast[1][0]["how"] == "broadcast_from_rank0"
    grew = _growth(*broadcast, "peak_increase")
    shard = _growth(*broadcast, "shard_bytes")
    assert grew[0] > extra, (grew[0] / MiB, extra / MiB)
    assert grew[1] < 1.5 * shard[1], (grew[1] / MiB, shard[1] / MiB)
    for name, value in large.items():
        assert torch.equal(_full(broadcast[1], name), value), name


@pytest.mark.parametrize("mode", ["sharded_read", "broadcast_from_rank0"])
def test_tied_embeddings_and_rotary_buffers_come_out_right(tmp_path, mode):
    """A tied model (no lm_head in the file) and the rotary caches (non-persistent buffers,
    never in a checkpoint): the sharded model's logits equal `from_pretrained`'s."""
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "tied"
    save_llama(model_dir, tied=True, vocab=256, hidden=128, layers=2, dtype=torch.float32)
    results = _run_ranks(model_dir, mode, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = ref(input_ids=torch.arange(1, 17).reshape(2, 8)).logits
    for r in results:
        assert r["how"] == mode
        torch.testing.assert_close(r["logits"], want, rtol=0, atol=1e-5)
    assert "lm_head.weight" not in results[0]["params"]  # one tensor, shared with the embedding
