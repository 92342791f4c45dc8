"""One rank of tests/actors/test_trainer_load.py (run as a script: a fresh process per rank,
so its peak memory is its own): builds the sharded model, loads the checkpoint, and writes
what it measured as JSON.

    python tests/actors/load_rank.py RANK WORLD PORT MODEL_DIR MODE OUT_JSON

MODE: `sharded_read` or `broadcast_from_rank0` (`actors.sharded_model.load_checkpoint`).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(rank: int, world: int, port: int, model_dir: str, mode: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from actors.sharded_model import HostMemory, build_sharded, load_checkpoint
    from sppo.config import TrainerConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    cfg = TrainerConfig(num_workers=world)
    from transformers import AutoModelForCausalLM  # imported before the baseline
    assert AutoModelForCausalLM
    dist.barrier()
    memory = HostMemory()
    model = build_sharded(model_dir, cfg, mesh, torch.device("cpu"), trainable=True)
    how = load_checkpoint(model, model_dir, sharded_read=mode == "sharded_read")
    peak = memory.peak_increase()
    local = {name: p.to_local().clone() for name, p in model.named_parameters()}
    shard_bytes = sum(t.numel() * t.element_size() for t in local.values())
    with torch.no_grad():  # collective: every rank runs the forward pass
        logits = model(input_ids=torch.arange(1, 17).reshape(2, 8)).logits
    torch.save({"params": local, "logits": logits}, f"{out}.pt")
    Path(out).write_text(json.dumps({"rank": rank, "how": how, "peak_increase": peak,
                                     "shard_bytes": shard_bytes}))
    dist.destroy_process_group()


if __name__ == "__main__":
    r, w, p, d, m, o = sys.argv[1:]
    main(int(r), int(w), int(p), d, m, o)
