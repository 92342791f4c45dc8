"""Weights from trainer rank 0 to the generators, at the end of each round.

- `layout.py`: the bucket layout, the one bucketing every transport uses;
- `transport.py`: the collective transport (one gloo/NCCL group for the job);
- `sender.py`: trainer rank 0's collective sync (`CollectiveHandOff`), into the processes that
  hold the generators' weights;
- `object_store.py`: the object-store transport (`ObjectStoreHandOff`), buckets put once in
  Ray's object store and loaded by HF generators one at a time.

A hand-off (`HandOff`) takes the round's weights one bucket at a time on trainer rank 0, as the
trainer gathers them from its shards (`actors.round_end.stream_weights`): `begin(layout, t)`,
`put(b, tensors)` per bucket, `end()`, which returns a `HandOffResult`; that reaches the driver in
`actors.stream.RoundResult`. Calling a hand-off with a whole state dict runs the same three
steps (tests and benches, where one process stands in for rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from actors.weights.layout import WeightLayout

__all__ = ["HandOff", "HandOffResult"]


@dataclass
class HandOffResult:
    """What a hand-off did: `stats` (method, bytes, seconds, ...: JSON, for the round report)
    and, on the object-store path, `buckets`, the ObjectRefs of the weights (owned by trainer
    rank 0's process) for the driver to pass on to the generators."""

    stats: dict[str, Any] = field(default_factory=dict)
    buckets: Optional[list] = None


class HandOff:
    """The hand-off protocol (see the module docstring). `bucket_mb` and `dtype` (the
    generators' dtype: floating-point weights travel in it) decide the layout; every trainer
    rank derives the same one (`layout`), only rank 0 calls the rest."""

    def __init__(self, *, bucket_mb: float = 64.0, dtype: str = "float32"):
        self.bucket_mb, self.dtype = bucket_mb, dtype

    def layout(self, named: Iterable[tuple[str, torch.Tensor]]) -> WeightLayout:
        return WeightLayout.from_named(named, self.bucket_mb, dtype=getattr(torch, self.dtype))

    def begin(self, layout: WeightLayout, round_index: int) -> None:
        raise NotImplementedError

    def put(self, bucket: int, tensors: dict[str, torch.Tensor]) -> None:
        """Bucket `bucket` of the layout: full tensors in the layout's dtypes. The hand-off
        may keep what it needs; the caller frees the rest."""
        raise NotImplementedError

    def end(self) -> HandOffResult:
        raise NotImplementedError

    def close(self) -> None:
        """End of the job (e.g. the generators leave the weight group)."""

    def __call__(self, weights: dict[str, torch.Tensor], round_index: int) -> HandOffResult:
        """The whole hand-off of a state dict held in this process."""
        layout = self.layout(weights.items())
        self.begin(layout, round_index)
        for b, idx in enumerate(layout.buckets):
            names = [layout.specs[i].name for i in idx]
            self.put(b, {n: weights[n].detach().to(layout.specs[i].torch_dtype)
                         for n, i in zip(names, idx)})
        return self.end()
