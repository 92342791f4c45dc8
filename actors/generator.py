"""Generator actors (one inference engine each) and the pool that feeds them prompts.

Over 400 lines: the actor and its pool share one weight-update protocol (sync, reload, re-sync
of restarted actors), read together.

- `Generator`: a thin Ray actor around an engine (`HFGenerationEngine` or
  `VLLMGenerationEngine`); its public methods are the remote API. It tracks what the engine
  cannot: whether Ray restarted it (a restarted actor re-ran `__init__` and holds the weights
  it was built with, so it refuses work with `NeedsPrepare` until re-synced), whether a weight
  update is in progress (calls wait for it, chats are refused) and whether one failed half
  way (the actor is stale until re-synced, never stamped with a version on partial weights).
  `chat` answers the control service's chat requests with the current weights.
- `make_generator_factory`: builds actors with resources from the config through `.options()`,
  on the nodes the caller's `label_selector` names (the cluster layer decides placement); a
  vLLM generator is a threaded actor (its engine batches concurrent calls), and with tensor
  parallelism it gets a placement group with one bundle per rank.
- `GeneratorPool`: a `Pool` with prompts in and records out; splits prompts into batches of
  `pools.generator.batch_size`, turns a batch the pool gave up on into `Failed` records, and
  owns the object-store weight broadcast and the re-sync of new or restarted actors to the
  latest weights.

Three ways weights arrive (see `GenerationEngine`): the trainer's collective sync
(`weight_receivers`, `join_weight_group`, `receive_weights`; driven by
`actors.weights.sender.CollectiveHandOff` from trainer rank 0), a checkpoint directory
(`reload_weights`), and object-store buckets (`load_buckets`, or `start_weight_update`,
`update_weights` per bucket, `finish_weight_update`; HF engine only, vLLM takes empty ones).

Not here: the transports (`actors.weights`), scaling policy, and the dispatch itself
(`actors.dispatch`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Any, Callable, Iterator, Optional

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from actors.dispatch import ActorDispatcher, NeedsPrepare
from actors.engines.generation import GenerationEngine, Record
from actors.engines.hf_generator import HFGenerationEngine
from actors.engines.vllm_engine import EngineDead
from actors.engines.vllm_generator import VLLMGenerationEngine  # does not import vLLM
from actors.factory import ActorFactory, LabelSelector, anywhere
from actors.pool import Pool
from sppo.config import GeneratorConfig, PoolConfig, SamplingConfig
from sppo.records import Prompt

__all__ = ["Generator", "WeightsUnavailable", "make_generator_factory",
           "GeneratorPool"]

log = logging.getLogger(__name__)


class WeightsUnavailable(RuntimeError):
    """The generator cannot answer now (restarted, or a weight update in progress)."""


class Generator:
    """One inference engine in a Ray actor. Build it with `make_generator_factory`.

    A vLLM generator is a threaded actor (`max_concurrency` > 1): several `generate` calls
    and chats run in its engine at once. A weight update waits for the calls in progress and
    holds new ones back until it is done (chats are refused meanwhile), so no call sees two
    weight versions."""

    def __init__(self, build_engine: Callable[[], GenerationEngine]):
        self._engine = build_engine()
        self._stale = ray.get_runtime_context().was_current_actor_reconstructed
        self._cond = threading.Condition()
        self._serving = 0  # generate/chat calls in progress
        # None, "open" (start_weight_update called, buckets may follow in later calls),
        # "call" (a one-call update is running: reload_weights, load_buckets) or "sync" (a
        # collective sync: prepare_weights done, receive_weights to come).
        self._update: Optional[str] = None
        self._update_error: Optional[str] = None
        self._weight_group: Optional[str] = None  # key of the trainer's group it joined
        self._sync: Optional[tuple[dict, int, int]] = None  # prepared: layout, version, token
        self._syncs = 0  # tokens of prepared syncs (one expires only if it is still the one)

    @staticmethod
    @contextlib.contextmanager
    def _engine_alive() -> Iterator[None]:
        """Around every call into the engine. An engine that died (vLLM's engine core
        process) ends this actor's process, so that Ray restarts it with a new engine
        (`max_restarts`) and the pool re-syncs it before its next batch: a batch in flight
        goes to another attempt like any batch of a dead actor, and a weight call (a sync,
        a reload) fails with the actor's death, which its callers treat as "restarting"
        rather than as an error of the run."""
        try:
            yield
        except EngineDead as exc:
            log.error("generator: %s; exiting so that Ray restarts this actor", exc)
            os._exit(1)

    @contextlib.contextmanager
    def _serve(self) -> Iterator[None]:
        """Around a generate or chat call: waits for a one-call update to end."""
        with self._cond:
            self._cond.wait_for(lambda: self._update not in ("call", "sync"))
            if self._update == "open":  # buckets may still come: the weights are partial
                raise WeightsUnavailable("this generator's weights are being updated")
            self._serving += 1
        try:
            with self._engine_alive():
                yield
        finally:
            with self._cond:
                self._serving -= 1
                self._cond.notify_all()

    def _begin_update(self, kind: str) -> None:
        """Hold new calls back and wait for those in progress. An update left open by a
        caller that never finished it is replaced (its weights were partial anyway)."""
        with self._cond:
            if self._update in ("call", "sync"):
                raise RuntimeError("a weight update is already running on this generator")
            self._update, self._update_error = kind, None
            self._cond.wait_for(lambda: self._serving == 0)

    def _end_update(self) -> None:
        with self._cond:
            self._update = None
            self._cond.notify_all()

    @contextlib.contextmanager
    def _one_call_update(self) -> Iterator[None]:
        """A whole update inside one call; on failure the weights are partial and the actor
        is stale until re-synced (the pool reloads the latest weights before its next batch)."""
        self._begin_update("call")
        try:
            with self._engine_alive():
                yield
            self._stale = False
        except BaseException:
            self._stale = True
            raise
        finally:
            self._end_update()

    def generate(self, prompts: list[Prompt]) -> list[Record]:
        """One `Generation` or `Failed` per prompt, in order."""
        if self._stale:
            raise NeedsPrepare("generator was restarted and holds its initial weights")
        try:
            with self._serve():
                return self._engine.generate(prompts)
        except WeightsUnavailable as exc:  # an update left open: the pool re-syncs first
            raise NeedsPrepare(str(exc)) from None

    def chat(self, token_ids: list[int], *, max_tokens: int, temperature: float, top_p: float,
             n: int, seed: int) -> list[dict]:
        """`n` completions of one templated, tokenized conversation with the current weights
        (the control service's chat). Refused while the weights are stale or mid-update, so
        an answer never comes from a half-loaded model."""
        if self._stale or self._update is not None:
            raise WeightsUnavailable("this generator's weights are being updated")
        with self._serve():
            return self._engine.chat(token_ids, max_tokens=max_tokens, temperature=temperature,
                                     top_p=top_p, n=n, seed=seed)

    def weight_version(self) -> int:
        return self._engine.weight_version

    def is_stale(self) -> bool:
        """True after Ray restarted this actor, until a weight update completes."""
        return self._stale

    # Object-store buckets (HF engine; a vLLM engine takes only empty updates).

    def start_weight_update(self) -> None:
        """Open an update whose buckets come in later calls."""
        self._begin_update("open")
        self._engine.start_weight_update()

    def update_weights(self, bucket: dict[str, Any]) -> None:
        """Load one bucket `{name: array}` in place. Arrays from the object store are
        read-only; the engines only read them."""
        try:
            self._engine.update_weights(bucket)
        except Exception as exc:
            self._update_error = f"{type(exc).__name__}: {exc}"
            self._stale = True  # partial weights: re-sync before any more work
            raise

    def finish_weight_update(self, version: Optional[int] = None) -> int:
        """Close the update; the weights are now `version` (default: current + 1)."""
        if self._update is None:  # e.g. the actor restarted mid-update and lost the buckets
            raise RuntimeError("finish_weight_update without start_weight_update in this "
                               "actor's lifetime: the weights were not updated")
        try:
            if self._update_error is not None:
                raise RuntimeError(f"a bucket of this update failed ({self._update_error}); "
                                   "the weights are partial: update again")
            version = self._engine.finish_weight_update(version)
            self._stale = False
            return version
        finally:
            self._end_update()

    def load_buckets(self, buckets: list, version: int) -> int:
        """A whole object-store update in one call: `buckets` is a list of ObjectRefs of
        `{name: array}` (inside a list, so Ray does not fetch them all up front: each is
        fetched, loaded and released in turn). With no buckets it adopts `version` for the
        weights it holds (a fresh actor before any sync)."""
        with self._one_call_update():
            self._engine.start_weight_update()
            for ref in buckets:
                self._engine.update_weights(ray.get(ref))
            return self._engine.finish_weight_update(version)

    # The collective sync from trainer rank 0 (actors.weights.sender.CollectiveHandOff).

    def weight_receivers(self) -> int:
        """How many processes join the weight group for this generator (vLLM: one per
        tensor-parallel rank; HF: this actor)."""
        return self._engine.weight_receivers

    def join_weight_group(self, address: dict, rank_offset: int) -> None:
        """Join the trainer's weight group as ranks `rank_offset ...`; blocks until the
        whole group has joined."""
        self._weight_group = None
        with self._engine_alive():
            self._engine.join_weight_group(address, rank_offset)
        self._weight_group = address["prefix"]

    def weight_group(self) -> Optional[str]:
        """The weight group this actor is in (None after a restart: it must join again)."""
        return self._weight_group

    def leave_weight_group(self) -> None:
        with self._engine_alive():
            self._engine.leave_weight_group()
        self._weight_group = None

    def prepare_weights(self, layout: dict, version: int, expire_s: float) -> None:
        """The first half of a collective sync, before the trainer sends any bucket: hold new
        calls back and wait for those in progress, check `layout` against the model and open
        the update in every process that holds weights (vLLM: `start_weight_update` in every
        worker). If it raises, nothing changed. A prepared sync whose `receive_weights` does
        not come within `expire_s` (the trainer gave up on it) is closed again."""
        self._begin_update("sync")
        try:
            with self._engine_alive():
                self._engine.prepare_receive(layout)
        except BaseException:
            self._end_update()
            raise
        self._syncs += 1
        self._sync = (layout, version, self._syncs)
        timer = threading.Timer(expire_s, self._expire, args=(self._syncs,))
        timer.daemon = True
        timer.start()

    def receive_weights(self, version: int) -> int:
        """The second half: receive the sync's buckets (straight into vLLM's workers, or into
        this process's HF model) and load them in place; returns `version`. If it fails, every
        worker's update is closed and the actor is stale until re-synced."""
        with self._cond:
            sync, self._sync = self._sync, None
        if sync is None or sync[1] != version:
            raise RuntimeError(f"receive_weights({version}) without prepare_weights for it")
        try:
            with self._engine_alive():
                self._engine.receive_weights(sync[0], version)
            self._stale = False
        except BaseException:
            self._stale = True
            with contextlib.suppress(Exception), self._engine_alive():
                self._engine.abort_receive()
            raise
        finally:
            self._end_update()
        return version

    def cancel_weights(self) -> None:
        """Close a prepared sync that will not be sent (the weights are unchanged)."""
        with self._cond:
            sync, self._sync = self._sync, None
        if sync is not None:
            try:
                with self._engine_alive():
                    self._engine.abort_receive()
            finally:
                self._end_update()

    def _expire(self, token: int) -> None:
        with self._cond:
            expired = self._sync is not None and self._sync[2] == token
        if expired:
            log.warning("generator: a prepared weight sync was never sent; closing it")
            self.cancel_weights()

    def reload_weights(self, checkpoint_dir: str, version: int) -> None:
        """Load a checkpoint directory's weights in place (the slow, simple fallback)."""
        with self._one_call_update():
            self._engine.reload_weights(checkpoint_dir, version)

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """The engine's weights by `state_dict` name (hf backend only; for tests)."""
        return self._engine.state_dict_numpy()


def make_generator_factory(model_path: str, sampling: SamplingConfig, gen: GeneratorConfig,
                           pool: PoolConfig, *, dtype: str = "float32",
                           label_selector: LabelSelector = anywhere) -> ActorFactory:
    """A zero-argument callable that starts one generator actor per call.

    `model_path` is a model directory every node can read (resolve `builtin:` names first);
    `dtype` is `model.dtype`; `label_selector()` names the nodes an actor may run on (asked per
    actor: nodes join and leave). Both backends run on CUDA when `pool.num_gpus > 0`, else on
    CPU."""
    common = dict(k=sampling.k, temperature=sampling.temperature, top_p=sampling.top_p,
                  max_new_tokens=sampling.max_new_tokens, seed=sampling.seed,
                  return_logprobs=sampling.return_logprobs, dtype=dtype)
    if gen.backend == "vllm":
        build = functools.partial(
            VLLMGenerationEngine, model_path, **common, use_gpu=pool.num_gpus > 0,
            tensor_parallel_size=pool.tensor_parallel_size,
            gpu_memory_utilization=gen.gpu_memory_utilization, kv_cache_gb=gen.kv_cache_gb,
            enforce_eager=gen.enforce_eager, max_model_len=gen.max_model_len)
        # Room for the pool's in-flight batches plus chats, weight calls and status reads.
        return ActorFactory(Generator, pool, (build,), label_selector=label_selector,
                            tensor_parallel=pool.tensor_parallel_size > 1,
                            max_concurrency=pool.max_in_flight + 4)
    if pool.tensor_parallel_size > 1:
        raise ValueError("pools.generator.tensor_parallel_size > 1 needs generator.backend "
                         f"'vllm' (got {gen.backend!r})")
    build = functools.partial(HFGenerationEngine, model_path, **common,
                              device="cuda" if pool.num_gpus > 0 else "cpu")
    return ActorFactory(Generator, pool, (build,), label_selector=label_selector)


class GeneratorPool(Pool):
    """Generator actors: prompts in, one record per prompt out.

    `prepare(actor)` replaces the built-in re-sync (the object-store buckets of the latest
    `broadcast_buckets`, or the checkpoint of the latest sync) run on every new or restarted
    actor before it takes work."""

    stage = "generate"

    def __init__(self, factory: Callable[[], ActorHandle], pool_cfg: PoolConfig,
                 prepare: Optional[Callable[[ActorHandle], None]] = None, *,
                 dispatcher_cls: type = ActorDispatcher):
        self._user_prepare = prepare
        self._buckets: Optional[list] = None  # ObjectRefs of the latest broadcast
        self._checkpoint: Optional[str] = None  # HF dir of the latest version's checkpoint
        self._written: Optional[Callable[[], Any]] = None  # waits until it is complete
        self._version = 0
        super().__init__(factory, pool_cfg, prepare=self._prepare,
                         dispatcher_cls=dispatcher_cls)

    def _call(self, actor: ActorHandle, batch: list[Prompt]) -> "ray.ObjectRef":
        return actor.generate.remote(batch)

    @staticmethod
    def _item_id(prompt: Prompt) -> str:
        return prompt.id

    @property
    def version(self) -> int:
        """The weight version every actor holds, or is brought to before it takes work."""
        return self._version

    def versions(self, timeout_s: float = 60.0) -> list[Optional[int]]:
        """Each live actor's weight version, in `actors()` order; None for an actor that
        cannot answer now (restarting after its process or engine died, or gone): a
        restarted actor is stale and refuses work, so the pool brings it to the current
        version before its next batch."""
        refs = [a.weight_version.remote() for a in self.actors()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out: list[Optional[int]] = []
        for ref in refs:
            try:
                out.append(ray.get(ref) if ref in ready else None)
            except RayActorError:  # ActorUnavailableError (restarting) included
                out.append(None)
        return out

    # ------------------------------------------------------------------ weights

    def broadcast_buckets(self, buckets: list, version: int,
                          checkpoint_dir: Optional[str] = None,
                          written: Optional[Callable[[], Any]] = None) -> None:
        """Load object-store buckets (ObjectRefs of `{name: array}`, put once, e.g. by
        trainer rank 0: `actors.weights.object_store`) into every actor; blocks until each
        holds `version` or has died (a dead one is synced before its next batch). The refs are
        kept to re-sync actors that join or restart later, and `checkpoint_dir` (the same
        weights on disk) for when the refs are gone with their owner; `written`, when given,
        blocks until that checkpoint is complete (it may still be being written). Call it
        between rounds."""
        with self._lock:  # no resize or chat pick in between: every actor gets the update
            if self._dispatcher.num_pending():
                raise RuntimeError(f"broadcast with {self._dispatcher.num_pending()} batch(es) "
                                   "pending: drain the pool first so no batch mixes two "
                                   "weight versions")
            self._buckets = list(buckets)
            self._version, self._checkpoint, self._written = version, checkpoint_dir, written
            for actor, ref in [(a, self._push(a)) for a in self._dispatcher.actors()]:
                try:
                    ray.get(ref)
                except RayActorError as exc:
                    # Restarted or replaced later; either way `_prepare` syncs it before work.
                    log.warning("generator %s died during the weight broadcast: %s", actor, exc)
                except ray.exceptions.RayError as exc:  # e.g. the buckets' owner died
                    if self._checkpoint is None:
                        raise
                    log.warning("generator %s could not load the object-store buckets of "
                                "version %d (%s); reloading %s", actor, version, exc,
                                self._checkpoint)
                    self._reload(actor)

    def mark_synced(self, version: int, checkpoint_dir: str,
                    written: Optional[Callable[[], Any]] = None) -> None:
        """Record a sync done outside the pool (the collective broadcast from trainer rank 0):
        actors that missed it, join or restart later reload `checkpoint_dir` to reach
        `version`, after `written()` (when given) says the checkpoint is complete."""
        with self._lock:
            self._version, self._buckets = version, None
            self._checkpoint, self._written = checkpoint_dir, written

    def ensure_synced(self) -> int:
        """Bring every live actor to the current version now (those that joined after a
        collective broadcast named its receivers reload the checkpoint); returns how many
        had to be brought."""
        brought = 0
        with self._lock:
            for actor in self._dispatcher.actors():
                try:
                    brought += bool(self._prepare(actor))
                except RayActorError as exc:  # restarted or replaced: prepared before work
                    log.warning("generator %s died while being synced: %s", actor, exc)
        return brought

    def _push(self, actor: ActorHandle) -> "ray.ObjectRef":
        # One call (a threaded vLLM actor does not keep the order of separate calls); the
        # refs go inside a list so the actor fetches one bucket at a time.
        return actor.load_buckets.remote(list(self._buckets or []), self._version)

    def _reload(self, actor: ActorHandle) -> None:
        """Reload the current version's checkpoint into `actor`, once it is complete."""
        if self._written is not None:  # the checkpoint may still be being written
            log.info("generator %s waits for the checkpoint %s to reload version %d",
                     actor, self._checkpoint, self._version)
            self._written()
            self._written = None
        ray.get(actor.reload_weights.remote(self._checkpoint, self._version))

    def _prepare(self, actor: ActorHandle) -> bool:
        """Bring `actor` to the current version; whether it had to be."""
        if self._user_prepare is not None:
            self._user_prepare(actor)
            return True
        version, stale = ray.get([actor.weight_version.remote(), actor.is_stale.remote()])
        if version == self._version and not stale:
            return False
        if self._buckets is not None:
            try:
                ray.get(self._push(actor))
                return True
            except RayActorError:
                raise
            except ray.exceptions.RayError as exc:  # e.g. the buckets' owner is gone
                if self._checkpoint is None:
                    raise
                log.warning("generator %s: the object-store buckets of version %d are gone "
                            "(%s); reloading %s", actor, self._version, exc, self._checkpoint)
        if self._checkpoint is not None:
            self._reload(actor)
            return True
        # Before any sync: an empty update (the weights it was built with are the current
        # ones) whose finish clears the stale flag.
        ray.get(self._push(actor))
        return True
