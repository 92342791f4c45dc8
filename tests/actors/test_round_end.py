"""actors/round_end.py on 4 gloo ranks: the end of a round never holds the model on one host.

Each rank runs in a fresh process (tests/actors/round_end_rank.py), fills the sharded model from
a bf16 checkpoint, moves every shard (a stand-in for training), and measures its own peak host
memory over the end of the round only (`HostMemory` made right before it): the weights streamed
bucket by bucket to a hand-off that keeps one checksum per tensor (it stands in for the
generators), then the round's checkpoint written (`hf/`, `state/`, `round.json`).

As in tests/actors/test_trainer_load.py, what is bounded is the growth of that peak between two
models that differ only in their number of layers (2 and 16), so the process's own allocations
cancel and the bound is about the model's bytes. Streamed, a rank's peak may grow by a few 4 MiB
buckets, files and parts, never by its own shard (the bound here), let alone the model; the
way it was done before (`full_gather`: rank 0 gathers the whole model in fp32, then
`save_pretrained`) grows rank 0's peak by more than the whole model's extra fp32 bytes, which
the same measurement sees (so the bound can fail).

The outputs are checked against the ranks' shards: every checksum rank 0 handed over, the
Hugging Face directory through `from_pretrained` (exactly the shards cast to bf16), and the
training state read back into zeroed shards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port, save_llama
from round_end_rank import checksum

RANK = Path(__file__).with_name("round_end_rank.py")
MiB = 2**20
CHUNK_MB = 4  # buckets, Hugging Face files and training-state parts


def _start(model_dir: Path, mode: str, out: Path, world: int) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return [subprocess.Popen([sys.executable, str(RANK), str(rank), str(world), str(port),
                              str(model_dir), mode, str(out), str(CHUNK_MB)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in range(world)]


def _finish(procs: list[subprocess.Popen], out: Path) -> list[dict]:
    try:
        for rank, p in enumerate(procs):
            log, _ = p.communicate(timeout=600)
            assert p.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"
    finally:  # a failed rank leaves the others waiting in gloo
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(len(procs))]


def _runs(checkpoints, mode: str, tmp: Path, world: int) -> dict[int, list[dict]]:
    """Both models at once (each process's peak is its own)."""
    started = {n: _start(d, mode, tmp / f"{mode}-{n}", world) for n, (d, _) in checkpoints.items()}
    return {n: _finish(procs, tmp / f"{mode}-{n}") for n, procs in started.items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, tuple[Path, dict[str, torch.Tensor]]]:
    out = {}
    for layers in (2, 16):
        path = tmp_path_factory.mktemp(f"round-end-{layers}-layers")
        out[layers] = path, save_llama(path, tied=False, vocab=8192, hidden=512, layers=layers,
                                       dtype=torch.bfloat16)
    return out


def _growth(runs: dict[int, list[dict]], key: str) -> list[int]:
    return [b[key] - a[key] for a, b in zip(runs[2], runs[16])]


def test_streamed_end_of_round_holds_buckets_not_the_model(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    world = 4
    extra = sum(v.numel() * 4 for v in checkpoints[16][1].values()) - \
        sum(v.numel() * 4 for v in checkpoints[2][1].values())
    runs = _runs(checkpoints, "streamed", tmp_path, world)
    peak, shard = _growth(runs, "peak_increase"), _growth(runs, "shard_bytes")
    for rank in range(world):
        assert shard[rank] == pytest.approx(extra / world, rel=0.01)
        assert peak[rank] < shard[rank], (
            f"rank {rank}: 14 more layers raised the end of the round's peak by "
            f"{peak[rank] / MiB:.0f} MiB, its fp32 shard by {shard[rank] / MiB:.0f} MiB and the "
            f"model by {extra / MiB:.0f} MiB (buckets of {CHUNK_MB} MiB)")
        assert runs[16][rank]["state_reads_back"]

    out = tmp_path / "streamed-16"
    shards = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    full = {name: torch.cat([s[name] for s in shards]) for name in shards[0]}
    sums = runs[16][0]["sums"]
    assert set(sums) == set(full)
    for name, value in full.items():
        shape, dtype, total = sums[name]
        assert (shape, dtype) == (list(value.shape), "torch.bfloat16"), name
        assert total == checksum(value.to(torch.bfloat16)), name
    loaded = AutoModelForCausalLM.from_pretrained(out / "round-0" / "hf")
    assert loaded.dtype == torch.bfloat16
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, full[name].to(torch.bfloat16)), name
    assert json.loads((out / "round-0" / "round.json").read_text())["round_index"] == 0

    # The same measurement sees the old way's full copy on rank 0 (2 ranks suffice).
    old = _runs(checkpoints, "full_gather", tmp_path, world=2)
    grew = _growth(old, "peak_increase")
    assert grew[0] > extra, (grew[0] / MiB, extra / MiB)
