"""The object-store transport: the round's weights put in Ray's object store once, bucket by
bucket, as dicts of numpy arrays (several times faster through the object store than torch
tensors, measured in bench/weights.py), and loaded by each HF generator one bucket at a time.

`ObjectStoreHandOff` is the hand-off of `actors.trainer.TrainerRun` on this path: on trainer
rank 0 it puts each bucket as the trainer gathers it from its shards and returns the ObjectRefs
(`HandOffResult.buckets`); the driver
hands the same refs to every generator (`actors.generator.GeneratorPool.broadcast_buckets`), so
neither the driver nor any generator ever holds more than one bucket beyond its model. The
objects are owned by rank 0's worker process: read them before the trainer run ends (after a
worker-group failure, the round's checkpoint is read instead).

Not here: vLLM generators (their weights live in vLLM's workers: `sender.py`), the layout
(`layout.py`).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import torch

from actors.weights import HandOff, HandOffResult
from actors.weights.layout import WeightLayout

__all__ = ["ObjectStoreHandOff", "bucket_arrays", "put_buckets", "arrays_to_state_dict"]


def bucket_arrays(named: dict[str, torch.Tensor],
                  layout: WeightLayout) -> Iterator[dict[str, np.ndarray]]:
    """Buckets as dicts of numpy arrays in the layout's dtypes (bf16 has no numpy dtype: it
    travels as float32)."""
    for idx in layout.buckets:
        yield _arrays({layout.specs[i].name: named[layout.specs[i].name].detach().to(
            layout.specs[i].torch_dtype) for i in idx})


def put_buckets(named: dict[str, torch.Tensor], layout: WeightLayout) -> list:
    """One `ray.put` per bucket; returns the ObjectRefs in layout order."""
    import ray

    return [ray.put(bucket) for bucket in bucket_arrays(named, layout)]


def arrays_to_state_dict(buckets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Buckets (as `ray.get` returns them: read-only arrays) back into one state dict of
    writable tensors; for tests and tools, never for a model that does not fit one process."""
    return {k: torch.from_numpy(a.copy()) for bucket in buckets for k, a in bucket.items()}


class ObjectStoreHandOff(HandOff):
    """The object-store hand-off on trainer rank 0: each bucket put once as it arrives."""

    def begin(self, layout: WeightLayout, round_index: int) -> None:
        self._layout, self._round = layout, round_index
        self._refs: list = []
        self._t0 = time.perf_counter()

    def put(self, bucket: int, tensors: dict[str, torch.Tensor]) -> None:
        import ray

        self._refs.append(ray.put(_arrays(tensors)))

    def end(self) -> HandOffResult:
        return HandOffResult(stats={"method": "object_store", "version": self._round + 1,
                                    "bytes": self._layout.total_bytes,
                                    "buckets": len(self._refs), "dtype": self.dtype,
                                    "put_s": round(time.perf_counter() - self._t0, 4)},
                             buckets=self._refs)


def _arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """numpy arrays of `tensors` (bf16 has no numpy dtype: it travels as float32)."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        out[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return out
