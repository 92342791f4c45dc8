"""Judge actors (one preference engine each) and the pool that feeds them generations.

- `annotate(engine, generations, preference)`: the judge's work, usable without Ray. Per prompt
  the engine gives the (K, K) logits `l_ij` ("response i beats j, i shown first"), then
  `sppo.preference` turns them into P and win rates. Logits that are NaN or infinite become a
  `Failed` record naming the entries, never an `Annotated` one. If the engine raises on a
  batch, the prompts are retried one by one so that only the offending ones fail.
- `Judge`: a thin Ray actor around one engine: `judge(generations)` and, for evaluation and
  tests, `compare(prompts, a_texts, b_texts)` (raw logits that a beats b, a shown first).
- `make_engine_factory` / `make_judge_factory`: the only place where `judge.backend` picks an
  engine class (`PairRMEngine`, `RewardModelEngine`, `PythonJudgeEngine`); actor resources
  come from `pools.judge` through `.options()`.
- `JudgePool`: the generic `ActorPool` with generations in and one record per prompt out,
  sized and resized independently of the generators.

Not here: the engines themselves (`actors/engines/`), the maths (`sppo/preference.py`) and
scaling decisions (a policy outside calls `resize`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np
import ray
from ray.actor import ActorHandle

from actors.batched_pool import BatchedPool
from actors.pool import ActorPool
from sppo.config import JudgeConfig, PoolConfig
from sppo.preference import check_finite, preference_matrix, win_rates
from sppo.records import Annotated, Failed, Generation

__all__ = ["PreferenceEngine", "annotate", "Judge", "make_engine_factory",
           "make_judge_factory", "JudgePool"]

log = logging.getLogger(__name__)

Record = Union[Annotated, Failed]


class PreferenceEngine(Protocol):
    """What every judge backend provides (plain classes in `actors/engines/`)."""

    def logits(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """Per prompt a (K, K) matrix, [i, j] = logit that candidate i beats j (i shown
        first); the diagonal is not evaluated."""

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
    except Exception:
        log.warning("judge engine failed on a batch of %d; retrying prompt by prompt",
                    len(todo), exc_info=True)
        mats = []
        for n in todo:
            g = generations[n]
            try:
                mats.append(engine.logits([_judge_text(g)], [list(g.texts)])[0])
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
        return annotate(self._engine, generations, self._preference)

    def compare(self, prompts: list[str], a_texts: list[str], b_texts: list[str]) -> list[float]:
        """Raw logits that a_texts[n] beats b_texts[n] for prompts[n], a shown first."""
        return [float(x) for x in self._engine.pair_logits(prompts, a_texts, b_texts)]


def make_engine_factory(cfg: JudgeConfig, *, device: Optional[str] = None
                        ) -> Callable[[], PreferenceEngine]:
    """A picklable zero-argument callable building the engine `cfg.backend` names."""
    if cfg.backend == "pairrm":
        from actors.engines.pairrm import PairRMEngine

        return functools.partial(
            PairRMEngine, cfg.model_path, backbone=cfg.backbone, batch_size=cfg.batch_size,
            source_max_length=cfg.source_max_length,
            candidate_max_length=cfg.candidate_max_length, dtype=cfg.dtype, device=device)
    if cfg.backend == "reward_model":
        from actors.engines.reward_model import RewardModelEngine

        return functools.partial(
            RewardModelEngine, cfg.model_path, batch_size=cfg.batch_size,
            source_max_length=cfg.source_max_length,
            candidate_max_length=cfg.candidate_max_length, dtype=cfg.dtype, device=device)
    if cfg.backend == "python":
        from actors.engines.python_judge import PythonJudgeEngine

        return functools.partial(PythonJudgeEngine, cfg.function, returns=cfg.function_returns)
    raise ValueError(f"judge.backend must be 'pairrm', 'reward_model' or 'python', "
                     f"got {cfg.backend!r}")


def make_judge_factory(cfg: JudgeConfig, pool: PoolConfig) -> Callable[[], ActorHandle]:
    """A zero-argument callable that starts one `Judge` actor per call, with `pools.judge`'s
    resources; the engine runs on CUDA when `pool.num_gpus > 0`, else on CPU."""
    from cluster.placement import actor_options

    build = make_engine_factory(cfg, device="cuda" if pool.num_gpus > 0 else "cpu")
    actor_cls = ray.remote(Judge)

    def factory() -> ActorHandle:
        # On `role: judge` nodes of a role-labelled cluster (looked up per actor: nodes join
        # and leave), anywhere otherwise. Retries are the pool's job (it re-dispatches a dead
        # actor's batch): max_task_retries=0.
        options = actor_options("judge", pool.num_cpus, pool.num_gpus)
        return actor_cls.options(**options, max_restarts=pool.max_restarts,
                                 max_task_retries=0).remote(build, cfg.preference)

    return factory


class JudgePool(BatchedPool):
    """Judge actors behind an `ActorPool`: generations in, one record per prompt out."""

    stage = "judge"

    def __init__(self, factory: Callable[[], ActorHandle], pool_cfg: PoolConfig, *,
                 pool_cls: type = ActorPool):
        super().__init__(factory, pool_cfg, pool_cls=pool_cls)

    def _call(self, actor: ActorHandle, batch: list[Generation]) -> "ray.ObjectRef":
        return actor.judge.remote(batch)

    @staticmethod
    def _item_id(generation: Generation) -> str:
        return generation.prompt.id
