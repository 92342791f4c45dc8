"""Trainer rank 0's end-of-round weight sync to the generators, over one group for the job.

`CollectiveHandOff` is the `hand_off` of `actors.trainer.TrainerRun` on the collective path. On
trainer rank 0, with the gathered full state dict, it:

1. waits for the driver to name the round's generators (`TrainStream.set_sync_targets`);
2. makes sure they and rank 0 form the current weight group: a group is kept from sync to
   sync and rebuilt only when the set of generators changed, one of them restarted (it
   reports no group or another one), or the last sync failed. Each generator joins with as
   many ranks as it has receiving processes (`Generator.weight_receivers`: one per vLLM
   worker, i.e. per tensor-parallel rank; one for an HF generator);
3. sends the weights bucket by bucket in the generators' dtype (`model.dtype`: bf16 on GPU,
   not the fp32 master copy) while every generator receives them in place
   (`Generator.receive_weights`: vLLM's weight-transfer protocol into each worker, or the HF
   model in the actor's process);
4. returns the sync's figures (`HandOffResult.stats`), which reach the driver in
   `actors.stream.RoundResult.hand_off`.

A generator that fails (its call raises, or its actor dies) is named in the result's `failed`
with its error as soon as its call fails: the sender stops sending to it and does not wait out
the timeout, the other generators finish their sync, and the group is rebuilt at the next sync.
The trainer does not fail because a generator did: the driver reloads the round's checkpoint
into every generator that did not reach the new version (`GeneratorPool.ensure_synced`), and a
generator that cannot load the weights at all fails the driver there, with its error.

Not here: the transport (`transport.py`), loading into an engine (`actors.generator` and the
engines), when to sync (the driver).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from actors.weights import HandOffResult
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


class CollectiveHandOff:
    """See the module docstring. Picklable: it travels to every trainer worker, and only
    rank 0's copy is ever called (it opens its store on first use)."""

    def __init__(self, stream, *, backend: str = "gloo", bucket_mb: float = 64.0,
                 timeout_s: float = 600.0, dtype: str = "float32"):
        self.stream, self.backend = stream, backend
        self.bucket_mb, self.timeout_s, self.dtype = bucket_mb, timeout_s, dtype
        self._sender: Optional[WeightSender] = None
        self._members: dict[str, Any] = {}  # actor id -> handle, in rank order
        self._ranks: dict[str, range] = {}  # actor id -> its group ranks

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_sender=None, _members={}, _ranks={})  # a store is per process
        return state

    def __call__(self, full_state_dict: dict[str, torch.Tensor],
                 round_index: int) -> HandOffResult:
        import ray

        targets = ray.get(self.stream.sync_targets.remote(round_index))
        version = round_index + 1
        layout = WeightLayout.from_named(full_state_dict.items(), self.bucket_mb,
                                         dtype=getattr(torch, self.dtype))
        t0 = time.perf_counter()
        failed: dict[str, str] = {}
        members = self._connect(targets, failed) if targets else {}
        sent: dict = {"seconds": 0.0}
        versions: dict[str, int] = {}
        if members:
            refs = {g.receive_weights.remote(layout.to_wire(), version): key
                    for key, g in members.items()}
            sent = self._sender.send(full_state_dict, layout, self._checker(refs, failed))
            ok, errors = _wait_all(refs, self.timeout_s)
            versions = {key: v for key, v in ok.items()}
            for key, error in errors.items():
                failed.setdefault(key, error)
        if failed:
            self._disconnect()  # a failed member may hold a half-received bucket: rebuild
            for key, error in failed.items():
                log.warning("round %d: generator %s did not receive the weights: %s",
                            round_index, key, error)
        stats = {"method": "collective", "backend": self.backend, "version": version,
                 "bytes": layout.total_bytes, "buckets": len(layout.buckets),
                 "dtype": self.dtype, "receivers": len(targets),
                 "send_s": round(sent["seconds"], 4),
                 "seconds": round(time.perf_counter() - t0, 4),
                 "versions": [versions.get(_actor_id(g)) for g in targets],
                 "failed": [{"actor": key, "error": error} for key, error in failed.items()]}
        log.info("round %d: sent %.1f MB in %d buckets to %d generator(s) in %.2fs (%d failed)",
                 round_index, stats["bytes"] / 1e6, stats["buckets"], len(targets),
                 stats["seconds"], len(failed))
        return HandOffResult(stats=stats)

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
        join, which go into `failed`); reuses the current group when nothing changed."""
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
