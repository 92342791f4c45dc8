"""The memory plan (`sppo.plan`), `python -m sppo.driver --plan`, and the driver's memory check.

The shipped configs must plan offline and fit 8 GPUs of 80 GiB; a 70B policy on the Mistral
config's 4 trainer ranks must be refused, naming the trainer and the field to change; an LLM
judge is sized as a vLLM engine, as a generator is. Figures
are checked against hand computations (in the tests' docstrings), and the activation formula
against what autograd really saves in a small bf16 Llama.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cluster.launch
from sppo.config import load_config
from cluster.launch import check_memory
from sppo.driver import main
from sppo.model_facts import model_facts
from sppo.plan import GIB, activation_bytes, build_plan, gpu_memory_gib

REPO = Path(__file__).resolve().parents[2]
MISTRAL = REPO / "configs" / "mistral7b-ultrafeedback.yaml"
LLAMA3 = REPO / "configs" / "llama3-8b-ultrafeedback.yaml"
DEMO = REPO / "configs" / "demo.yaml"
LLM_JUDGE = REPO / "configs" / "llama3-8b-llm-judge.yaml"
GPM = REPO / "configs" / "llama3-8b-gpm.yaml"
LLAMA_70B = "model.path=meta-llama/Llama-3.1-70B-Instruct"
P_MISTRAL = 7_241_732_096  # tests/sppo/test_model_facts.py
P_LLAMA3_8B = 8_030_261_248  # Llama-3.1-8B-Instruct too


def _plan(config: Path, *overrides: str, gib: float = 80.0):
    return build_plan(load_config(config, list(overrides)), gib)


def _role(plan, name: str):
    return next(r for r in plan.roles if r.name == name)


def _line(role, item: str) -> float:
    return next(b for i, _, b in role.lines if i == item)


def _driver(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sppo.driver", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- --plan


@pytest.mark.parametrize("config", [MISTRAL, LLAMA3, LLM_JUDGE, GPM, DEMO],
                         ids=lambda p: p.stem)
def test_shipped_configs_plan_offline(config):
    out = _driver("--plan", "--config", str(config))
    assert out.returncode == 0, out.stderr
    for role in ("trainer:", "generator:", "judge:"):
        assert f"\n{role}" in out.stdout
    assert "host RAM while loading" in out.stdout
    if config == DEMO:  # CPU only: host RAM, nothing checked against a GPU
        assert "no role on a GPU" in out.stdout and "fits: no role uses a GPU" in out.stdout
    else:
        assert out.stdout.count(" of 80.0 GiB: fits") == 3
        assert "fits: 8 GPUs of 80 GiB" in out.stdout


def test_70b_on_the_mistral_config_is_refused_naming_the_trainer():
    out = _driver("--plan", "--config", str(MISTRAL), LLAMA_70B)
    assert out.returncode == 2
    assert "does not fit 8 GPUs of 80 GiB" in out.stderr
    assert "trainer: needs" in out.stderr and "raise trainer.num_workers to >= " in out.stderr
    assert "DOES NOT FIT" in out.stdout  # the table is still printed


def test_too_few_gpus_and_smaller_gpus_are_refused():
    out = _driver("--plan", "--config", str(MISTRAL), "--gpus", "4")
    assert out.returncode == 2 and "pools.generator" in out.stderr and "has 4" in out.stderr
    # Llama-3-8B needs ~56 GiB per trainer rank: fits 80 GiB, not a 24 GiB L4.
    out = _driver("--plan", "--config", str(LLAMA3), "--gpu-memory-gb", "22.4")
    assert out.returncode == 2 and "trainer: needs" in out.stderr
    out = _driver("--plan", "--config", str(LLAMA3), "run.gpu_memory_gb=22.4")
    assert out.returncode == 2 and "22.4 GiB" in out.stderr


def test_plan_refusal_starts_nothing(monkeypatch, tmp_path, capsys):
    def connect_ray(cfg):
        raise AssertionError("--plan started Ray")

    monkeypatch.setattr(cluster.launch, "connect_ray", connect_ray)
    assert main(["--plan", "--config", str(MISTRAL), LLAMA_70B,
                 f"run.output_dir={tmp_path}"]) == 2
    assert "trainer.num_workers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert main(["--plan", "--config", str(MISTRAL), "model.path=/no/such/model"]) == 2
    assert "model.path: '/no/such/model' is not a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- the figures


def test_mistral_trainer_rank_by_hand():
    """Mistral-7B, P = 7,241,732,096, on 4 ranks, bf16, RMSprop, frozen reference, checkpointing,
    8192 tokens per micro-batch (the shipped config: four pairs of 1024):
    - shards: params 4P/4 + grads 4P/4 + RMSprop 4P/4 + bf16 reference 2P/4 = 3.5P = 23.6 GiB;
    - gathered: root R = 2 x 32000 x 4096 + 4096 = 262,148,096, block B = 218,112,000:
      policy 2(R + 2B) + block grads 6B + reference 2(R + 2B) = 4.10e9 B = 3.82 GiB;
    - activations: 8192 x (32 x 2 x 4096 + one block 221,184 + head 32,768) = 3.94 GiB;
    - logits: 12 x 8192 x 32000 = 2.93 GiB;
    total = 1.1 x 36.82e9 B + 2 GiB = 39.72 GiB, inside 80 GiB."""
    trainer = _role(_plan(MISTRAL), "trainer")
    assert _line(trainer, "parameters") == _line(trainer, "gradients") == P_MISTRAL
    assert _line(trainer, "reference") == P_MISTRAL / 2
    assert _line(trainer, "gathered") == 2 * (262_148_096 + 2 * 218_112_000) \
        + 6 * 218_112_000 + 2 * (262_148_096 + 2 * 218_112_000)
    assert _line(trainer, "activations") == 8192 * (32 * 2 * 4096 + 221_184 + 32_768)
    assert _line(trainer, "logits") == 12 * 8192 * 32000
    assert trainer.total / GIB == pytest.approx(39.72, abs=0.01)
    assert not trainer.problems


def test_trainer_figure_moves_the_right_way():
    def gib(*overrides: str) -> float:
        return _role(_plan(MISTRAL, *overrides), "trainer").total / GIB

    base = gib()
    assert gib("trainer.num_workers=2") > base > gib("trainer.num_workers=8")
    assert gib("trainer.activation_checkpointing=false") > base + 40  # 54 vs 3.9 GiB
    assert gib("trainer.optimizer=adamw") > base
    assert gib("trainer.reference=sampled", "sampling.return_logprobs=true") < base
    assert gib("trainer.reshard_after_forward=false") > base
    assert gib("trainer.micro_batch_tokens=16384") > base > gib("trainer.micro_batch_tokens=0")


def test_generator_kv_cache_by_hand():
    """0.85 x 80 GiB = 73,014,444,032 B, minus 2 GiB reserve and 2P bf16 weights, leaves
    56,383,496,192 B; a token takes 2 x 32 layers x 8 KV heads x 128 x 2 B = 128 KiB, so the
    cache holds 430,172 tokens = 420 sequences of 512 + 512 tokens."""
    gen = _role(_plan(MISTRAL), "generator")
    assert _line(gen, "KV cache") == 0.85 * 80 * GIB - 2 * GIB - 2 * P_MISTRAL
    assert any("128.0 KiB per token" in n and "holds 420 sequences of 1024 tokens" in n
               for n in gen.notes)
    tp2 = _role(_plan(MISTRAL, "pools.generator.tensor_parallel_size=2"), "generator")
    assert _line(tp2, "weights") == P_MISTRAL  # 2P bytes over 2 ranks


def test_generator_weights_beyond_one_gpu_name_tensor_parallel_size():
    """Llama-3.1-70B in bf16 is 131 GiB: no 80 GiB GPU holds it (TP 1); at TP 4 a shard is
    33 GiB and the KV cache holds its 131,072-token max_model_len (80 KiB a token per GPU)."""
    problems = _plan(MISTRAL, LLAMA_70B).problems
    gen = [p for p in problems if p.startswith("generator:")]
    assert gen and "raise pools.generator.tensor_parallel_size to >= 4" in gen[0]
    tp4 = _plan(MISTRAL, LLAMA_70B, "pools.generator.tensor_parallel_size=4")
    assert not _role(tp4, "generator").problems


def test_kv_cache_short_of_max_model_len_names_it():
    """Mistral on a 22.4 GiB GPU: 0.85 x 22.4 - 2 - 13.5 = 3.55 GiB of KV cache = 29k tokens,
    short of the model's 32,768 positions: vLLM would refuse to start."""
    gen = _role(_plan(MISTRAL, gib=22.4), "generator")
    assert any("generator.max_model_len" in p for p in gen.problems)
    fixed = _role(_plan(MISTRAL, "generator.max_model_len=1024", gib=22.4), "generator")
    assert not fixed.problems


def test_judge_batch_too_large_names_judge_batch_size():
    judge = _role(_plan(MISTRAL, "judge.batch_size=4096"), "judge")
    assert judge.problems and "judge.batch_size" in judge.problems[0]


def test_llm_judge_weights_per_shard_and_kv_cache_by_hand():
    """configs/llama3-8b-llm-judge.yaml's judge, Llama-3.1-8B-Instruct in bf16 on vLLM: 2P =
    16,060,522,496 B of weights per GPU at TP 1, P at TP 2. KV cache at TP 1: 0.85 x 80 GiB
    - 2 GiB reserve - 2P = 54,806,437,888 B at 2 x 32 layers x 8 KV heads x 128 x 2 B =
    128 KiB a token; at TP 2 each GPU holds 4 of the 8 KV heads (64 KiB a token) and P of
    weights. A judge prompt: 512 + 2 x 512 + the templates' tokens + 1."""
    tp1 = _role(_plan(LLM_JUDGE), "judge")
    tp2 = _role(_plan(LLM_JUDGE, "pools.judge.tensor_parallel_size=2"), "judge")
    assert _line(tp1, "weights") == 2 * P_LLAMA3_8B
    assert _line(tp2, "weights") == P_LLAMA3_8B
    assert _line(tp1, "KV cache") == 0.85 * 80 * GIB - 2 * GIB - 2 * P_LLAMA3_8B
    assert _line(tp2, "KV cache") == 0.85 * 80 * GIB - 2 * GIB - P_LLAMA3_8B
    assert tp1.processes == 2 and tp2.processes == 4  # 2 judges x TP ranks
    (note,) = [n for n in tp1.notes if n.startswith("KV cache:")]
    held, seq = map(int, re.search(r"holds (\d+) judge prompts of (\d+) tokens", note).groups())
    assert "128.0 KiB per token" in note and 512 + 2 * 512 + 1 < seq < 512 + 2 * 512 + 400
    assert held == (0.85 * 80 * GIB - 2 * GIB - 2 * P_LLAMA3_8B) // (128 * 1024 * seq)
    assert "in flight at most 640" in note  # 16 prompts x 2 in flight x 5 x 4 ordered pairs
    assert not tp1.problems and not tp2.problems


def test_llm_judge_on_a_small_gpu_names_the_judge_fields(capsys):
    """15 GiB (a T4): 0.85 x 15 = 12.75 GiB < 15 GiB of bf16 weights + 2 GiB reserve, so the
    judge (as the generator) needs TP >= 2. 22.4 GiB (an L4) without judge.max_model_len: the
    2.1 GiB KV cache left cannot hold the model's 131,072 positions (16 GiB)."""
    assert main(["--plan", "--config", str(LLM_JUDGE), "--gpu-memory-gb", "15"]) == 2
    err = capsys.readouterr().err
    (judge,) = [line for line in err.splitlines() if line.strip().startswith("judge:")]
    assert "exceed judge.gpu_memory_utilization" in judge
    assert "raise pools.judge.tensor_parallel_size to >= 2" in judge
    assert main(["--plan", "--config", str(LLM_JUDGE), "--gpu-memory-gb", "22.4",
                 "judge.max_model_len=null"]) == 2
    err = capsys.readouterr().err
    (judge,) = [line for line in err.splitlines() if line.strip().startswith("judge:")]
    assert "max_model_len 131072" in judge and "set judge.max_model_len" in judge
    # A shorter judge context than its prompts is not refused (those prompts fail) but noted.
    judge = _role(_plan(LLM_JUDGE, "judge.max_model_len=1024"), "judge")
    assert not judge.problems and any("judge.max_model_len 1024 is under" in n
                                      for n in judge.notes)


@pytest.mark.parametrize("hidden,intermediate", [(256, 1024), (512, 1536)])
def test_activation_formula_matches_what_autograd_saves(hidden, intermediate):
    """Bytes of the distinct non-parameter tensors autograd saves in a bf16 Llama forward
    (padded batch, SDPA), against `activation_bytes` without checkpointing: within 10%."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(model_type="llama", vocab_size=256, hidden_size=hidden,
                  intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    conf = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"},
                       attn_implementation="sdpa")
    model = LlamaForCausalLM(conf).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    batch, length = 2, 256
    ids = torch.randint(0, 256, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, : length // 4] = 0  # left padding, as in a training micro-batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    facts = model_facts(config, "tiny", "test", "model.path")
    estimate = activation_bytes(facts, 2, batch * length, checkpointing=False)
    assert sum(saved.values()) == pytest.approx(estimate, rel=0.10)


# --------------------------------------------------------------------------- the cluster


def _node(gpus: float, *types: str, role: str | None = None, alive: bool = True) -> dict:
    resources = {"CPU": 64.0, "GPU": gpus, **{f"accelerator_type:{t}": 1.0 for t in types}}
    return {"Alive": alive, "Resources": resources, "Labels": {"role": role} if role else {}}


def test_gpu_memory_from_accelerator_types():
    assert gpu_memory_gib([_node(8, "H100")]) == (79.6, "accelerator type H100")
    assert gpu_memory_gib([_node(8, "H100"), _node(1, "L4"), _node(0)])[0] == 22.4  # smallest
    assert gpu_memory_gib([_node(8, "A100", "A100-80G")])[0] == 80.0
    assert gpu_memory_gib([_node(8, "H100"), _node(8, "L4", alive=False)])[0] == 79.6
    memory, how = gpu_memory_gib([_node(8, "A100")])  # 40 or 80 GB: unknown
    assert memory is None and "A100" in how
    assert gpu_memory_gib([_node(8)]) == (None, "a GPU node reports no accelerator_type")
    assert gpu_memory_gib([_node(0)]) == (None, "no GPU nodes")


def test_check_memory_against_the_cluster(caplog):
    eight = [_node(8, "H100")]
    assert check_memory(load_config(MISTRAL), eight) == []
    problems = check_memory(load_config(MISTRAL, [LLAMA_70B]), eight)
    assert problems and problems[0].startswith("trainer: needs")
    # Unknown memory: a warning, nothing refused; run.gpu_memory_gb makes it checkable.
    with caplog.at_level(logging.WARNING, logger="sppo.driver"):
        assert check_memory(load_config(MISTRAL, [LLAMA_70B]), [_node(8, "A100")]) == []
    assert "run.gpu_memory_gb" in caplog.text
    assert check_memory(load_config(MISTRAL, [LLAMA_70B, "run.gpu_memory_gb=80"]),
                        [_node(8, "A100")])
    assert check_memory(load_config(DEMO), []) == []  # CPU only: nothing to check


def test_check_memory_role_by_role_on_a_labelled_cluster():
    """cluster/ray-cluster.yaml's layout: trainer and generators on L40S (44.9 GiB), the judge
    on an A10G (22.4 GiB). Mistral's trainer (~40 GiB) fits; Llama-3-8B's (~56 GiB, the
    fp32 logits of its 128k vocabulary) does not, and only the trainer is named."""
    nodes = [_node(0, role="head"), _node(4, "L40S", role="trainer"),
             *[_node(1, "L40S", role="generator") for _ in range(3)],
             _node(1, "A10G", role="judge")]
    assert check_memory(load_config(MISTRAL), nodes) == []
    problems = check_memory(load_config(LLAMA3), nodes)
    assert [p.split(":")[0] for p in problems] == ["trainer"]
    assert "44.9 GiB available" in problems[0]


def test_driver_refuses_before_any_actor(monkeypatch, tmp_path, capsys):
    """A run of the 70B on one 8 x H100 node stops right after connecting, before SelfPlay
    (which starts every actor) is built, and writes nothing."""
    import ray

    node = _node(8, "H100")
    monkeypatch.setattr(cluster.launch, "connect_ray", lambda cfg: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(node["Resources"]))
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    monkeypatch.setattr(cluster.launch, "check_gpu_nodes", lambda nodes: [])  # no Ray here

    def no_actors(*args, **kwargs):
        raise AssertionError("the driver went on to start the job")

    monkeypatch.setattr(cluster.launch, "SelfPlay", no_actors)
    assert main(["--config", str(MISTRAL), LLAMA_70B, f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the cluster (GPU memory" in err and "trainer.num_workers" in err
    assert not any(tmp_path.iterdir())


def test_the_end_of_a_round_on_the_trainer_nodes_host_ram_and_disk():
    """The trainer nodes' host RAM at the load and at the end of a round, and the disk, by
    hand: Llama-3.1-70B (70.6B parameters, bf16 checkpoint, vocab 128256 x 8192) on the Mistral
    config's 4 trainer ranks, all in one 256 GiB pod: each rank reads 2P/4 of checkpoint pages
    and a 4 x V x h buffer at load; the end of a round adds at most the consolidation's one
    embedding read and written (2 x 2 x V x h), no shard and no model. It fits, where the full
    gather it replaced (4P + 2P on rank 0) would not."""
    cfg = load_config(MISTRAL, [LLAMA_70B, "run.trainer_node_memory_gb=256"])
    plan = build_plan(cfg, 80.0, ranks_per_node=4)
    host, m = plan.host, plan.models[0]
    p, vh = m.params, m.vocab * m.hidden
    assert host.load == pytest.approx(2 * p / 4 + 4 * vh)
    assert host.end_of_round == pytest.approx(2 * 2 * vh)
    assert host.node_load == pytest.approx(4 * host.load) and host.node_load < 256 * GIB
    assert host.full_gather == pytest.approx(6 * p) and host.full_gather > 256 * GIB
    assert not host.problems
    text = plan.format()
    assert "end of round" in text and "256.0 GiB per node: fits" in text
    assert host.disk_round == pytest.approx(6 * p) and host.disk_writing == pytest.approx(8 * p)
    # A 128 GiB pod holds the end of a round but not the load of 4 such shards at once.
    small = build_plan(load_config(MISTRAL, [LLAMA_70B, "run.trainer_node_memory_gb=128"]),
                       80.0, ranks_per_node=4)
    (problem,) = small.host.problems
    assert problem.startswith("trainer: each trainer node needs 147.1 GiB of host RAM at the "
                              "load (4 ranks x 36.8 GiB), 128.0 GiB available")
    # Too little disk for one round's checkpoint names run.output_dir.
    tight = build_plan(cfg, 80.0, ranks_per_node=4, disk_free=100 * GIB)
    assert tight.host.problems[0].startswith("run.output_dir: one round's checkpoint needs")


def test_plan_prints_the_end_of_round_on_the_mistral_config(capsys):
    assert main(["--plan", "--config", str(MISTRAL)]) == 0
    out = capsys.readouterr().out
    assert "trainer host RAM per node" in out and "end of round" in out
    assert "disk in run.output_dir" in out


def test_gpm_judge_by_hand():
    """GPM-Llama-3.1-8B (its config.json: the Llama-3.1-8B backbone's) in bf16: the weights,
    and one layer's tensors for the token budget of (prompt, response) rows; a budget too
    large for the GPU names judge.max_batch_tokens."""
    judge = _role(_plan(GPM), "judge")
    h, i = 4096, 14336
    assert _line(judge, "weights") == P_LLAMA3_8B * 2
    assert _line(judge, "activations") == 32768 * (7 * h + i) * 2
    (problem,) = _plan(GPM, "judge.max_batch_tokens=1000000", gib=40.0).problems[-1:]
    assert problem.startswith("judge: needs") and "lower judge.max_batch_tokens" in problem
