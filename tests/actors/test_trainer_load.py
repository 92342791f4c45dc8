"""actors/sharded_model.py on 2 and 4 gloo ranks: no rank holds the full model while loading.

Each rank runs in a fresh process (tests/actors/load_rank.py) and measures its own peak host
memory (`HostMemory`: the kernel's high-water mark of resident memory, reset before the load)
while it builds the sharded model and fills it from a safetensors checkpoint. The model here
is ~33M parameters (124 MiB in float32), so one rank's float32 shard is 31 MiB on 4 ranks and a
full copy 124 MiB: large against the process's own noise (a few MiB), small enough for CI.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


LOAD_RANK = Path(__file__).with_name("load_rank.py")
MiB = 2**20


def _save_model(out: Path, *, tied: bool, vocab: int, hidden: int, layers: int,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=2, tie_word_embeddings=tied,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    return {k: v.float() for k, v in model.state_dict().items()}


def _run_ranks(model_dir: Path, mode: str, tmp: Path, world: int = 2) -> list[dict]:
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
def big_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt-33m")
    # bf16 on disk (as published checkpoints are), float32 master weights in the trainer.
    want = _save_model(out, tied=False, vocab=8192, hidden=512, layers=8, dtype=torch.bfloat16)
    return out, want


def test_sharded_read_no_rank_holds_the_full_model_and_shards_equal_the_checkpoint(
        big_checkpoint, tmp_path):
    model_dir, want = big_checkpoint
    results = _run_ranks(model_dir, "sharded_read", tmp_path, world=4)
    full_bytes = sum(v.numel() * 4 for v in want.values())
    largest = max(v.numel() * 4 for v in want.values())
    for r in results:
        assert r["how"] == "sharded_read"
        # Its float32 shard, plus the file pages of that shard (bf16, mmap: half a shard), plus
        # one float32 tensor of reading buffers and 32 MiB of slack for the process's own
        # allocations: 94 MiB on 4 ranks, under the full model's 124 MiB in float32 (which
        # rank 0 of the broadcast path, below, passes).
        bound = r["shard_bytes"] * 1.5 + largest + 32 * MiB
        assert bound < full_bytes
        assert r["shard_bytes"] == pytest.approx(full_bytes / 4, rel=0.01)
        assert r["peak_increase"] < bound, (
            f"rank {r['rank']}: peak +{r['peak_increase'] / MiB:.0f} MiB while loading, bound "
            f"{bound / MiB:.0f} MiB (shard {r['shard_bytes'] / MiB:.0f} MiB, full model "
            f"{full_bytes / MiB:.0f} MiB)")
    for name, value in want.items():
        assert torch.equal(_full(results, name), value), name  # exact: bf16 -> fp32 is exact
    # The measurement can see a full copy: the broadcast path's rank 0 loads one.
    broadcast = _run_ranks(model_dir, "broadcast_from_rank0", tmp_path, world=2)
    assert broadcast[0]["how"] == "broadcast_from_rank0"
    assert broadcast[0]["peak_increase"] > full_bytes, broadcast[0]["peak_increase"]
    assert broadcast[1]["peak_increase"] < broadcast[1]["shard_bytes"] * 1.5 + largest + 32 * MiB
    for name, value in want.items():
        assert torch.equal(_full(broadcast, name), value), name


@pytest.mark.parametrize("mode", ["sharded_read", "broadcast_from_rank0"])
def test_tied_embeddings_and_rotary_buffers_come_out_right(tmp_path, mode):
    """A tied model (no lm_head in the file) and the rotary caches (non-persistent buffers,
    never in a checkpoint): the sharded model's logits equal `from_pretrained`'s."""
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "tied"
    _save_model(model_dir, tied=True, vocab=256, hidden=128, layers=2, dtype=torch.float32)
    results = _run_ranks(model_dir, mode, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = ref(input_ids=torch.arange(1, 17).reshape(2, 8)).logits
    for r in results:
        assert r["how"] == mode
        torch.testing.assert_close(r["logits"], want, rtol=0, atol=1e-5)
    assert "lm_head.weight" not in results[0]["params"]  # one tensor, shared with the embedding
