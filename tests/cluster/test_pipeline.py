"""Tests of `sppo/pipeline.py`: one streaming round through real pools on the local Ray cluster.

The accounting rule under test: every prompt of a round ends exactly once, as an annotated
prompt (its rows reached the sink) or as one `Failed` record whose stage and reason name the
cause. Nothing is dropped silently and nothing hangs.

- Real components: a `GeneratorPool` of HF engines on the tiny Llama and a `JudgePool` with the
  Python judge (`sppo.demo_judge:prefers_more_e`); with temperature 0 the HF engine decodes
  greedily, so its K responses are identical and every prompt is screened out.
- Scripted components, where a test needs to choose what the generations look like: real
  `Generator` actors and a real `GeneratorPool` whose engine is `ScriptedEngine` below, and a
  real `JudgePool` whose Python judge is `scripted_judge` below. Ray workers import this module
  by name (conftest puts the test folders on their PYTHONPATH). A prompt's id says what the
  scripted stages do with it: `ok-3`, `same-1`, `nan-0`, ...

Not here: the pools' own guarantees (tests/actors/test_pool.py), the trainer stream (a list
sink stands in for it), the load round (test_load.py).
"""

from __future__ import annotations

import math

import pytest
import ray

from actors.generator import Generator, GeneratorPool, make_generator_factory
from actors.judge import JudgePool, make_judge_factory
from sppo.config import GeneratorConfig, JudgeConfig, PoolConfig, SamplingConfig
from sppo.demo_judge import prefers_more_e
from cluster.pipeline import RoundPipeline, screen_generation
from sppo.records import Annotated, Failed, Generation, Prompt, TrainRow
from sppo.rows import rows_from_annotated

K = 3

# --------------------------------------------------------------------------- scripted stages

# What `ScriptedEngine` returns per kind of prompt: K responses as (token ids, text). The
# texts' share of "e"s sets the demo judge's preference; "tie" texts all have none.
RESPONSES = {
    "ok": [([11, 12], "three trees"), ([13], "sun"), ([14, 15], "a cat here")],
    "same": [([5, 6], "the same")] * K,
    "empty": [([], ""), ([7], "seven"), ([8], "eight")],
    "nan": [([11, 12], "three trees"), ([13], "sun"), ([14], "cat")],
    "judgeboom": [([11, 12], "three trees"), ([13], "sun"), ([14], "cat")],
    "tie": [([21], "ab"), ([22], "ba"), ([23], "cd")],
}
ENGINE_FAILS = "scripted engine: this prompt cannot be sampled"
TIE_REASON = "all win rates equal: no preference to learn"


def kind(prompt_id: str) -> str:
    return prompt_id.split("-")[0]


class ScriptedEngine:
    """A generation engine (the interface `actors.generator.Generator` drives) whose output is
    fixed by each prompt's kind: `fail` prompts get a `Failed` record, a batch holding a
    `boom` prompt raises, `alien` prompts come back under another prompt's id."""

    weight_version = 0

    def generate(self, prompts: list[Prompt]) -> list:
        out = []
        for p in prompts:
            k = kind(p.id)
            if k == "boom":
                raise ValueError(f"scripted engine raised on {p.id}")
            if k == "fail":
                out.append(Failed(p.id, "generate", ENGINE_FAILS))
                continue
            if k == "alien":  # an engine bug: a record for a prompt nobody asked for
                p = Prompt(id=p.id + "-ghost", text=p.text, token_ids=p.token_ids, raw=p.raw)
                k = "ok"
            ids, texts = zip(*RESPONSES[k])
            out.append(Generation(prompt=p, response_ids=[list(i) for i in ids],
                                  texts=list(texts), finish_reasons=["stop"] * K))
        return out


def scripted_judge(prompt: str, a: str, b: str) -> float:
    """The demo judge, except that it answers NaN for `nan` prompts and raises for
    `judgeboom` ones (the prompt text the judge sees is the prompt id)."""
    if kind(prompt) == "nan":
        return math.nan
    if kind(prompt) == "judgeboom":
        raise RuntimeError(f"scripted judge cannot compare for {prompt}")
    return prefers_more_e(prompt, a, b)


def to_rows(a: Annotated):
    if max(a.win_rates) - min(a.win_rates) < 1e-9:
        return TIE_REASON
    return rows_from_annotated(a, "pair")


def prompt(pid: str, token_ids=(3, 4, 5)) -> Prompt:
    return Prompt(id=pid, text=f"<|user|>\n{pid}<|end|>\n<|assistant|>\n",
                  token_ids=tuple(token_ids), raw=pid)


class ListSink:
    """Stands in for the trainer stream: keeps the rows it was handed."""

    def __init__(self):
        self.rows: list[TrainRow] = []
        self.calls = 0

    def __call__(self, rows: list[TrainRow]) -> None:
        self.calls += 1
        self.rows.extend(rows)


def judge_pool(function: str, batch_size: int = 2) -> JudgePool:
    cfg = PoolConfig(replicas=1, num_cpus=0.5, batch_size=batch_size, max_in_flight=2)
    return JudgePool(make_judge_factory(JudgeConfig(backend="python", function=function), cfg),
                     cfg)


@pytest.fixture(scope="module")
def scripted(ray_cluster):
    """(generator pool, judge pool) on the scripted stages. Generator batches of one prompt,
    so that a `boom` prompt takes no other prompt down with it."""
    gen_cfg = PoolConfig(replicas=2, num_cpus=0.5, batch_size=1, max_in_flight=2)
    actor_cls = ray.remote(Generator)

    def factory():
        return actor_cls.options(num_cpus=gen_cfg.num_cpus, max_restarts=0,
                                 max_task_retries=0).remote(ScriptedEngine)

    gens = GeneratorPool(factory, gen_cfg)
    judges = judge_pool("test_pipeline:scripted_judge")
    yield gens, judges
    gens.shutdown()
    judges.shutdown()


def run_round(gens, judges, prompts, **kw):
    sink = ListSink()
    reports: list[dict] = []
    pipe = RoundPipeline(gens, judges, sink, kw.pop("to_rows", to_rows),
                         generate_batch=kw.pop("generate_batch", 4), judge_batch=2,
                         progress=reports.append, progress_every_s=0.0, **kw)
    out = pipe.run(prompts)
    return out, sink, reports


def assert_each_prompt_once(prompts, out, sink):
    """Every prompt is annotated (with its rows in the sink) or failed, never both or twice."""
    ids = [p.id for p in prompts]
    failed = [f.prompt_id for f in out.failed]
    annotated = {r.prompt_id for r in sink.rows}
    assert len(failed) == len(set(failed)), "a prompt failed twice"
    assert not annotated & set(failed), "a prompt both annotated and failed"
    assert annotated | set(failed) == set(ids)
    assert out.prompts == len(ids) == out.annotated + len(out.failed)
    assert out.rows == len(sink.rows)
    return {f.prompt_id: f for f in out.failed}


# --------------------------------------------------------------------------- screening (no Ray)


def gen_of(response_ids) -> Generation:
    return Generation(prompt=prompt("x"), response_ids=response_ids,
                      texts=[str(r) for r in response_ids], finish_reasons=["stop"] * 3)


@pytest.mark.parametrize("response_ids,reason", [
    ([[1, 2], [1, 2], [1, 2]], "all 3 responses identical"),
    ([[1], [], [2]], "empty responses: 1 of 3 responses have no tokens"),
    ([[], [], []], "empty responses: 3 of 3 responses have no tokens"),  # empty wins
    ([[1, 2], [1, 2], [2, 1]], None),  # two alike are still a comparison
    ([[1], [1, 0], [2]], None),
])
def test_screen_generation(response_ids, reason):
    assert screen_generation(gen_of(response_ids)) == reason


# --------------------------------------------------------------------------- real HF generators


def hf_generators(model_dir: str, temperature: float) -> GeneratorPool:
    sampling = SamplingConfig(k=K, temperature=temperature, top_p=1.0, max_new_tokens=6, seed=0)
    cfg = PoolConfig(replicas=1, num_cpus=0.5, batch_size=4, max_in_flight=2)
    return GeneratorPool(make_generator_factory(model_dir, sampling, GeneratorConfig(), cfg), cfg)


@pytest.fixture(scope="module")
def tiny_prompts(tiny_llama_dir) -> list[Prompt]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    words = ["tree", "sun", "river", "garden", "evening", "water", "star", "forest"]
    out = []
    for n in range(16):
        raw = f"tell me about the {words[n % 8]} and the {words[(3 * n) % 8]}"
        text = tok.apply_chat_template([{"role": "user", "content": raw}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append(Prompt(id=f"p{n}", text=text, token_ids=tuple(ids), raw=raw))
    return out


def test_real_pools_account_for_every_prompt(ray_cluster, tiny_llama_dir, tiny_prompts):
    """16 good prompts and two the generator cannot take (no tokens; a token outside the
    vocabulary) through HF generators and the demo judge: the good ones end as training rows,
    the bad ones as `generate` failures saying why; progress is reported to the end."""
    bad = [prompt("no-tokens", token_ids=()), prompt("out-of-vocab", token_ids=(3, 99999))]
    prompts = tiny_prompts[:8] + bad + tiny_prompts[8:]
    gens = hf_generators(tiny_llama_dir, temperature=1.0)
    judges = judge_pool("sppo.demo_judge:prefers_more_e", batch_size=4)
    try:
        out, sink, reports = run_round(gens, judges, prompts, to_rows=lambda a: (
            rows_from_annotated(a, "pair")))
        assert gens.num_pending() == 0 and judges.num_pending() == 0
    finally:
        gens.shutdown()
        judges.shutdown()
    failed = assert_each_prompt_once(prompts, out, sink)
    assert set(failed) == {"no-tokens", "out-of-vocab"}
    assert failed["no-tokens"].stage == "generate"
    assert "empty prompt" in failed["no-tokens"].reason
    assert failed["out-of-vocab"].stage == "generate"
    assert "outside the vocabulary" in failed["out-of-vocab"].reason
    assert "99999" in failed["out-of-vocab"].reason
    # One pair row per annotated prompt, its chosen response the judge's favourite.
    assert out.annotated == 16 and sorted(r.prompt_id for r in sink.rows) == sorted(
        p.id for p in tiny_prompts)
    assert all(r.is_pair and r.chosen_p >= r.rejected_p for r in sink.rows)
    assert out.generated == 16 and 0 < out.response_tokens <= 16 * K * 6
    # Progress: reported while running and once at the end, counting up to every prompt.
    done = [r["prompts_done"] for r in reports]
    assert done == sorted(done) and done[-1] == len(prompts)
    assert reports[-1]["failed"] == 2 and reports[-1]["judged"] == 16
    assert out.summary()["failed_by_reason"] == {"generate: empty prompt (no token ids)": 1,
                                                 "generate: token ids outside the vocabulary "
                                                 "of 512": 1}


def test_identical_greedy_responses_are_screened_before_judging(ray_cluster, tiny_llama_dir,
                                                                tiny_prompts):
    """Temperature 0: the HF engine decodes once and copies the response K times. No pair of
    them carries a preference, so every prompt fails at `generate` with that reason and the
    judge and the sink never see one."""
    gens = hf_generators(tiny_llama_dir, temperature=0.0)
    judged = []
    judges = judge_pool("sppo.demo_judge:prefers_more_e")
    try:
        out, sink, _ = run_round(gens, judges, tiny_prompts[:6],
                                 to_rows=lambda a: judged.append(a) or [])
    finally:
        gens.shutdown()
        judges.shutdown()
    failed = assert_each_prompt_once(tiny_prompts[:6], out, sink)
    assert {(f.stage, f.reason) for f in failed.values()} == {
        ("generate", f"all {K} responses identical")}
    assert out.generated == 6 and judged == [] and sink.calls == 0 and out.judge_busy_s == 0


# --------------------------------------------------------------------------- scripted stages


def test_every_kind_of_bad_output_is_reported_once(scripted):
    """Good prompts interleaved with every way a prompt can fail after the data stage; each
    ends in the stage where it failed with a reason that names the cause."""
    gens, judges = scripted
    kinds = ["ok", "same", "ok", "empty", "nan", "ok", "tie", "fail", "ok", "boom",
             "judgeboom", "ok"]
    prompts = [prompt(f"{k}-{n}") for n, k in enumerate(kinds)]
    recorded: list = []  # what the round journal sees
    out, sink, reports = run_round(gens, judges, prompts,
                                   record=lambda rec, rows: recorded.append((rec, rows)))
    failed = assert_each_prompt_once(prompts, out, sink)
    # The record hook saw every prompt once, as it was accounted: the failures with no rows,
    # the annotated ones with exactly the rows the sink got.
    assert sorted(r.prompt_id if isinstance(r, Failed) else r.prompt.id
                  for r, _ in recorded) == sorted(p.id for p in prompts)
    assert {r.prompt_id: r for r, rows in recorded if isinstance(r, Failed) and not rows} == \
        {f.prompt_id: f for f in out.failed}
    assert [row for r, rows in recorded if isinstance(r, Annotated) for row in rows] == sink.rows
    got = {pid: (f.stage, f.reason) for pid, f in failed.items()}
    assert got.pop("same-1") == ("generate", f"all {K} responses identical")
    assert got.pop("empty-3") == ("generate", f"empty responses: 1 of {K} responses have no "
                                              "tokens")
    assert got.pop("tie-6") == ("select", TIE_REASON)
    assert got.pop("fail-7") == ("generate", ENGINE_FAILS)
    stage, reason = got.pop("boom-9")
    assert stage == "generate" and "ValueError" in reason
    assert "scripted engine raised on boom-9" in reason
    stage, reason = got.pop("nan-4")
    assert stage == "judge" and "judge logits not finite" in reason
    assert f"{K * (K - 1)} of {K * (K - 1)} off-diagonal entries are NaN/inf" in reason
    stage, reason = got.pop("judgeboom-10")
    assert stage == "judge" and "scripted judge cannot compare for judgeboom-10" in reason
    assert got == {}
    assert sorted(r.prompt_id for r in sink.rows) == ["ok-0", "ok-11", "ok-2", "ok-5", "ok-8"]
    # The "e"-richest response is chosen, the one without an "e" rejected.
    assert {(tuple(r.chosen_ids), tuple(r.rejected_ids)) for r in sink.rows} == {
        ((11, 12), (13,))}
    # Generated = every generation record that came back (not the engine's own failures).
    assert out.generated == len(prompts) - 2
    assert out.failed_by_reason()["generate: all 3 responses identical"] == 1
    assert reports[-1]["prompts_done"] == len(prompts) and reports[-1]["failed"] == 7


def test_a_round_of_only_bad_prompts_ends(scripted):
    """No prompt reaches the sink: the round still ends, every prompt failed with its reason."""
    gens, judges = scripted
    prompts = [prompt(f"{k}-{n}") for n, k in enumerate(["same", "fail", "boom", "nan"])]
    out, sink, reports = run_round(gens, judges, prompts)
    failed = assert_each_prompt_once(prompts, out, sink)
    assert [failed[p.id].stage for p in prompts] == ["generate", "generate", "generate", "judge"]
    assert sink.calls == 0 and out.annotated == 0 and reports[-1]["prompts_done"] == 4


def test_empty_round(scripted):
    gens, judges = scripted
    out, sink, reports = run_round(gens, judges, [])
    assert (out.prompts, out.annotated, out.failed, sink.calls) == (0, 0, [], 0)
    assert reports[-1]["prompts_done"] == 0


def test_duplicate_prompt_ids_are_refused_before_any_work(scripted):
    gens, judges = scripted
    prompts = [prompt("ok-0"), prompt("ok-1"), prompt("ok-0")]
    with pytest.raises(ValueError, match="prompt ids must be unique within a round"):
        run_round(gens, judges, prompts)
    assert gens.num_pending() == 0 and judges.num_pending() == 0  # nothing was submitted


def test_duplicate_prompt_id_error_names_the_id(scripted):
    gens, judges = scripted
    with pytest.raises(ValueError, match="ok-0"):
        run_round(gens, judges, [prompt("ok-0"), prompt("ok-1"), prompt("ok-0")])


def test_an_engine_exception_is_reported_as_its_own_message(scripted):
    gens, judges = scripted
    out, _, _ = run_round(gens, judges, [prompt("boom-0")])
    assert [(f.stage, f.reason) for f in out.failed] == [
        ("generate", "ValueError: scripted engine raised on boom-0")]
    assert out.failed_by_reason() == {"generate: ValueError": 1}


def test_a_record_for_a_prompt_not_in_the_round_is_an_error(scripted):
    """An engine that answers under the wrong prompt id must not make the accounting look
    complete: the record's id is not one of the round's, and `alien-1` never comes back."""
    gens, judges = scripted
    prompts = [prompt("ok-0"), prompt("alien-1"), prompt("ok-2")]
    try:
        with pytest.raises(RuntimeError, match="alien-1-ghost"):
            run_round(gens, judges, prompts)
    finally:
        # Whatever happened, leave the shared pools empty for the next test.
        gens.drain()
        judges.drain()
