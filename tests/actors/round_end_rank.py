"""One rank of tests/actors/test_round_end.py and bench/round_end.py (run as a script: a fresh
process per rank, so its peak memory is its own): builds the sharded model, fills it from a
checkpoint, moves its shards off the checkpoint's values (as a round of training would), then
runs the end of the round and writes what it measured as JSON.

    python tests/actors/round_end_rank.py RANK WORLD PORT MODEL_DIR MODE OUT_DIR [CHUNK_MB [warm]]

MODE: `streamed` (`actors.round_end`: the weights streamed bucket by bucket from the shards to a
hand-off that keeps a checksum per tensor, then the checkpoint written without a full gather)
or `full_gather` (the way it was done before: rank 0 gathers the whole model in fp32, writes
`save_pretrained` from it, every rank writes its training state, and only then does rank 0
hand the weights over). `to_generators_s` is the time from the end of training to the hand-off's
end, `write_s` the checkpoint's. OUT_DIR receives the
checkpoint (`round-0/`), `rank<r>.json` (the figures) and `rank<r>.pt` (its shards).
CHUNK_MB (default 4) is the size of the buckets, of the Hugging Face files and of the training
state's parts. The peak is measured over the end of the round only (`HostMemory` made right
before it): what the end of the round adds to the rank's memory. With `warm`, the modules it
imports are imported before (a run imports them once; tens of MiB of code and tables that are
not what a round costs).
"""

import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from actors.weights import HandOff, HandOffResult  # noqa: E402


def checksum(t: torch.Tensor) -> float:
    """A tensor's float64 sum, 1M elements at a time (a float64 copy of a whole embedding would
    be what the memory measurement sees)."""
    return float(sum(c.double().sum() for c in t.detach().reshape(-1).split(1 << 20)))


class ChecksumHandOff(HandOff):
    """Rank 0's stand-in for the generators: keeps each received tensor's float64 sum and
    shape, and nothing else (what it receives is freed at once, as a sender frees a bucket
    once sent)."""

    def begin(self, layout, round_index):
        self.sums, self.buckets = {}, 0

    def put(self, bucket, tensors):
        self.buckets += 1
        for name, t in tensors.items():
            self.sums[name] = [list(t.shape), str(t.dtype), checksum(t)]

    def end(self):
        return HandOffResult(stats={"buckets": self.buckets}, buckets=None)


def end_of_round(model, model_dir: str, mode: str, out: str, chunk_mb: float, dtype, tokenizer,
                 rank: int, memory=None) -> dict:
    """One end of the round; with `memory` (a `HostMemory`), `peak_to_generators` is its peak
    until the weights were handed over."""
    from transformers import AutoConfig

    from actors.round_end import full_state_dict, stream_weights, write_checkpoint

    t0 = time.perf_counter()
    figures: dict = {"rank": rank, "mode": mode}
    if mode == "streamed":
        hand_off = ChecksumHandOff(bucket_mb=chunk_mb, dtype=str(dtype).removeprefix("torch."))
        result, timings = stream_weights(model, hand_off, round_index=0,
                                         device=torch.device("cpu"))
        figures["to_generators_s"] = time.perf_counter() - t0
        figures["peak_to_generators"] = memory.peak_increase() if memory else None
        figures["hand_off"] = timings
        if rank == 0:
            figures["sums"] = hand_off.sums
        w0 = time.perf_counter()
        figures["write"] = write_checkpoint(model, Path(out) / "round-0", dtype=dtype,
                                            model_path=model_dir, tokenizer=tokenizer,
                                            marker={"round_index": 0},
                                            file_bytes=int(chunk_mb * 2**20),
                                            part_bytes=int(chunk_mb * 2**20))
        figures["write_s"] = time.perf_counter() - w0
    else:  # the old way: the whole model on rank 0, save_pretrained, dcp.save, then hand off
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from transformers import AutoModelForCausalLM

        full = full_state_dict(model)
        figures["gather_s"] = time.perf_counter() - t0
        w0 = time.perf_counter()
        if rank == 0:
            config = AutoConfig.from_pretrained(model_dir)
            with torch.device("meta"):
                shell = AutoModelForCausalLM.from_config(config)
            shell.load_state_dict({k: v.to(dtype) for k, v in full.items()}, assign=True)
            shell.save_pretrained(Path(out) / "round-0" / "hf")
            del shell
        dcp.save(get_model_state_dict(model), checkpoint_id=str(Path(out) / "round-0" / "state"))
        figures["write_s"] = time.perf_counter() - w0
        if rank == 0:  # the hand-off came last
            hand_off = ChecksumHandOff(bucket_mb=chunk_mb,
                                       dtype=str(dtype).removeprefix("torch."))
            hand_off(full, 0)
        dist.barrier()
        figures["to_generators_s"] = time.perf_counter() - t0
        figures["peak_to_generators"] = memory.peak_increase() if memory else None
        del full
    return figures


def main(rank: int, world: int, port: int, model_dir: str, mode: str, out: str,
         chunk_mb: float = 4.0, warm: bool = False) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoTokenizer

    from actors.sharded_model import HostMemory, build_sharded, load_checkpoint
    from sppo.config import TrainerConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    cfg = TrainerConfig(num_workers=world)
    tokenizer = AutoTokenizer.from_pretrained(model_dir) \
        if (Path(model_dir) / "tokenizer_config.json").is_file() else None
    model = build_sharded(model_dir, cfg, mesh, torch.device("cpu"), trainable=True)
    load_checkpoint(model, model_dir)
    with torch.no_grad():  # "trained": every shard moved, by an amount of its own
        for i, p in enumerate(model.parameters()):
            p.to_local().add_(0.01 * (i + 1) * (rank + 1))
    dtype = AutoConfig.from_pretrained(model_dir).dtype or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if warm:  # what the end of the round imports, imported before it is measured
        for module in ("safetensors.torch", "torch.distributed.checkpoint",
                       "torch.distributed.checkpoint._consolidate_hf_safetensors",
                       "torch.distributed.checkpoint.state_dict", "transformers.generation"):
            importlib.import_module(module)
    dist.barrier()
    memory = HostMemory()  # the end of the round from here (its base: the trained model)
    figures = end_of_round(model, model_dir, mode, out, chunk_mb, dtype, tokenizer, rank, memory)
    figures["peak_increase"] = memory.peak_increase()
    local = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    if mode == "streamed":  # the training state reads back into the shards exactly
        from actors.round_end import read_state

        with torch.no_grad():
            for p in model.parameters():
                p.to_local().zero_()
        marker = read_state(model, Path(out) / "round-0")
        figures["state_reads_back"] = marker["round_index"] == 0 and all(
            torch.equal(p.to_local(), local[name]) for name, p in model.named_parameters())
    figures["shard_bytes"] = sum(t.numel() * t.element_size() for t in local.values())
    torch.save(local, Path(out) / f"rank{rank}.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


if __name__ == "__main__":
    r, w, p, d, m, o = sys.argv[1:7]
    main(int(r), int(w), int(p), d, m, o, *(float(x) for x in sys.argv[7:8]),
         warm=sys.argv[8:9] == ["warm"])
