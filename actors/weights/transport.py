"""The collective weight transport: trainer rank 0 to the processes that hold the generators'
weights, bucket by bucket over one gloo (CPU) or NCCL (GPU) group.

- `WeightSender` (trainer rank 0, rank 0 of the group) and `WeightReceiver` (one per receiving
  process: an HF generator's actor, or each vLLM worker, i.e. each tensor-parallel rank). One
  rendezvous store for the job; one group per set of receivers, kept from sync to sync until
  the set changes or a sync fails (`open_group` hands out a fresh key prefix each time, so
  groups never collide).
- Formed eagerly: joining ends with one small collective over the whole group (on NCCL it is
  what connects the communicator, which a directly built `ProcessGroupNCCL` does lazily), so
  a member that cannot join fails the join, within `timeout_s`, not the first bucket.
- Every wait is bounded and none is left to a watchdog: the sender waits for each bucket
  under the caller's `check` (which names receivers whose Ray call failed) and `timeout_s`;
  a receiver waits for each bucket at most `timeout_s` and then aborts its group. On gloo the
  sender sends each bucket to every receiver point to point, so a receiver that stops holds
  up only its own sends (the others finish; a send to a peer that has gone raises at once,
  "Connection closed by peer", and is that peer's failure, not the sender's); a receiver's
  gloo wait takes a timeout (`Work.wait(timedelta)`, run here). On NCCL the buckets go out as broadcasts,
  whose completion is polled (`Work.is_completed()`, which does not block) between checks,
  and a failure aborts the group (`ProcessGroupNCCL.abort()`) so that nothing is left queued:
  written against torch 2.13's API, not run on a GPU. The NCCL-only lines are marked
  `# NCCL:`.

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
from typing import Any, Callable, Iterator, Optional

import torch

from actors.weights.layout import WeightLayout

__all__ = ["GroupAddress", "WeightSender", "WeightReceiver", "ReceiverFailed",
           "resolve_backend"]

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a waiting end looks at its work and at the other end


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


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "nccl" else "cpu")


def _form(group, backend: str) -> None:
    """The group's first collective, one element over every rank (blocks until all have
    joined; on NCCL it connects the communicator, which `ProcessGroupNCCL` does lazily)."""
    if backend == "nccl":  # NCCL: eager connection on this process's device
        group.eager_connect_single_device(_device(backend))
    probe = torch.zeros(1, device=_device(backend))
    _wait(group.allreduce([probe]), backend, timeout_s=None)


def _wait(work, backend: str, timeout_s: Optional[float],
          stop: Callable[[], Optional[str]] = lambda: None) -> None:
    """Wait for one piece of work, at most `timeout_s` (None: the group's own timeout).
    gloo: one `wait(timeout)` (a timed-out gloo wait closes the connection, "Application
    timeout caused pair closure", so it cannot be waited in slices; run here). NCCL: poll
    `is_completed()`, which does not block the CPU, while `stop()` returns None (else raise
    with its reason)."""
    if backend != "nccl":
        if timeout_s is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout_s))
        return
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not work.is_completed():  # NCCL: completion polled
        why = stop()
        if why:
            raise RuntimeError(why)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no progress within {timeout_s} s")
        time.sleep(_POLL_S)


class WeightSender:
    """Rank 0 of the weight groups, for the whole job (trainer rank 0 holds one).

        sender = WeightSender("gloo", timeout_s)
        address = sender.open_group(world_size)          # give it to the receivers ...
        sender.connect(address, check)                   # ... while they join with it
        for each bucket: sender.send_bucket(b, flat, check, failed)   # every sync
        sender.abort() on a failure that leaves the group unusable; sender.close()

    `check()` returns `{rank: error}` for receivers known to have failed (the caller learns
    it from their remote calls): the sender stops sending to those ranks, and `connect`
    raises `ReceiverFailed` for them at once instead of waiting out the rendezvous.
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
        self._in_flight: dict[int, Any] = {}  # rank -> the last bucket's send work (gloo)
        self._last: Any = None  # the last bucket's broadcast work (NCCL)
        self._flats: list[torch.Tensor] = []  # buckets whose sends may still read them

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
        """Join `address` as rank 0 and form the group (its first collective); returns once
        every receiver has joined. Raises `ReceiverFailed` as soon as `check` reports a
        receiver that will never join, `TimeoutError` after `address.timeout_s`."""
        box: dict = {}

        def build() -> None:
            try:
                group = _make_group(address, self._store, 0)
                _form(group, address.backend)
                box["group"] = group
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

    def send_bucket(self, b: int, flat: torch.Tensor, failed: dict[int, str],
                    check: Callable[[], dict[int, str]] = dict) -> None:
        """Send bucket `b` (`flat`, on this backend's device) to every rank not in `failed`,
        after the previous bucket's sends completed (so at most two buckets are in flight or
        being built). Ranks that fail are added to `failed`; on NCCL a failure aborts the group
        (a broadcast needs every rank) and every later bucket is skipped."""
        if self._group is None or self.address is None:
            raise RuntimeError("send_bucket() before connect()")
        self.flush(failed, check)
        if self.backend == "nccl":  # NCCL: one broadcast to the whole group
            if failed:
                return
            self._last = self._group.broadcast([flat], _broadcast_opts())
        else:
            for r in range(1, self.address.world_size):
                if r in failed:
                    continue
                try:
                    self._in_flight[r] = self._group.send([flat], r, b)
                except RuntimeError as exc:  # e.g. "Connection closed by peer": it has gone
                    failed.setdefault(r, f"{type(exc).__name__}: {_first_line(exc)}")
        self._flats.append(flat)

    def flush(self, failed: dict[int, str], check: Callable[[], dict[int, str]] = dict) -> None:
        """Wait for the last bucket's sends (bounded by `timeout_s` and `check`)."""
        if self.backend == "nccl":  # NCCL: one broadcast; a failure aborts the group
            if self._last is not None:
                work, self._last = self._last, None
                try:
                    _wait(work, "nccl", self.timeout_s, lambda: "; ".join(
                        f"rank {r}: {e}" for r, e in check().items()) or None)
                except (RuntimeError, TimeoutError) as exc:
                    for r in range(1, self.address.world_size):
                        failed.setdefault(r, f"the broadcast failed: {exc}")
                    self.abort()
        elif self._in_flight:
            pending, self._in_flight = self._in_flight, {}
            self._wait_sends(pending, failed, check)
        self._flats = self._flats[-1:]  # the one being sent may still be read

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
                outcome[rank] = f"{type(exc).__name__}: {_first_line(exc)}"
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

    def abort(self) -> None:
        """Tear the group down now: nothing queued on it is left to a watchdog, and the
        receivers' pending waits fail (each aborts its own end after at most `timeout_s`)."""
        group, self._group, self.address = self._group, None, None
        self._in_flight, self._last, self._flats = {}, None, []
        if group is not None:
            try:
                group.abort()
            except Exception as exc:  # already broken: nothing more to tear down
                log.debug("weight group abort: %s", exc)

    def close(self) -> None:
        """Forget the current group (receivers drop theirs when they join the next one)."""
        self._group, self.address = None, None
        self._in_flight, self._last, self._flats = {}, None, []


class WeightReceiver:
    """One receiving process's end of a weight group (rank >= 1). Joining forms the group
    (see the module docstring): it returns once every member has joined, or raises."""

    def __init__(self, address: GroupAddress, rank: int, device: str | torch.device = "cpu"):
        import torch.distributed as dist

        if not 1 <= rank < address.world_size:
            raise ValueError(f"receiver rank {rank} outside 1..{address.world_size - 1}")
        self.address, self.rank, self.device = address, rank, torch.device(device)
        store = dist.TCPStore(address.host, address.port, is_master=False,
                              timeout=datetime.timedelta(seconds=address.timeout_s))
        self._group = _make_group(address, store, rank)
        _form(self._group, address.backend)

    def receive(self, layout: WeightLayout) -> Iterator[dict[str, torch.Tensor]]:
        """Each bucket as named views of a fresh flat tensor, in layout order. A bucket that
        does not arrive within `timeout_s` aborts this end of the group and raises."""
        for b in range(len(layout.buckets)):
            flat = torch.empty(layout.bucket_numel(b), dtype=layout.bucket_dtype(b),
                               device=self.device)
            if self.address.backend == "nccl":  # NCCL: the sender's broadcast
                work = self._group.broadcast([flat], _broadcast_opts())
            else:
                work = self._group.recv([flat], 0, b)
            try:
                _wait(work, self.address.backend, self.address.timeout_s)
            except (RuntimeError, TimeoutError) as exc:
                self.abort()
                raise RuntimeError(f"bucket {b} of {len(layout.buckets)} did not arrive: "
                                   f"{_first_line(exc)}") from None
            yield layout.split(b, flat)

    def abort(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            try:
                group.abort()
            except Exception as exc:  # already broken
                log.debug("weight group abort: %s", exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
