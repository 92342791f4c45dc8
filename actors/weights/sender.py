"""Trainer rank 0's end-of-round weight sync to the generators, over one group for the job.

`CollectiveHandOff` is the hand-off (`actors.weights.HandOff`) of `actors.trainer.TrainerRun` on
the collective path. On trainer rank 0, as the trainer gathers the weights from its shards:

1. `begin`: waits for the driver to name the round's generators
   (`TrainStream.set_sync_targets`); makes sure they and rank 0 form the current weight group
   (kept from sync to sync, rebuilt when the set of generators changed, one of them restarted
   and reports no group or another one, or the last sync failed; each generator joins with as
   many ranks as it has receiving processes, `Generator.weight_receivers`: one per vLLM
   worker, i.e. per tensor-parallel rank; one for an HF generator); then every generator
   reports ready through Ray before any bucket is sent (`Generator.prepare_weights`: the
   layout checked against its model, the update opened in every process that holds weights),
   and those ready start receiving (`Generator.receive_weights`);
2. `put`: sends each bucket, in the generators' dtype (`model.dtype`: bf16 on GPU, not the fp32
   master copy), to every generator still in the sync;
3. `end`: waits for every generator to have loaded the sync; returns its figures
   (`HandOffResult.stats`), which reach the driver in `actors.stream.RoundResult.hand_off`.

A generator that fails, at any point (it cannot join, its layout check or update fails, its
actor or engine dies, it stops receiving), is named in the result's `failed` with its own error
as soon as its Ray call fails, or after `timeout_s` without progress; nothing more is sent to
it, the others finish their sync (on gloo; on NCCL, where a broadcast needs every rank, the group
is formed again of the ready generators before the first bucket, and a failure after that
aborts the group on every member: the generators then reload the round's checkpoint), and the
group is rebuilt at the next sync. The trainer never fails because a generator did: the driver
reloads the round's checkpoint into every generator that did not reach the new version
(`GeneratorPool.ensure_synced`).

Not here: the transport (`transport.py`), loading into an engine (`actors.generator` and the
engines), when to sync (the driver).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from actors.weights import HandOff, HandOffResult
from actors.weights.layout import WeightLayout
from actors.weights.transport import ReceiverFailed, WeightSender

__all__ = ["CollectiveHandOff"]

log = logging.getLogger(__name__)


def _actor_id(handle) -> str:
    return handle._actor_id.hex()


def _wait_all(refs: dict, timeout_s: float) -> tuple[dict, dict]:
    """Wait for every ref of `{ref: key}`: ({key: value}, {key: error}) (a ref still pending
    at the timeout counts as failed)."""
    import ray

    if not refs:
        return {}, {}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    ok, failed = {}, {}
    for ref in done:
        try:
            ok[refs[ref]] = ray.get(ref)
        except Exception as exc:
            failed[refs[ref]] = _reason(exc)
    for ref in pending:
        failed[refs[ref]] = f"no answer within {timeout_s} s"
    return ok, failed


def _reason(exc: BaseException) -> str:
    """An error's own message (Ray wraps an actor's exception in a task error whose text
    repeats the traceback)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


class CollectiveHandOff(HandOff):
    """See the module docstring. Picklable: it travels to every trainer worker, and only
    rank 0's copy sends (it opens its store on first use)."""

    def __init__(self, stream, *, backend: str = "gloo", bucket_mb: float = 64.0,
                 timeout_s: float = 600.0, dtype: str = "float32"):
        super().__init__(bucket_mb=bucket_mb, dtype=dtype)
        self.stream, self.backend, self.timeout_s = stream, backend, timeout_s
        self._sender: Optional[WeightSender] = None
        self._members: dict[str, Any] = {}  # actor id -> handle, in rank order
        self._ranks: dict[str, range] = {}  # actor id -> its group ranks

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_sender=None, _members={}, _ranks={})  # a store is per process
        return state

    # ------------------------------------------------------------------ one sync

    def begin(self, layout: WeightLayout, round_index: int) -> None:
        import ray

        self._t0 = time.perf_counter()
        self._layout, self._round, self._version = layout, round_index, round_index + 1
        self._failed: dict[str, str] = {}  # actor id -> its error
        self._targets = ray.get(self.stream.sync_targets.remote(round_index))
        self._send_s = 0.0
        members = self._connect(self._targets, self._failed) if self._targets else {}
        members = self._ready(members)
        if members and len(members) < len(self._members) and self.backend == "nccl":
            # NCCL: a broadcast needs every rank of the group: form it of the ready ones.
            members = self._regroup(members)
        self._receiving = {g.receive_weights.remote(self._version): key
                           for key, g in members.items()}
        # Group ranks nothing is sent to: the members that are not receiving.
        self._skip = {r: self._failed.get(key, "not in this sync")
                      for key, ranks in self._ranks.items() if key not in members
                      for r in ranks}
        self._check = self._checker(self._receiving, self._failed)
        self._device = torch.device("cuda" if self.backend == "nccl" else "cpu")

    def put(self, bucket: int, tensors: dict[str, torch.Tensor]) -> None:
        if not self._receiving or not self._sender.connected:  # nobody left, or aborted
            return
        t0 = time.perf_counter()
        flat = self._layout.flat(bucket, tensors, self._device)
        self._sender.send_bucket(bucket, flat, self._skip, self._check)
        self._send_s += time.perf_counter() - t0

    def end(self) -> HandOffResult:
        versions: dict[str, int] = {}
        if self._receiving:
            t0 = time.perf_counter()
            if self._sender.connected:
                self._sender.flush(self._skip, self._check)
            self._send_s += time.perf_counter() - t0
            ok, errors = _wait_all(self._receiving, self.timeout_s)
            versions = dict(ok)
            for key, error in errors.items():
                self._failed.setdefault(key, error)
        if self._failed:
            # A failed member may hold a half-received bucket, or be gone: rebuild next sync.
            if self._sender is not None and self.backend == "nccl":
                self._sender.abort()  # NCCL: nothing may stay queued on the group
            self._disconnect()
            for key, error in self._failed.items():
                log.warning("round %d: generator %s did not receive the weights: %s",
                            self._round, key, error)
        layout = self._layout
        stats = {"method": "collective", "backend": self.backend, "version": self._version,
                 "bytes": layout.total_bytes, "buckets": len(layout.buckets),
                 "dtype": self.dtype, "receivers": len(self._targets),
                 "send_s": round(self._send_s, 4),
                 "seconds": round(time.perf_counter() - self._t0, 4),
                 "versions": [versions.get(_actor_id(g)) for g in self._targets],
                 "failed": [{"actor": key, "error": error}
                            for key, error in self._failed.items()]}
        log.info("round %d: sent %.1f MB in %d buckets to %d generator(s) in %.2fs (%d failed)",
                 self._round, stats["bytes"] / 1e6, stats["buckets"], len(self._targets),
                 stats["seconds"], len(self._failed))
        return HandOffResult(stats=stats)

    def _ready(self, members: dict[str, Any]) -> dict[str, Any]:
        """The members that report ready for this sync (the others go into `_failed`)."""
        if not members:
            return {}
        ready, errors = _wait_all({g.prepare_weights.remote(
            self._layout.to_wire(), self._version, self.timeout_s): key
            for key, g in members.items()}, self.timeout_s)
        self._failed.update(errors)
        for key in errors:  # one that answers late must not stay prepared: close it
            members[key].cancel_weights.remote()
        return {key: g for key, g in members.items() if key in ready}

    def _regroup(self, members: dict[str, Any]) -> dict[str, Any]:
        """NCCL: a group of `members` only (they stay prepared while they rejoin)."""
        self._disconnect()
        joined = self._connect(list(members.values()), self._failed)
        for key, g in members.items():
            if key not in joined:
                g.cancel_weights.remote()
        return joined

    def _checker(self, refs: dict, failed: dict[str, str]):
        """`check()` for the sender: the group ranks of generators whose call has failed."""
        import ray

        def check() -> dict[int, str]:
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            out: dict[int, str] = {}
            for ref in done:
                key = refs[ref]
                try:
                    ray.get(ref)
                except Exception as exc:
                    failed.setdefault(key, _reason(exc))
                if key in failed:
                    out.update({r: failed[key] for r in self._ranks[key]})
            return out

        return check

    # ------------------------------------------------------------------ the group

    def _connect(self, targets: list, failed: dict[str, str]) -> dict[str, Any]:
        """The live members of a group holding exactly `targets` (minus those that fail to
        join, which go into `failed`); reuses the current group when nothing changed. A
        member that has not joined when `timeout_s` is up counts as failed."""
        members = {_actor_id(g): g for g in targets}
        if self._sender is not None and self._sender.connected and \
                list(members) == list(self._members):
            groups, errors = _wait_all({g.weight_group.remote(): key
                                        for key, g in members.items()}, self.timeout_s)
            if not errors and set(groups.values()) == {self._sender.address.prefix}:
                return members
        if self._sender is None:
            self._sender = WeightSender(self.backend, self.timeout_s)
        while members:
            counts, errors = _wait_all({g.weight_receivers.remote(): key
                                        for key, g in members.items()}, self.timeout_s)
            failed.update(errors)
            members = {key: g for key, g in members.items() if key in counts}
            if not members:
                break
            ranks, next_rank = {}, 1
            for key in members:
                ranks[key] = range(next_rank, next_rank + counts[key])
                next_rank += counts[key]
            address = self._sender.open_group(next_rank)
            self._ranks = ranks
            refs = {g.join_weight_group.remote(address.to_wire(), ranks[key].start): key
                    for key, g in members.items()}
            try:
                self._sender.connect(address, self._checker(refs, failed))
            except ReceiverFailed:  # rebuild without the generators that failed to join
                members = {key: g for key, g in members.items() if key not in failed}
                continue
            except TimeoutError:  # rebuild without those whose join has not returned
                import ray

                done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
                joined = {refs[ref] for ref in done}
                for key in members:
                    if key not in joined:
                        failed.setdefault(key, f"did not join the weight group within "
                                               f"{self.timeout_s:g} s")
                members = {key: g for key, g in members.items() if key in joined}
                continue
            _, errors = _wait_all(refs, self.timeout_s)
            if errors:
                failed.update(errors)
                members = {key: g for key, g in members.items() if key not in errors}
                continue
            self._members = members
            return members
        self._disconnect()
        return {}

    def _disconnect(self) -> None:
        if self._sender is not None:
            self._sender.close()
        self._members, self._ranks = {}, {}

    def close(self) -> None:
        """End of the job: the generators leave the group (best effort: some may be gone)."""
        import ray

        if self._members:
            refs = [g.leave_weight_group.remote() for g in self._members.values()]
            ray.wait(refs, num_returns=len(refs), timeout=min(self.timeout_s, 30.0))
        self._disconnect()
