"""The trainer's models, sharded with FSDP2 without any rank holding a full copy.

    policy = build_sharded(path, cfg, mesh, device, trainable=True)   # meta -> shards
    load_checkpoint(policy, path)                                      # each rank its slices
    reference = build_sharded(path, cfg, mesh, device, trainable=False)
    copy_weights(reference, policy)                                    # no second read

`build_sharded` builds the model with its parameters on the meta device (buffers real), shards
it (`fully_shard` per decoder block, then the root) and allocates only this rank's shards.
`load_checkpoint` fills them from a safetensors checkpoint, each rank reading only its own
slices; other checkpoints go through rank 0 (one full copy, there only). The frozen reference is
stored in the compute dtype and filled from the policy's shards at each round's start.
`HostMemory` measures a process's peak host memory over a span (the trainer logs it for the
load; tests/actors/test_trainer_load.py and bench/train.py measure with it).

Not here: training (`actors.trainer`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Optional

import torch
import torch.distributed as dist

from sppo.config import TrainerConfig

__all__ = ["compute_dtype", "build_sharded", "load_checkpoint", "copy_weights", "HostMemory",
           "tied_names"]

logger = logging.getLogger("sppo.trainer")
_META_LOCK = threading.Lock()


class HostMemory:
    """Peak resident memory (VmHWM) of this process since construction, as an increase over
    the resident size then. Linux: construction resets the kernel's high-water mark
    (`/proc/self/clear_refs`, "5"); the peak counts file pages mapped and touched (safetensors
    reads through mmap) as well as allocations. Elsewhere the figures are None."""

    def __init__(self) -> None:
        self.base = self._read("VmRSS")
        self.reset_peak()

    def reset_peak(self) -> None:
        """Start a new span for `peak_increase` (the base stays the construction's)."""
        if self.base is None:
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not Linux, or a sandbox without it: no figure, never a failure
            self.base = None

    @staticmethod
    def _read(field: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def peak_increase(self) -> Optional[int]:
        """Bytes: the highest resident size since construction minus the size then (None
        where the kernel does not tell it)."""
        peak = self._read("VmHWM")
        return None if peak is None or self.base is None else peak - self.base


def compute_dtype(cfg: TrainerConfig) -> torch.dtype:
    """bf16 when `mixed_precision` is bf16, or auto on GPU; float32 otherwise."""
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and cfg.use_gpu)
    return torch.bfloat16 if bf16 else torch.float32


def _shard(model: torch.nn.Module, mesh, mp_policy, *, trainable: bool,
           reshard_blocks: bool = True) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=mp_policy,
                        reshard_after_forward=reshard_blocks)
    # The root keeps its parameters gathered from forward to backward; a forward-only model
    # has no backward to reshard them, so it must reshard right after forward.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=not trainable)
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device and their buffers real.

    Non-persistent buffers (rotary `inv_freq`) are computed in `__init__` and are not in
    checkpoints, so they must be built for real; parameters are filled from the checkpoint
    later. A parameter already on meta is registered as is, so `tie_weights` keeps the tie
    (checked by tests/actors/test_trainer_load.py with a tied model).
    """
    with _META_LOCK:  # one build at a time: the patch is process-wide
        register = torch.nn.Module.register_parameter

        def on_meta(module, name, param):
            register(module, name, param)
            if param is not None and param.device.type != "meta":
                module._parameters[name] = torch.nn.Parameter(
                    param.to("meta"), requires_grad=param.requires_grad)

        torch.nn.Module.register_parameter = on_meta
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = register


def build_sharded(model_path: str, cfg: TrainerConfig, mesh, device: torch.device, *,
                   trainable: bool) -> torch.nn.Module:
    """The model sharded on `mesh` with no rank ever holding it whole: built with parameters
    on the meta device, sharded by FSDP2 (`fully_shard` per decoder block, then the root),
    then each rank allocates only its shards (`to_empty`). Parameters are left uninitialised
    (fill them with `load_checkpoint` or `copy_weights`); buffers are computed.

    The policy keeps float32 master weights (bf16 compute through `MixedPrecisionPolicy` when
    `_compute_dtype` is bf16); the frozen reference is stored in the compute dtype itself.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoConfig, AutoModelForCausalLM

    compute = compute_dtype(cfg)
    dtype = torch.float32 if trainable else compute
    config = AutoConfig.from_pretrained(model_path)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if trainable and compute == torch.bfloat16 else MixedPrecisionPolicy())
    if trainable and cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    _shard(model, mesh, mp, trainable=trainable,
           reshard_blocks=cfg.reshard_after_forward if trainable else True)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)  # allocates this rank's shards (and empty buffers)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return model


def _checkpoint_dir(model_path: str) -> str:
    """A local directory holding `model_path`'s files: the path itself, or the hub's local
    snapshot of its config and weights: `model*.safetensors` (the transformers names, not a
    repo's other formats such as a `consolidated.safetensors`), or `*.bin` when it has no
    safetensors. Downloaded once per node; not run here (this machine has no hub)."""
    if os.path.isdir(model_path):
        return model_path
    from huggingface_hub import snapshot_download

    local = snapshot_download(model_path, allow_patterns=["*.json", "model*.safetensors"])
    if not any(f.endswith(".safetensors") for f in os.listdir(local)):
        local = snapshot_download(model_path, allow_patterns=["*.json", "*.bin"])
    return local


def _sharded_read_plan(model_path: str, local: str, wanted: list[str],
                       tied: set[str]) -> Optional[str]:
    """Why the slices cannot be read straight from the safetensors files in `local` (None:
    they can). Raises for a quantised checkpoint, which only transformers' quantizers read."""
    import json

    import torch.distributed.checkpoint as dcp

    config = json.loads(open(os.path.join(local, "config.json")).read())
    if config.get("quantization_config"):
        raise ValueError(f"{model_path}: a quantised checkpoint "
                         f"({config['quantization_config'].get('quant_method', '?')}); the "
                         "trainer needs full-precision weights (bf16, fp16 or fp32)")
    if not any(f.endswith(".safetensors") for f in os.listdir(local)):
        return "no safetensors files"
    meta = dcp.HuggingFaceStorageReader(local).read_metadata().state_dict_metadata
    missing = [k for k in wanted if k not in meta and k not in tied]
    if missing:
        return f"{len(missing)} parameters not found by name ({missing[0]}, ...)"
    odd = [k for k in wanted if k in meta and meta[k].properties.dtype
           not in (torch.float32, torch.bfloat16, torch.float16)]
    if odd:
        return f"{odd[0]} is stored as {meta[odd[0]].properties.dtype}"
    return None


@torch.no_grad()
def load_checkpoint(model: torch.nn.Module, model_path: str, *,
                    sharded_read: bool = True) -> str:
    """Fill a `build_sharded` model from the checkpoint at `model_path`; collective.

    Safetensors checkpoints whose names match the model's: every rank reads only the slices
    of its own shards (torch.distributed.checkpoint's `HuggingFaceStorageReader`, which reads
    `get_slice(...)[rows]` from each file and casts into the shard), so no rank ever holds the
    full model. Anything else (a `.bin` checkpoint, renamed keys, an unusual dtype): rank 0
    loads the full model on CPU and broadcasts it, each rank keeping its shard
    (`set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`): one full
    copy, on rank 0 only. Rank 0 decides which, for all ranks. Parameters tied to another one
    (a tied `lm_head`) are filled through it. Quantised checkpoints are refused. Returns the
    way it loaded: "sharded_read" or "broadcast_from_rank0".
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    state = get_model_state_dict(model)
    tied = tied_names(model)
    wanted = [k for k in state if k not in tied]
    local = _checkpoint_dir(model_path)
    decision: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            why = _sharded_read_plan(model_path, local, wanted, tied) if sharded_read \
                else "asked for the broadcast"
            decision = [("broadcast", why) if why else ("sharded_read", None)]
        except Exception as exc:  # every rank raises it, not rank 0 alone
            decision = [("error", f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(decision, src=0)
    how, why = decision[0]
    if how == "error":
        raise RuntimeError(f"cannot load {model_path}: {why}")
    if how == "sharded_read":
        dcp.load({k: state[k] for k in wanted}, storage_reader=dcp.HuggingFaceStorageReader(local))
        return "sharded_read"
    if sharded_read:
        logger.warning("%s: %s: rank 0 loads the model and broadcasts it", model_path, why)
    full: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).state_dict()
    set_model_state_dict(model, full, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=False))
    return "broadcast_from_rank0"


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier-named one."""
    seen: set[int] = set()
    out = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out.add(name)
        seen.add(id(p))
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Copy `src`'s parameter shards and buffers into identically sharded `dst` (no
    communication); buffers too, since a checkpoint's persistent buffers (a router's bias)
    reach the policy only."""
    for (name_d, p_d), (name_s, p_s) in zip(
            [*dst.named_parameters(), *dst.named_buffers()],
            [*src.named_parameters(), *src.named_buffers()], strict=True):
        if name_d != name_s:
            raise RuntimeError(f"reference and policy differ: {name_d} vs {name_s}")
        _local(p_d).copy_(_local(p_s))
