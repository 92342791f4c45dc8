"""vLLM 0.33 as a sampling engine, with the same interface and records as the HF engine.

Importing this module does not import vLLM: it is imported inside `VLLMGenerationEngine`, so
the package imports on machines without vLLM and the class exists for type checks and tests
that skip.

Checked against vLLM sources and docs with the search tool (the names below; vLLM cannot run
on the CPU machines, so this path is right by reading and runs only where a GPU and vLLM are):
- `vllm.LLM(model=, tensor_parallel_size=, dtype=, gpu_memory_utilization=, enforce_eager=,
  max_model_len=, seed=, distributed_executor_backend=, worker_extension_cls=,
  weight_transfer_config=)`, `vllm.config.WeightTransferConfig(backend="nccl")`.
- `LLM.generate(prompts, sampling_params, use_tqdm=)` with a list of `vllm.inputs.TokensPrompt`
  (`{"prompt_token_ids": [...]}`) and one `SamplingParams` per prompt; outputs come back in
  input order as `RequestOutput.outputs: list[CompletionOutput]` with `token_ids`, `text`
  (special tokens skipped by default), `finish_reason` ("stop" | "length" | "abort") and
  `logprobs` (one `{token_id: Logprob(.logprob)}` per sampled token).
- `SamplingParams(n=, temperature=, top_p=, max_tokens=, seed=, logprobs=0)`: `logprobs=0`
  returns only the sampled token's log-prob; `logprobs_mode` defaults to raw log-probs of the
  unmodified model (API-NOTES), which is what `Generation.logprobs` means. With a seed and
  n > 1, vLLM gives child j the seed `seed + j` (`v1/engine/parallel_sampling.py`), the rule
  the HF engine copies. When the model stops on EOS the EOS id is part of `token_ids`.
- Weight transfer (`LLM` methods): `init_weight_transfer_engine({"init_info": ...})`,
  `start_weight_update()`, `update_weights({"update_info": ...})`,
  `finish_weight_update(weight_version: str | None)`, `get_weight_version() -> str`;
  `RayVLLMWeightSyncClient` calls them by these names on actor handles, with the same dict
  arguments and `finish_weight_update()` with none (`distributed/weight_transfer/clients.py`).
- `LLM.collective_rpc(method, args=, kwargs=)` runs a method on every worker, including methods
  of the `worker_extension_cls` (a dotted class name); `collective_rpc("reload_weights",
  kwargs={"weights_path": dir, "is_checkpoint_format": True})` reloads from a checkpoint
  directory (taken from API-NOTES, read from the 0.33 wheel). `LLM.reset_prefix_cache()`.
- Tensor parallelism inside a Ray actor: the actor sits in a placement group with
  `placement_group_capture_child_tasks=True` and `distributed_executor_backend="ray"` (see
  `actors/generator.py`).

Not checked (no GPU here): the numbers. The shared tests in tests/actors/test_generator.py run
this engine wherever vLLM and a CUDA GPU exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from actors.engines.generation import (Record, check_weights, generate_isolated,
                                       prompt_problem, prompt_seed)
from sppo.records import Failed, Generation, Prompt

__all__ = ["VLLMGenerationEngine", "VLLMWorkerExtension"]

_EXTENSION = "actors.engines.vllm_generator.VLLMWorkerExtension"


class VLLMGenerationEngine:
    def __init__(self, model_path: str, *, k: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, return_logprobs: bool, dtype: str = "auto",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 enforce_eager: bool = False, max_model_len: Optional[int] = None,
                 weight_transfer: bool = False):
        from vllm import LLM

        self.k, self.temperature, self.top_p = k, temperature, top_p
        self.max_new_tokens, self.seed, self.return_logprobs = max_new_tokens, seed, return_logprobs
        kwargs: dict[str, Any] = dict(
            model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            max_model_len=max_model_len, seed=seed, worker_extension_cls=_EXTENSION)
        if tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
        self.weight_transfer = weight_transfer
        if weight_transfer:
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
        self.llm = LLM(**kwargs)
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self.vocab_size = len(self.llm.get_tokenizer())
        self.weight_version = 0
        self._native_update = False  # a native (weight-transfer engine) update is open
        self._shapes = _checkpoint_shapes(model_path)  # HF names -> shapes, to check buckets

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Prompt]) -> list[Record]:
        """One record per prompt, in input order; never raises for a bad prompt."""
        return generate_isolated(
            prompts,
            lambda p: prompt_problem(p, self.max_new_tokens, self.max_len, self.vocab_size),
            self._generate_batch)

    def _generate_batch(self, prompts: list[Prompt]) -> list[Record]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Greedy samples are all alike (and older vLLMs refuse n > 1 when greedy): decode
        # once and copy the sample K times.
        n = 1 if self.temperature == 0 else self.k
        params = [SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p,
                                 max_tokens=self.max_new_tokens,
                                 seed=prompt_seed(self.seed, p.id),
                                 logprobs=0 if self.return_logprobs else None)
                  for p in prompts]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p.token_ids))
                                     for p in prompts], params, use_tqdm=False)
        return [self._record(p, out) for p, out in zip(prompts, outputs, strict=True)]

    def _record(self, prompt: Prompt, out: Any) -> Record:
        samples = sorted(out.outputs, key=lambda c: c.index)
        samples = [samples[j % len(samples)] for j in range(self.k)]
        odd = [c.finish_reason for c in samples if c.finish_reason not in ("stop", "length")]
        if odd:
            return Failed(prompt.id, "generate", f"vLLM finished a sample with {odd[0]!r}")
        ids = [list(c.token_ids) for c in samples]
        lps = None
        if self.return_logprobs:  # c.logprobs[t] maps token id -> Logprob for step t
            lps = [float(sum(c.logprobs[t][tok].logprob for t, tok in enumerate(row)))
                   for c, row in zip(samples, ids)]
        return Generation(prompt=prompt, response_ids=ids, texts=[c.text for c in samples],
                          finish_reasons=[c.finish_reason for c in samples], logprobs=lps,
                          weight_version=self.weight_version)

    def chat(self, token_ids: Sequence[int], *, max_tokens: int, temperature: float,
             top_p: float, n: int, seed: int) -> list[dict]:
        """`n` completions of one prompt with this request's sampling settings (the control
        service's chat endpoint); the HF engine's twin. Raises ValueError for a prompt the
        model cannot take."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        why = prompt_problem(Prompt(id="chat", text="", token_ids=tuple(token_ids)),
                             max_tokens, self.max_len, self.vocab_size)
        if why:
            raise ValueError(why)
        greedy = temperature == 0
        params = SamplingParams(n=1 if greedy else n, temperature=temperature, top_p=top_p,
                                max_tokens=max_tokens, seed=seed)
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))], params,
                                   use_tqdm=False)
        samples = sorted(out.outputs, key=lambda c: c.index)
        return [{"text": c.text,
                 "finish_reason": "length" if c.finish_reason == "length" else "stop",
                 "prompt_tokens": len(token_ids), "completion_tokens": len(c.token_ids),
                 "weight_version": self.weight_version}
                for c in (samples[j % len(samples)] for j in range(n))]

    # ------------------------------------------------------------------ weights

    def init_weight_transfer_engine(self, request: dict) -> None:
        """vLLM's weight-transfer handshake (`{"init_info": {...}}`), e.g. joining the NCCL
        group of the trainer; needs `weight_transfer=True`."""
        self._need_transfer("init_weight_transfer_engine")
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        if self.weight_transfer:
            self.llm.start_weight_update()
            self._native_update = True

    def update_weights(self, bucket: dict) -> None:
        """Either vLLM's native request `{"update_info": {...}}` (the trainer broadcasts the
        tensors), or a bucket `{name: array}` of named tensors loaded through the workers."""
        if set(bucket) == {"update_info"}:
            self._need_transfer("update_weights({'update_info': ...})")
            self.llm.update_weights(bucket)
        else:
            self.load_weights(bucket.items())

    def finish_weight_update(self, version: Optional[int] = None) -> int:
        version = self.weight_version + 1 if version is None else int(version)
        if self._native_update:
            self.llm.finish_weight_update(weight_version=str(version))
            self._native_update = False
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self.weight_version = version
        return version

    def get_weight_version(self) -> str:
        return self.llm.get_weight_version() if self.weight_transfer else str(self.weight_version)

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Named tensors (HF names, full shapes) into every worker's model; each worker's
        `model.load_weights` maps HF names to vLLM's fused, sharded parameters."""
        import torch

        # CPU tensors travel to the workers with the RPC (copied out of read-only arrays).
        batch = [(name, torch.as_tensor(np.array(v)) if isinstance(v, np.ndarray) else v.cpu())
                 for name, v in named_tensors]
        if self._shapes is not None:
            check_weights(batch, self._shapes)
        self.llm.collective_rpc("load_named_weights", args=(batch,))

    def reload_weights(self, checkpoint_dir: str, version: int) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": checkpoint_dir,
                                                          "is_checkpoint_format": True})
        self.finish_weight_update(version)

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        raise NotImplementedError("vLLM holds fused, tensor-parallel shards, not the HF "
                                  "state_dict; read the weights from the trainer")

    def _need_transfer(self, what: str) -> None:
        if not self.weight_transfer:
            raise RuntimeError(f"{what} needs the engine built with weight_transfer=True "
                               "(vLLM's weight_transfer_config)")


def _checkpoint_shapes(model_path: str) -> Optional[dict[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a local checkpoint (safetensors headers only, no data),
    or None when `model_path` is not a local directory of safetensors files."""
    root = Path(model_path)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    # A tied checkpoint stores no lm_head, but a trainer's state_dict names it.
    config = json.loads((root / "config.json").read_text())
    if config.get("tie_word_embeddings") and "model.embed_tokens.weight" in shapes:
        shapes.setdefault("lm_head.weight", shapes["model.embed_tokens.weight"])
    return shapes


class VLLMWorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); `self` is the worker, so
    `self.model_runner.model` is this rank's shard of the model."""

    def load_named_weights(self, weights: list) -> None:
        # vLLM's loaders map HF names onto fused (qkv_proj, gate_up_proj) and TP-sharded
        # parameters and raise KeyError for a name the model does not have.
        self.model_runner.model.load_weights(weights=weights)  # type: ignore[attr-defined]
