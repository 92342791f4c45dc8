"""Weights from trainer rank 0 to the generators, at the end of each round.

- `layout.py`: the bucket layout, the one bucketing every transport uses;
- `transport.py`: the collective transport (one gloo/NCCL group for the job);
- `sender.py`: trainer rank 0's collective sync (`CollectiveHandOff`), into the processes that
  hold the generators' weights;
- `object_store.py`: the object-store transport (`ObjectStoreHandOff`), buckets put once in
  Ray's object store and loaded by HF generators one at a time.

A hand-off runs on trainer rank 0 with the round's weights and returns a `HandOffResult`, which
reaches the driver in `actors.stream.RoundResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["HandOffResult"]


@dataclass
class HandOffResult:
    """What a hand-off did: `stats` (method, bytes, seconds, ...: JSON, for the round report)
    and, on the object-store path, `buckets`, the ObjectRefs of the weights (owned by trainer
    rank 0's process) for the driver to pass on to the generators."""

    stats: dict[str, Any] = field(default_factory=dict)
    buckets: Optional[list] = None
