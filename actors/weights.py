"""Weight broadcast from trainer rank 0 to the generators, in buckets.

Three transports, one layout:
- `collective` (default): a process group of trainer rank 0 (rank 0) and the N generators
  (ranks 1..N), built from a fresh `TCPStore` hosted by rank 0 for every sync. gloo on CPU,
  NCCL on GPU. It needs no default process group, so it does not disturb Ray Train's.
- `object_store`: rank 0 `ray.put`s each bucket once (dicts of numpy arrays: several times
  faster through the object store than torch tensors); every generator loads the refs.
- `vllm`: vLLM 0.33's own weight-transfer engine (NCCL) drives the generators' engines; see
  `VLLMNativeSender`. GPU only; imported lazily.

Every transport moves whole buckets of about `bucket_mb`, never one parameter per message.
Both sides derive the same `WeightLayout` (names, shapes, dtypes, bucket boundaries) from the
trainer's state dict; the layout travels through the driver as a small object.

Not here: choosing when to sync (the driver), gathering FSDP shards (the trainer does that with
`get_model_state_dict` before calling `send`), and loading into an engine (the generator).
"""

from __future__ import annotations

import datetime
import logging
import socket
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

__all__ = ["CollectiveHandOff", "TensorSpec", "WeightLayout", "SyncAddress", "CollectiveSender", "receive_collective",
           "put_buckets", "bucket_arrays", "resolve_backend"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()


@dataclass(frozen=True)
class WeightLayout:
    """Tensors in send order, grouped into buckets of one dtype and at most ~bucket_bytes."""

    specs: tuple[TensorSpec, ...]
    buckets: tuple[tuple[int, ...], ...]  # indices into `specs`

    @classmethod
    def from_named(cls, named: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> "WeightLayout":
        specs = tuple(TensorSpec(n, tuple(t.shape), str(t.dtype).removeprefix("torch."))
                      for n, t in named)
        limit = max(1, int(bucket_mb * 2**20))
        buckets: list[tuple[int, ...]] = []
        cur: list[int] = []
        cur_bytes = 0
        for i, spec in enumerate(specs):
            if cur and (spec.dtype != specs[cur[0]].dtype or cur_bytes + spec.nbytes > limit):
                buckets.append(tuple(cur))
                cur, cur_bytes = [], 0
            cur.append(i)
            cur_bytes += spec.nbytes
        if cur:
            buckets.append(tuple(cur))
        return cls(specs, tuple(buckets))

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def bucket_numel(self, b: int) -> int:
        return sum(self.specs[i].numel for i in self.buckets[b])

    def split(self, b: int, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of one received flat bucket as named tensors."""
        out, offset = {}, 0
        for i in self.buckets[b]:
            spec = self.specs[i]
            out[spec.name] = flat[offset: offset + spec.numel].view(spec.shape)
            offset += spec.numel
        return out


@dataclass(frozen=True)
class SyncAddress:
    """Where the receivers connect for one sync."""

    host: str
    port: int
    world_size: int  # 1 (sender) + number of receivers
    backend: str  # "gloo" | "nccl"
    timeout_s: float
    group: str = "sppo-weights-1"  # store prefix: one per sync, so keys never collide


def resolve_backend(backend: str, use_gpu: bool) -> str:
    if backend == "auto":
        return "nccl" if use_gpu else "gloo"
    return backend


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # not in a Ray process
        pass
    return socket.gethostbyname(socket.gethostname())


def _make_group(backend: str, store, rank: int, world_size: int, timeout_s: float, group: str):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    # A prefix per sync keeps this group's rendezvous keys apart from earlier groups'.
    prefixed = dist.PrefixStore(group, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    raise ValueError(f"weight_sync.backend must be 'gloo' or 'nccl' (got {backend!r})")


def _broadcast(group, flat: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([flat], opts).wait()


class CollectiveSender:
    """Rank 0's side. `open()` hosts the rendezvous store; `send()` broadcasts the buckets.

    Usage (trainer rank 0):
        sender = CollectiveSender("gloo", timeout_s)
        address = sender.address(world_size)      # give it to the receivers, via the driver
        sender.send(named_tensors, layout, world_size)
    """

    def __init__(self, backend: str = "gloo", timeout_s: float = 600.0, host: Optional[str] = None):
        import torch.distributed as dist

        self.backend = backend
        self.timeout_s = timeout_s
        self.host = host or _node_ip()
        self._store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        self._syncs = 0

    @property
    def port(self) -> int:
        return self._store.port

    def address(self, world_size: int) -> SyncAddress:
        """The address of the next `send`; call once per send."""
        self._syncs += 1
        return SyncAddress(self.host, self.port, world_size, self.backend, self.timeout_s,
                           f"sppo-weights-{self._syncs}")

    def send(self, named: dict[str, torch.Tensor], layout: WeightLayout, world_size: int) -> dict:
        """Broadcast every bucket; returns {"bytes", "seconds", "buckets"}."""
        device = torch.device("cuda") if self.backend == "nccl" else torch.device("cpu")
        t0 = time.perf_counter()
        group = _make_group(self.backend, self._store, 0, world_size, self.timeout_s,
                            f"sppo-weights-{self._syncs}")
        for b, idx in enumerate(layout.buckets):
            parts = [named[layout.specs[i].name].detach().reshape(-1) for i in idx]
            flat = torch.cat(parts).to(device) if len(parts) > 1 else parts[0].to(device)
            _broadcast(group, flat.contiguous())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return {"bytes": layout.total_bytes, "seconds": seconds, "buckets": len(layout.buckets)}


def receive_collective(address: SyncAddress, rank: int, layout: WeightLayout,
                       device: str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """A receiver's side: join the group as `rank` (1..N) and yield each bucket's tensors.

    The yielded tensors are views of a buffer reused for the next bucket of the same size:
    load (copy) them before asking for the next one.
    """
    import torch.distributed as dist

    store = dist.TCPStore(address.host, address.port, is_master=False,
                          timeout=datetime.timedelta(seconds=address.timeout_s))
    group = _make_group(address.backend, store, rank, address.world_size, address.timeout_s,
                        address.group)
    dev = torch.device(device)
    for b in range(len(layout.buckets)):
        spec0 = layout.specs[layout.buckets[b][0]]
        flat = torch.empty(layout.bucket_numel(b), dtype=spec0.torch_dtype, device=dev)
        _broadcast(group, flat)
        yield layout.split(b, flat)


def bucket_arrays(named: dict[str, torch.Tensor], layout: WeightLayout) -> Iterator[dict[str, np.ndarray]]:
    """Buckets as dicts of numpy arrays (bf16 has no numpy dtype: sent as float32)."""
    for idx in layout.buckets:
        out = {}
        for i in idx:
            t = named[layout.specs[i].name].detach().cpu()
            if t.dtype == torch.bfloat16:
                t = t.float()
            out[layout.specs[i].name] = t.numpy()
        yield out


def put_buckets(named: dict[str, torch.Tensor], layout: WeightLayout) -> list:
    """The object-store fallback: one `ray.put` per bucket; returns the ObjectRefs."""
    import ray

    return [ray.put(bucket) for bucket in bucket_arrays(named, layout)]


class CollectiveHandOff:
    """Trainer rank 0's end-of-round hand-off that broadcasts the weights to the generators.

    Passed to `actors.trainer.TrainerRun(hand_off=...)`. On rank 0 it waits for the driver to
    name the round's generators (`TrainStream.set_sync_targets`), hosts a fresh rendezvous,
    starts every generator's `receive_weights_collective` as rank 1..N, broadcasts the buckets
    and waits for all of them. Returns the sync stats, which reach the driver as
    `RoundResult.weights`. The new weight version is `round_index + 1`.
    """

    def __init__(self, stream, *, backend: str = "gloo", bucket_mb: float = 64.0,
                 timeout_s: float = 600.0):
        self.stream, self.backend = stream, backend
        self.bucket_mb, self.timeout_s = bucket_mb, timeout_s

    def __call__(self, full_state_dict: dict[str, torch.Tensor], round_index: int) -> dict:
        import ray

        targets = ray.get(self.stream.sync_targets.remote(round_index))
        layout = WeightLayout.from_named(full_state_dict.items(), self.bucket_mb)
        sender = CollectiveSender(self.backend, self.timeout_s)
        world = 1 + len(targets)
        address = sender.address(world)
        version = round_index + 1
        refs = [g.receive_weights_collective.remote(address, rank, layout, version)
                for rank, g in enumerate(targets, start=1)]
        stats = sender.send(full_state_dict, layout, world) if targets else \
            {"bytes": layout.total_bytes, "seconds": 0.0, "buckets": len(layout.buckets)}
        versions = ray.get(refs, timeout=self.timeout_s)
        stats.update(method="collective", backend=self.backend, receivers=len(targets),
                     versions=versions, version=version)
        log.info("round %d: broadcast %.1f MB in %d buckets to %d generator(s) in %.2fs",
                 round_index, stats["bytes"] / 1e6, stats["buckets"], len(targets),
                 stats["seconds"])
        return stats
