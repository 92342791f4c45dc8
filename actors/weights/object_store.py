"""The object-store transport: the round's weights put in Ray's object store once, bucket by
bucket, as dicts of numpy arrays (several times faster through the object store than torch
tensors, measured in bench/weights.py), and loaded by each HF generator one bucket at a time.

`ObjectStoreHandOff` is the hand-off of `actors.trainer.TrainerRun` on this path: on trainer
rank 0 it puts the buckets and returns their ObjectRefs (`HandOffResult.buckets`); the driver
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

from actors.weights import HandOffResult
from actors.weights.layout import WeightLayout

__all__ = ["ObjectStoreHandOff", "bucket_arrays", "put_buckets", "arrays_to_state_dict"]


def bucket_arrays(named: dict[str, torch.Tensor],
                  layout: WeightLayout) -> Iterator[dict[str, np.ndarray]]:
    """Buckets as dicts of numpy arrays in the layout's dtypes (bf16 has no numpy dtype: it
    travels as float32)."""
    for idx in layout.buckets:
        out = {}
        for i in idx:
            spec = layout.specs[i]
            t = named[spec.name].detach().to("cpu", spec.torch_dtype)
            if t.dtype == torch.bfloat16:
                t = t.float()
            out[spec.name] = t.numpy()
        yield out


def put_buckets(named: dict[str, torch.Tensor], layout: WeightLayout) -> list:
    """One `ray.put` per bucket; returns the ObjectRefs in layout order."""
    import ray

    return [ray.put(bucket) for bucket in bucket_arrays(named, layout)]


def arrays_to_state_dict(buckets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Buckets (as `ray.get` returns them: read-only arrays) back into one state dict of
    writable tensors; for tests and tools, never for a model that does not fit one process."""
    return {k: torch.from_numpy(a.copy()) for bucket in buckets for k, a in bucket.items()}


class ObjectStoreHandOff:
    """The object-store hand-off: `hand_off(weights, round_index)` on trainer rank 0."""

    def __init__(self, *, bucket_mb: float = 64.0, dtype: str = "float32"):
        self.bucket_mb, self.dtype = bucket_mb, dtype

    def __call__(self, weights: dict[str, torch.Tensor], round_index: int) -> HandOffResult:
        t0 = time.perf_counter()
        layout = WeightLayout.from_named(weights.items(), self.bucket_mb,
                                         dtype=getattr(torch, self.dtype))
        refs = put_buckets(weights, layout)
        return HandOffResult(stats={"method": "object_store", "version": round_index + 1,
                                    "bytes": layout.total_bytes, "buckets": len(refs),
                                    "dtype": self.dtype,
                                    "put_s": round(time.perf_counter() - t0, 4)},
                             buckets=refs)
