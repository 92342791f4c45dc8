"""Judge actors (one preference engine each) and the pool that feeds them generations.

- `annotate(engine, generations, preference)`: the judge's work, usable without Ray. Per prompt
  the engine gives the (K, K) logits `l_ij` ("response i beats j, i shown first"), then
  `sppo.preference` turns them into P and win rates. Logits that are NaN or infinite become a
  `Failed` record naming the entries, never an `Annotated` one; an engine may also give a
  prompt a reason (`str`) instead of its matrix (the LLM judge: no verdict label among the top
  log-probs, a prompt over its context), which becomes that prompt's `Failed` record. If the
  engine raises on a batch, the prompts are retried one by one so that only the offending ones
  fail; a dead vLLM engine (`EngineDead`) is not the prompts' fault and is raised instead.
- `Judge`: a thin Ray actor around one engine: `judge(generations)` and, for evaluation and
  tests, `compare(prompts, a_texts, b_texts)` (raw logits that a beats b, a shown first) and
  `counters()` (the engine's, e.g. the LLM judge's truncated responses). An LLM judge whose
  vLLM engine core died ends its process so that Ray restarts it with a new engine.
- `make_engine_factory` / `make_judge_factory`: the only place where `judge.backend` picks an
  engine class (`PairRMEngine`, `RewardModelEngine`, `LLMJudgeEngine`, `GPMEngine`,
  `PythonJudgeEngine`);
  actor resources come from `pools.judge` through `.options()`, the nodes from the caller's
  `label_selector`. An LLM judge is a threaded actor (its vLLM engine batches concurrent
  calls) and, with `tensor_parallel_size` > 1, gets a placement group with one bundle per
  rank, as the vLLM generators do.
- `JudgePool`: a `Pool` with generations in and one record per prompt out, sized and resized
  independently of the generators.

Not here: the engines themselves (`actors/engines/`), the maths (`sppo/preference.py`) and
scaling decisions (a policy outside calls `resize`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np
import ray
from ray.actor import ActorHandle

from actors.dispatch import ActorDispatcher
from actors.engines.gpm import GPMEngine
from actors.engines.llm_judge import LLMJudgeEngine  # does not import vLLM
from actors.engines.pairrm import PairRMEngine  # imports llm-blender only when built
from actors.engines.python_judge import PythonJudgeEngine
from actors.engines.reward_model import RewardModelEngine
from actors.engines.vllm_engine import EngineDead
from actors.factory import ActorFactory, LabelSelector, anywhere
from actors.pool import Pool
from sppo.config import JudgeConfig, PoolConfig
from sppo.preference import check_finite, preference_matrix, win_rates
from sppo.records import Annotated, Failed, Generation
from sppo.tiny import resolve_model_path

__all__ = ["PreferenceEngine", "annotate", "Judge", "make_engine_factory",
           "make_judge_factory", "JudgePool"]

log = logging.getLogger(__name__)

Record = Union[Annotated, Failed]


class PreferenceEngine(Protocol):
    """What every judge backend provides (plain classes in `actors/engines/`)."""

    def logits(self, prompts: list[str], candidates: list[list[str]]
               ) -> list[Union[np.ndarray, str]]:
        """Per prompt a (K, K) matrix, [i, j] = logit that candidate i beats j (i shown
        first); the diagonal is not evaluated. An engine may put a `str` in place of a
        prompt's matrix: the reason that prompt could not be judged."""

    def pair_logits(self, prompts: list[str], a: list[str], b: list[str]) -> np.ndarray:
        """(N,) logits that a[n] beats b[n] for prompts[n], a shown first."""


def _judge_text(g: Generation) -> str:
    # Judges were trained on the user's instruction, not on the chat-templated prompt.
    return g.prompt.raw or g.prompt.text


def _record(g: Generation, logits: np.ndarray, preference: str) -> Record:
    reason = check_finite(logits)
    if reason is not None:
        return Failed(g.prompt.id, "judge", reason)
    probs = preference_matrix(np.asarray(logits, dtype=np.float64), preference)  # (K, K)
    return Annotated(generation=g, logits=np.asarray(logits, dtype=np.float64).tolist(),
                     probs=probs.tolist(), win_rates=win_rates(probs).tolist())


def annotate(engine: PreferenceEngine, generations: Sequence[Generation],
             preference: str = "direct") -> list[Record]:
    """One `Annotated` or `Failed` per generation, in order."""
    out: list[Optional[Record]] = [None] * len(generations)
    todo = []
    for n, g in enumerate(generations):
        if g.k < 2:
            out[n] = Failed(g.prompt.id, "judge", f"needs at least 2 responses, got {g.k}")
        else:
            todo.append(n)
    try:
        mats: list[Any] = engine.logits([_judge_text(generations[n]) for n in todo],
                                        [list(generations[n].texts) for n in todo])
    except EngineDead:
        raise
    except Exception:
        log.warning("judge engine failed on a batch of %d; retrying prompt by prompt",
                    len(todo), exc_info=True)
        mats = []
        for n in todo:
            g = generations[n]
            try:
                mats.append(engine.logits([_judge_text(g)], [list(g.texts)])[0])
            except EngineDead:
                raise
            except Exception as exc:
                mats.append(f"{type(exc).__name__}: {exc}")
    for n, m in zip(todo, mats):
        g = generations[n]
        out[n] = Failed(g.prompt.id, "judge", m) if isinstance(m, str) else \
            _record(g, m, preference)
    return out  # type: ignore[return-value]


class Judge:
    """One preference engine in a Ray actor. Build it with `make_judge_factory`."""

    def __init__(self, build_engine: Callable[[], PreferenceEngine], preference: str = "direct"):
        self._engine = build_engine()
        self._preference = preference

    def judge(self, generations: list[Generation]) -> list[Record]:
        """One `Annotated` or `Failed` per generation, in order."""
        try:
            return annotate(self._engine, generations, self._preference)
        except EngineDead as exc:
            # The batch goes to another attempt like any batch of a dead actor; Ray restarts
            # this one (max_restarts) with a new engine.
            log.error("judge: %s; exiting so that Ray restarts this actor", exc)
            os._exit(1)

    def compare(self, prompts: list[str], a_texts: list[str], b_texts: list[str]) -> list[float]:
        """Raw logits that a_texts[n] beats b_texts[n] for prompts[n], a shown first."""
        return [float(x) for x in self._engine.pair_logits(prompts, a_texts, b_texts)]

    def counters(self) -> dict:
        """The engine's counters since start ({} for engines that keep none)."""
        counters = getattr(self._engine, "counters", None)
        return counters() if counters is not None else {}


def make_engine_factory(cfg: JudgeConfig, *, device: Optional[str] = None,
                        tensor_parallel_size: int = 1) -> Callable[[], PreferenceEngine]:
    """A picklable zero-argument callable building the engine `cfg.backend` names."""
    if cfg.backend == "pairrm":
        return functools.partial(
            PairRMEngine, cfg.model_path, backbone=cfg.backbone, batch_size=cfg.batch_size,
            source_max_length=cfg.source_max_length,
            candidate_max_length=cfg.candidate_max_length, dtype=cfg.dtype, device=device)
    if cfg.backend == "reward_model":
        return functools.partial(
            RewardModelEngine, cfg.model_path, batch_size=cfg.batch_size,
            source_max_length=cfg.source_max_length,
            candidate_max_length=cfg.candidate_max_length, dtype=cfg.dtype, device=device)
    if cfg.backend == "llm":
        # `builtin:tiny-llama` (the demo's tiny judge) is built here, in the driver's cache,
        # as the policy's is; other paths pass through.
        return functools.partial(
            LLMJudgeEngine, resolve_model_path(cfg.model_path or ""), template=cfg.template,
            label_a=cfg.label_a, label_b=cfg.label_b, max_response_tokens=cfg.max_response_tokens,
            top_logprobs=cfg.top_logprobs, dtype=cfg.dtype,
            use_gpu=(device or "cpu").startswith("cuda"),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization, kv_cache_gb=cfg.kv_cache_gb,
            enforce_eager=cfg.enforce_eager, max_model_len=cfg.max_model_len)
    if cfg.backend == "gpm":
        return functools.partial(
            GPMEngine, resolve_model_path(cfg.model_path or ""), max_length=cfg.max_length,
            max_batch_tokens=cfg.max_batch_tokens, tau=cfg.tau, dtype=cfg.dtype, device=device)
    if tensor_parallel_size > 1:
        raise ValueError(f"pools.judge.tensor_parallel_size > 1 needs judge.backend 'llm' "
                         f"(got {cfg.backend!r})")
    if cfg.backend == "python":
        return functools.partial(PythonJudgeEngine, cfg.function, returns=cfg.function_returns)
    raise ValueError(f"judge.backend must be 'pairrm', 'reward_model', 'llm', 'gpm' or "
                     f"'python', got {cfg.backend!r}")


def make_judge_factory(cfg: JudgeConfig, pool: PoolConfig, *,
                       label_selector: LabelSelector = anywhere) -> ActorFactory:
    """A callable that starts one `Judge` actor per call, with `pools.judge`'s resources, on
    the nodes `label_selector()` names; the engine runs on CUDA when `pool.num_gpus > 0`, else
    on CPU."""
    build = make_engine_factory(cfg, device="cuda" if pool.num_gpus > 0 else "cpu",
                                tensor_parallel_size=pool.tensor_parallel_size)
    if cfg.backend == "llm":
        # Room for the pool's in-flight batches plus compare and counters calls.
        return ActorFactory(Judge, pool, (build, cfg.preference), label_selector=label_selector,
                            max_concurrency=pool.max_in_flight + 2,
                            tensor_parallel=pool.tensor_parallel_size > 1)
    return ActorFactory(Judge, pool, (build, cfg.preference), label_selector=label_selector)


class JudgePool(Pool):
    """Judge actors: generations in, one record per prompt out."""

    stage = "judge"

    def __init__(self, factory: Callable[[], ActorHandle], pool_cfg: PoolConfig, *,
                 dispatcher_cls: type = ActorDispatcher):
        super().__init__(factory, pool_cfg, dispatcher_cls=dispatcher_cls)

    def _call(self, actor: ActorHandle, batch: list[Generation]) -> "ray.ObjectRef":
        return actor.judge.remote(batch)

    @staticmethod
    def _item_id(generation: Generation) -> str:
        return generation.prompt.id

    def counters(self, timeout_s: float = 30.0) -> dict:
        """The judges' engine counters added up over the live actors (each since that actor
        started; numbers only, nested dicts added key by key); an actor that does not answer
        within `timeout_s` is left out and counted in `unanswered`."""
        total: dict = {}
        refs = [a.counters.remote() for a in self.actors()]
        ready, missing = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                _add_into(total, ray.get(ref))
            except ray.exceptions.RayError:
                missing.append(ref)
        if missing:
            total["unanswered"] = len(missing)
        return total


def _add_into(total: dict, counts: dict) -> None:
    for k, v in counts.items():
        if isinstance(v, dict):
            _add_into(total.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v
