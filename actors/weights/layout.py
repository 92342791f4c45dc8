"""The bucket layout of one weight transfer: which tensors, in which order and dtype, in which
bucket. The one bucketing of the project: the collective transport (`transport.py`), the
object-store transport (`object_store.py`) and vLLM's workers (`actors.engines.vllm_worker`)
all derive their buffers and views from a `WeightLayout`.

It crosses process boundaries as plain lists (`to_wire`/`from_wire`), which is what vLLM's
`collective_rpc` can carry (it decodes arguments without the tensor hook: a tensor would arrive
as a list). Never one parameter per message: every transport moves whole buckets.

Not here: moving bytes (the transports) or deciding what to send (the trainer, the sender).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

__all__ = ["TensorSpec", "WeightLayout"]


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
    def from_named(cls, named: Iterable[tuple[str, torch.Tensor]], bucket_mb: float,
                   dtype: Optional[torch.dtype] = None) -> "WeightLayout":
        """The layout of `named`; with `dtype`, floating-point tensors travel in that dtype
        (the generators' dtype, e.g. bf16 from an fp32 master copy)."""
        def wire(t: torch.Tensor) -> torch.dtype:
            return dtype if dtype is not None and t.is_floating_point() else t.dtype

        specs = tuple(TensorSpec(n, tuple(t.shape), str(wire(t)).removeprefix("torch."))
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

    def bucket_dtype(self, b: int) -> torch.dtype:
        return self.specs[self.buckets[b][0]].torch_dtype

    def split(self, b: int, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of one received flat bucket as named tensors."""
        out, offset = {}, 0
        for i in self.buckets[b]:
            spec = self.specs[i]
            out[spec.name] = flat[offset: offset + spec.numel].view(spec.shape)
            offset += spec.numel
        return out

    def flat(self, b: int, named: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """Bucket `b` of `named` as one contiguous tensor in the layout's dtype on `device`."""
        dtype = self.bucket_dtype(b)
        parts = [named[self.specs[i].name].detach().reshape(-1).to(device, dtype)
                 for i in self.buckets[b]]
        return (torch.cat(parts) if len(parts) > 1 else parts[0]).contiguous()

    def to_wire(self) -> dict:
        """Plain lists and strings (what `collective_rpc` and JSON carry)."""
        return {"names": [s.name for s in self.specs], "dtypes": [s.dtype for s in self.specs],
                "shapes": [list(s.shape) for s in self.specs],
                "buckets": [list(b) for b in self.buckets]}

    @classmethod
    def from_wire(cls, wire: dict) -> "WeightLayout":
        specs = tuple(TensorSpec(n, tuple(int(x) for x in s), d)
                      for n, s, d in zip(wire["names"], wire["shapes"], wire["dtypes"],
                                         strict=True))
        return cls(specs, tuple(tuple(int(i) for i in b) for b in wire["buckets"]))
