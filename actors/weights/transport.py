"""The collective weight transport: trainer rank 0 to the processes that hold the generators'
weights, bucket by bucket over one gloo (CPU) or NCCL (GPU) group.

- `WeightSender` (trainer rank 0, rank 0 of the group) and
  `WeightReceiver` (one per receiving process: an HF generator's actor, or each vLLM worker,
  i.e. each tensor-parallel rank). One rendezvous store for the job; one group per set of
  receivers, kept from sync to sync until the set changes or a sync fails (`open_group`
  hands out a fresh key prefix each time, so groups never collide). On gloo (CPU) the sender
  sends each bucket to every receiver point to point, so one receiver that stops receiving
  holds up only its own sends: the others finish, and the sender names the failure as soon
  as the caller's `check` reports it instead of waiting out the timeout (a blocked gloo
  broadcast could not be aborted here: `ProcessGroupGloo.abort()` left the sender blocked
  until the timeout, seen on torch 2.13 CPU). On NCCL (GPU) the buckets go out as broadcasts,
  checked between buckets (written against torch's `ProcessGroupNCCL`; not run on a GPU).

Not here: the bucket layout (`layout.py`), the object-store transport (`object_store.py`),
which generators receive and what they do with a bucket (`sender.py`, `actors.generator`, the
engines), gathering FSDP shards (the trainer).
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import torch

from actors.weights.layout import WeightLayout

__all__ = ["GroupAddress", "WeightSender", "WeightReceiver", "ReceiverFailed",
           "resolve_backend"]

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a waiting sender looks at its sends and at the receivers


@dataclass(frozen=True)
class GroupAddress:
    """Where the receivers of one group connect, and the group's shape."""

    host: str
    port: int
    world_size: int  # 1 (the sender) + the receiving processes
    backend: str  # "gloo" | "nccl"
    timeout_s: float
    prefix: str  # key prefix in the store: one per group, so groups never collide

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: dict) -> "GroupAddress":
        return cls(**{k: wire[k] for k in ("host", "port", "world_size", "backend",
                                           "timeout_s", "prefix")})


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


def _make_group(address: GroupAddress, store, rank: int):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=address.timeout_s)
    prefixed = dist.PrefixStore(address.prefix, store)
    if address.backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, address.world_size, timeout)
    if address.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, address.world_size, opts)
    raise ValueError(f"weight_sync.backend must be 'gloo' or 'nccl' (got {address.backend!r})")


def _broadcast_opts():
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts


class ReceiverFailed(RuntimeError):
    """Receivers of a sync failed; `failures` maps each failed group rank to its error."""

    def __init__(self, failures: dict[int, str]):
        self.failures = dict(failures)
        super().__init__("; ".join(f"rank {r}: {e}" for r, e in sorted(self.failures.items())))


class WeightSender:
    """Rank 0 of the weight groups, for the whole job (trainer rank 0 holds one).

        sender = WeightSender("gloo", timeout_s)
        address = sender.open_group(world_size)          # give it to the receivers ...
        sender.connect(address, check)                   # ... while they join with it
        sender.send(named, layout, check)                # every sync, same group
        sender.close()

    `check()` returns `{rank: error}` for receivers known to have failed (the caller learns
    it from their remote calls); the sender stops sending to those ranks, and `connect`
    raises `ReceiverFailed` for them at once instead of waiting out the rendezvous timeout.
    """

    def __init__(self, backend: str = "gloo", timeout_s: float = 600.0,
                 host: Optional[str] = None):
        import torch.distributed as dist

        self.backend, self.timeout_s = backend, timeout_s
        self.host = host or _node_ip()
        self._store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        self._groups = 0
        self._group = None
        self.address: Optional[GroupAddress] = None

    @property
    def connected(self) -> bool:
        return self._group is not None

    def open_group(self, world_size: int) -> GroupAddress:
        """Drop the current group and name a new one of `world_size` ranks."""
        self.close()
        self._groups += 1
        return GroupAddress(self.host, self._store.port, world_size, self.backend,
                            self.timeout_s, f"sppo-weights-{self._groups}")

    def connect(self, address: GroupAddress,
                check: Callable[[], dict[int, str]] = dict) -> None:
        """Join `address` as rank 0; returns once every receiver has joined. Raises
        `ReceiverFailed` as soon as `check` reports a receiver that will never join."""
        box: dict = {}

        def build() -> None:
            try:
                box["group"] = _make_group(address, self._store, 0)
            except BaseException as exc:  # re-raised below in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=build, name="sppo-weights-connect", daemon=True)
        thread.start()
        deadline = time.monotonic() + address.timeout_s
        while thread.is_alive():
            failed = check()
            if failed:  # the rendezvous would wait for them until the timeout
                raise ReceiverFailed(failed)
            if time.monotonic() > deadline:
                raise TimeoutError(f"weight group {address.prefix}: receivers did not join "
                                   f"within {address.timeout_s} s")
            thread.join(_POLL_S)
        if "error" in box:
            raise box["error"]
        self._group, self.address = box["group"], address

    def send(self, named: dict[str, torch.Tensor], layout: WeightLayout,
             check: Callable[[], dict[int, str]] = dict) -> dict:
        """Send every bucket of `named` (in `layout`'s dtypes) to every receiver of the
        group. Returns {"bytes", "seconds", "buckets", "failed": {rank: error}}; ranks that
        failed got no further buckets and the group should be reopened before the next send."""
        if self._group is None or self.address is None:
            raise RuntimeError("send() before connect()")
        device = torch.device("cuda" if self.backend == "nccl" else "cpu")
        t0 = time.perf_counter()
        failed: dict[int, str] = {}
        peers = list(range(1, self.address.world_size))
        for b in range(len(layout.buckets)):
            flat = layout.flat(b, named, device)
            if self.backend == "nccl":
                self._group.broadcast([flat], _broadcast_opts()).wait()
                failed.update(check())
            else:
                pending = {r: self._group.send([flat], r, b) for r in peers if r not in failed}
                self._wait_sends(pending, failed, check)
            if failed and self.backend == "nccl":
                break  # a broadcast needs every rank: nothing more can be sent
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"bytes": layout.total_bytes, "seconds": time.perf_counter() - t0,
                "buckets": len(layout.buckets), "failed": failed}

    def _wait_sends(self, pending: dict, failed: dict[int, str],
                    check: Callable[[], dict[int, str]]) -> None:
        """Wait for one bucket's sends, each in its own daemon thread (a gloo send's
        `is_completed()` stays False until `wait()`), dropping ranks `check` reports failed:
        their waits are left to time out unseen."""
        outcome: dict[int, Optional[str]] = {}
        settled = threading.Event()

        def wait(rank: int, work) -> None:
            try:
                work.wait()
                outcome[rank] = None
            except Exception as exc:  # e.g. the receiver's process died: connection reset
                outcome[rank] = f"{type(exc).__name__}: {exc}"
            if len(outcome) == len(pending):
                settled.set()

        waiting = set(pending)
        for rank, work in pending.items():
            threading.Thread(target=wait, args=(rank, work), daemon=True,
                             name=f"sppo-weights-send-{rank}").start()
        deadline = time.monotonic() + self.timeout_s
        while True:
            settled.wait(_POLL_S)
            for rank in [r for r in waiting if r in outcome]:
                waiting.discard(rank)
                if outcome[rank] is not None:
                    failed.setdefault(rank, outcome[rank])
            if not waiting:
                return
            for rank, error in check().items():
                failed.setdefault(rank, error)
                waiting.discard(rank)
            if waiting and time.monotonic() > deadline:
                for rank in waiting:
                    failed[rank] = f"no progress receiving within {self.timeout_s} s"
                return
            if not waiting:
                return

    def close(self) -> None:
        """Forget the current group (receivers drop theirs when they join the next one)."""
        self._group, self.address = None, None


class WeightReceiver:
    """One receiving process's end of a weight group (rank >= 1)."""

    def __init__(self, address: GroupAddress, rank: int, device: str | torch.device = "cpu"):
        import torch.distributed as dist

        if not 1 <= rank < address.world_size:
            raise ValueError(f"receiver rank {rank} outside 1..{address.world_size - 1}")
        self.address, self.rank, self.device = address, rank, torch.device(device)
        store = dist.TCPStore(address.host, address.port, is_master=False,
                              timeout=datetime.timedelta(seconds=address.timeout_s))
        self._group = _make_group(address, store, rank)

    def receive(self, layout: WeightLayout) -> Iterator[dict[str, torch.Tensor]]:
        """Each bucket as named views of a fresh flat tensor, in layout order."""
        for b in range(len(layout.buckets)):
            flat = torch.empty(layout.bucket_numel(b), dtype=layout.bucket_dtype(b),
                               device=self.device)
            if self.address.backend == "nccl":
                self._group.broadcast([flat], _broadcast_opts()).wait()
            else:
                self._group.recv([flat], 0, b).wait()
            yield layout.split(b, flat)
