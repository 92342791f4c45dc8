"""Memory plan: what each role needs per device, estimated from the models' `config.json` only.
Over 400 lines: the formulas, written out below, are the plan's specification.

`build_plan(cfg, gpu_memory)` reads the policy's and the judge's `config.json` (no weights),
counts their parameters from the architecture, and estimates per device: the trainer rank
(FSDP2 shards, gathered blocks, activations, logits), each vLLM or HF generator (weights per
tensor-parallel shard and what is left for the KV cache), the judge (PairRM or a reward model:
weights and one batch's activations; an LLM judge: a vLLM engine, as a generator), plus the
host RAM each process needs while it loads. `Plan.problems` names the role that runs out and
the config fields to change; `Plan.format()` is the table printed by
`python -m sppo.driver --plan`. The driver runs the same plan against the cluster's GPUs, whose
memory `gpu_memory_gib` reads from Ray's `accelerator_type:<X>` node resources.

Models come from `sppo.model_facts` (each `config.json` found locally, in this repository's
`configs/models/`, or on the hub, and the parameters counted from the architecture).

The formulas (bytes; P parameters, N = trainer.num_workers, c = compute-dtype bytes: 2 for bf16
mixed precision, else 4; T = micro-batch tokens per rank; h hidden, I intermediate, L layers,
q = heads x head_dim, V vocabulary):
- trainer shards: parameters 4P/N and gradients 4P/N (fp32 masters), optimizer state 4P/N per
  state (RMSprop 1, AdamW 2), frozen reference cP/N;
- gathered: c x (root + 2 blocks) for the policy (root = embeddings, final norm, lm_head,
  gathered forward to backward; a block plus the prefetched next one; all blocks with
  `reshard_after_forward: false`), one block's unsharded gradient (c, plus its fp32 copy for the
  reduce-scatter under bf16), and the reference's root + 2 blocks during its forward;
- activations per token and decoder block, what autograd saves in transformers' Llama/Mistral
  block with SDPA (no T^2 term): 8h (both RMSNorms' fp32 inputs) + c(4h + 5q + 4I) (normed
  states, q, and k and v counted at all heads (an upper bound under grouped-query attention),
  the attention output twice, the four MLP tensors).
  Measured against `saved_tensors_hooks` on small bf16 Llamas: within 7%. With activation
  checkpointing: each block's input (c x h) plus one block recomputed. Plus the final norm's.
- logits: 3 fp32 copies of T x V (the log-softmax input kept for backward, its gradient, the
  reference's logits): an upper estimate;
- margin: 2 GiB on a GPU (CUDA context, NCCL buffers) + 10% of the rest (allocator
  fragmentation);
- vLLM (generators, and LLM judges with the `judge.*` fields): weights P x dtype / TP; 2 GiB
  reserved for its profiled activation peak and CUDA graphs (an estimate); KV cache =
  `gpu_memory_utilization` x GPU memory (or `kv_cache_gb`) minus those, at
  2 x L x max(1, kv_heads / TP) x head_dim x dtype bytes per token, reported as sequences of
  `data.max_prompt_length + sampling.max_new_tokens` tokens for a generator and judge prompts
  of `data.max_prompt_length + 2 x judge.max_response_tokens` + the templates' tokens (the
  Jinja file at ~3 characters a token + 64 for the chat template) + 1 for an LLM judge;
- PairRM or reward-model judge: weights + one layer's tensors for `judge.batch_size` packed
  pairs of `source_max_length + 2 x candidate_max_length` tokens, T x (7h + I) x dtype bytes
  (PairRM's engine attends a few heads of one pair at a time: no T^2 term worth counting); a
  GPM judge the same for `judge.max_batch_tokens` tokens of (prompt, response) rows;
- host RAM at load: a trainer rank (`sppo.plan_host`, with the trainer nodes' RAM at the end of a
  round and the run directory's disk); a vLLM worker streams tensors (one at a time); an
  HF generator holds its weights; llm-blender builds the ranker in fp32 and loads its fp32
  state dict (2 x 4 bytes per parameter).

Everything is an estimate, not a measurement of a run: the plan refuses what clearly cannot fit.
Not here: Ray (the driver passes node dicts in) and GPU counts (`cluster.placement`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sppo.config import DEFAULT_JUDGE_TEMPLATE, Config, GeneratorConfig, JudgeConfig, PoolConfig
from sppo.model_facts import ModelFacts, judge_facts, load_model_config, model_facts
from sppo.plan_host import TrainerHost, trainer_host

__all__ = ["GIB", "ACCELERATOR_MEMORY_GIB", "Role", "Plan", "build_plan", "activation_bytes",
           "gpu_memory_gib", "gpu_roles"]

GIB = 2**30
GPU_CONTEXT = 2 * GIB
FRAGMENTATION = 0.10
VLLM_RESERVE = 2 * GIB
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# GiB per GPU by Ray's `accelerator_type:<X>` resource: approximately nvidia-smi's
# memory.total, rounded down, of the smallest card sold under the name (H100: the 80 GB
# PCIe/SXM, not the 94 GB NVL). "A100" (40 or 80 GB) and "V100" (16 or 32 GB) are ambiguous:
# set run.gpu_memory_gb, or label the nodes A100-40G / A100-80G as Ray's docs suggest.
ACCELERATOR_MEMORY_GIB = {
    "A100-40G": 39.5, "A100-80G": 80.0, "H100": 79.6, "H200": 139.0, "H20": 95.5,
    "B200": 179.0, "L4": 22.4, "L40S": 44.9, "A10G": 22.4, "T4": 15.0,
}


# --------------------------------------------------------------------------- roles


@dataclass
class Role:
    """One role's estimate per device (a GPU, or host RAM when `on_gpu` is false)."""

    name: str
    title: str
    on_gpu: bool
    lines: list[tuple[str, str, float]] = field(default_factory=list)  # item, detail, bytes
    notes: list[str] = field(default_factory=list)
    available: Optional[float] = None  # bytes per device; None: not known or not checked
    host_load: float = 0.0  # host bytes per process while loading
    processes: int = 1
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(b for _, _, b in self.lines)


def _margin(role: Role) -> None:
    fixed = GPU_CONTEXT if role.on_gpu else 0
    detail = (f"{fixed // GIB} GiB CUDA context + " if fixed else "") + \
        f"{FRAGMENTATION:.0%} fragmentation"
    role.lines.append(("margin", detail, fixed + FRAGMENTATION * role.total))


def _tokens(cfg: Config) -> tuple[int, str]:
    t = cfg.trainer
    if t.micro_batch_tokens > 0:
        return t.micro_batch_tokens, "trainer.micro_batch_tokens"
    seqs = 2 if t.selection == "pair" else 1
    return (t.micro_batch_size * t.max_length * seqs,
            f"micro_batch_size {t.micro_batch_size} x max_length {t.max_length}"
            + (" x 2 (pairs)" if seqs == 2 else ""))


def activation_bytes(m: ModelFacts, c: int, tokens: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for `tokens` tokens through the decoder blocks and the final norm
    in compute dtype of `c` bytes (the formulas in the module docstring; logits not included).
    """
    block = 8 * m.hidden + c * (4 * m.hidden + 5 * m.heads * m.head_dim + 4 * m.intermediate)
    head = 4 * m.hidden + 2 * c * m.hidden  # the final norm's fp32 input, its outputs
    blocks = m.layers * c * m.hidden + block if checkpointing else m.layers * block
    return tokens * (blocks + head)


def _trainer(cfg: Config, m: ModelFacts, memory: Optional[float]) -> Role:
    t = cfg.trainer
    n, p = t.num_workers, m.params
    bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and t.use_gpu)
    c, cname = (2, "bf16") if bf16 else (4, "fp32")
    states = 1 if t.optimizer == "rmsprop" else 2
    tokens, how = _tokens(cfg)
    blocks = 2 if t.reshard_after_forward else m.layers
    gathered = c * (m.root_params + blocks * m.block_params) + \
        (c + (4 if bf16 else 0)) * m.block_params
    if t.reference == "frozen":
        gathered += c * (m.root_params + 2 * m.block_params)
    act_off = activation_bytes(m, c, tokens, checkpointing=False)
    act_on = activation_bytes(m, c, tokens, checkpointing=True)
    act = act_on if t.activation_checkpointing else act_off
    role = Role("trainer", f"trainer: {n} x 1 {'GPU' if t.use_gpu else 'CPU process'} "
                f"(trainer.num_workers), FSDP2, {cname} compute, {t.optimizer}; micro-batch "
                f"{tokens} tokens per rank ({how})", on_gpu=t.use_gpu, processes=n)
    sharded = [("parameters", "fp32 shard", 4 * p / n), ("gradients", "fp32 shard", 4 * p / n),
               ("optimizer", f"{t.optimizer}: {states} fp32 state(s), shard", 4 * states * p / n)]
    if t.reference == "frozen":
        sharded.append(("reference", f"frozen, {cname} shard", c * p / n))
    role.lines += sharded
    role.lines += [
        ("gathered", f"{cname} root + {blocks} blocks, block grads; reference's", gathered),
        ("activations", f"checkpointing {'on' if t.activation_checkpointing else 'off'} "
         f"(on: {_fmt(act_on)}, off: {_fmt(act_off)})", act),
        ("logits", f"3 fp32 copies of {tokens} x {m.vocab}", 12.0 * tokens * m.vocab)]
    _margin(role)
    if t.use_gpu and memory is not None:
        role.available = memory
        if role.total > memory:
            shard_bytes = sum(b for _, _, b in sharded) * n * (1 + FRAGMENTATION)
            rest = role.total - shard_bytes / n
            fixes = []
            if memory > rest:
                need = math.ceil(shard_bytes / (memory - rest))
                fixes.append(f"raise trainer.num_workers to >= {need}")
            else:
                fixes.append("raise trainer.num_workers")
            if not t.reshard_after_forward:
                fixes.append("set trainer.reshard_after_forward=true")
            if act + 12.0 * tokens * m.vocab > 0.05 * role.total:  # else they cannot help
                if not t.activation_checkpointing:
                    fixes.append("set trainer.activation_checkpointing=true")
                fixes.append("lower trainer.micro_batch_tokens" if t.micro_batch_tokens
                             else "lower trainer.micro_batch_size" if t.micro_batch_size > 1
                             else "lower trainer.max_length")
            role.problems.append(
                f"trainer: needs {_fmt(role.total)} per GPU, {_fmt(memory)} available: "
                + ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1])
    return role


def _kv_per_token(m: ModelFacts, tp: int, d: int) -> int:
    """KV cache bytes per token on one GPU: K and V of every layer, the KV heads split over
    the tensor-parallel ranks (replicated when there are fewer heads than ranks)."""
    return 2 * m.layers * max(1, m.kv_heads // tp) * m.head_dim * d


def _least_tp(m: ModelFacts, budget: float, d: int, tokens: int) -> Optional[int]:
    """The smallest tensor-parallel size vLLM accepts for this model's heads (heads divisible
    by it; KV heads divisible by it or it by them) at which the weights, the reserve and a KV
    cache of `tokens` tokens fit `budget` per GPU; None up to the head count."""
    for tp in range(1, m.heads + 1):
        if m.heads % tp or (m.kv_heads % tp and tp % m.kv_heads):
            continue
        if m.params * d / tp + VLLM_RESERVE + _kv_per_token(m, tp, d) * tokens <= budget:
            return tp
    return None


def _generator(cfg: Config, m: ModelFacts, memory: Optional[float]) -> Role:
    g, pool, s = cfg.generator, cfg.pools.generator, cfg.sampling
    on_gpu, tp = pool.num_gpus > 0, pool.tensor_parallel_size
    d = _DTYPE_BYTES[cfg.model.dtype]
    seq = cfg.data.max_prompt_length + s.max_new_tokens
    weights = m.params * d
    where = f"{tp} GPU{'s' if tp > 1 else ''} each" if on_gpu else "on CPU"
    role = Role("generator", f"generator: {pool.replicas} x {g.backend} (pools.generator.replicas)"
                f", {where}, tensor_parallel_size {tp}, {cfg.model.dtype}", on_gpu=on_gpu,
                processes=pool.replicas * tp)
    if g.backend == "hf":
        kv = 2 * m.layers * m.kv_heads * m.head_dim * d * seq * pool.batch_size * s.k
        role.lines += [("weights", cfg.model.dtype, weights),
                       ("KV cache", f"{pool.batch_size} prompts x k {s.k} x {seq} tokens", kv)]
        _margin(role)
        role.host_load = weights
        role.available = memory * min(pool.num_gpus, 1) if on_gpu and memory else None
        if role.available is not None and role.total > role.available:
            role.problems.append(
                f"generator: needs {_fmt(role.total)} per GPU, {_fmt(role.available)} "
                f"available: lower pools.generator.batch_size or use generator.backend=vllm "
                "with pools.generator.tensor_parallel_size > 1")
        return role
    _vllm(role, m, "generator", g, pool, d, memory, seq=seq, unit="sequences",
          seq_how="data.max_prompt_length + sampling.max_new_tokens",
          in_flight=f"{pool.batch_size * pool.max_in_flight * s.k} (batch_size x max_in_flight"
          " x k)")
    return role


def _vllm(role: Role, m: ModelFacts, section: str, engine: "GeneratorConfig | JudgeConfig",
          pool: PoolConfig, d: int, memory: Optional[float], *, seq: int, unit: str,
          seq_how: str, in_flight: str) -> None:
    """A vLLM engine's lines, notes and problems, added to `role`: the generators' and the LLM
    judges'. `section` ("generator" or "judge") names the fields in messages; `engine` is that
    section (gpu_memory_utilization, kv_cache_gb, max_model_len) and `pool` its pool. The
    notes say how many `unit`s of `seq` tokens (`seq_how`) the KV cache holds."""
    on_gpu, tp = pool.num_gpus > 0, pool.tensor_parallel_size
    weights = m.params * d
    per_token = _kv_per_token(m, tp, d)
    max_len = engine.max_model_len or m.max_positions
    tp_field = f"pools.{section}.tensor_parallel_size"
    role.lines.append(("weights", f"per tensor-parallel shard (/{tp})", weights / tp))
    if not on_gpu:
        kv = engine.kv_cache_gb * GIB
        role.lines.append(("KV cache", f"{section}.kv_cache_gb", kv))
        role.host_load = role.total
    else:
        role.lines.append(("reserve", "vLLM activations, CUDA graphs (estimate)", VLLM_RESERVE))
        role.host_load = m.vocab * m.hidden * d  # tensors streamed one at a time
        if memory is None:
            role.notes.append("KV cache: unknown until the GPU memory is")
            return
        share = 1.0 if tp > 1 else min(pool.num_gpus, 1.0)
        budget = engine.kv_cache_gb * GIB + role.total if engine.kv_cache_gb else \
            engine.gpu_memory_utilization * memory
        kv = budget - role.total
        role.lines.append(("KV cache", f"{section}.kv_cache_gb" if engine.kv_cache_gb else
                           f"what is left of {engine.gpu_memory_utilization:g} x {_fmt(memory)}",
                           max(kv, 0.0)))
        role.available = memory * share
        if budget > memory * share:
            role.problems.append(
                f"{section}: vLLM takes {_fmt(budget)} of each GPU but an actor has "
                f"{share:g} of one ({_fmt(memory * share)}): lower "
                f"{section}.gpu_memory_utilization or raise pools.{section}.num_gpus")
        if kv <= 0:
            need = _least_tp(m, budget, d, max_len)
            role.problems.append(
                f"{section}: weights {_fmt(weights / tp)} per GPU + {_fmt(VLLM_RESERVE)} reserve "
                f"exceed {section}.gpu_memory_utilization x GPU = {_fmt(budget)}: raise "
                f"{tp_field}" + (f" to >= {need}" if need else "")
                + f" or {section}.gpu_memory_utilization")
    held = int(max(kv, 0) // (per_token * seq))
    role.notes.append(f"KV cache: {_fmt(per_token)} per token per GPU; holds {held} {unit} of "
                      f"{seq} tokens ({seq_how}); in flight at most {in_flight}")
    if 0 < kv < per_token * max_len:
        role.problems.append(
            f"{section}: vLLM refuses to start when its KV cache ({_fmt(kv)}) cannot hold one "
            f"sequence of max_model_len {max_len} tokens ({_fmt(per_token * max_len)}): set "
            f"{section}.max_model_len (e.g. {seq}) or raise {tp_field} or "
            f"{section}.gpu_memory_utilization")


def _judge(cfg: Config, m: ModelFacts, memory: Optional[float]) -> Role:
    if cfg.judge.backend == "llm":
        return _llm_judge(cfg, m, memory)
    j, pool = cfg.judge, cfg.pools.judge
    on_gpu = pool.num_gpus > 0
    dtype = j.dtype if j.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    d = _DTYPE_BYTES[dtype]
    if j.backend == "gpm":  # one row per response, packed up to a token budget
        tokens, what = j.max_batch_tokens, f"judge.max_batch_tokens {j.max_batch_tokens} tokens"
    else:  # one row per ordered pair
        length = j.source_max_length + 2 * j.candidate_max_length
        tokens, what = j.batch_size * length, f"judge.batch_size {j.batch_size} x {length} tokens"
    role = Role("judge", f"judge: {pool.replicas} x {j.backend} (pools.judge.replicas), "
                f"{'GPU' if on_gpu else 'CPU'}, {dtype}", on_gpu=on_gpu,
                processes=pool.replicas)
    role.lines += [("weights", dtype, m.params * d),
                   ("activations", f"one layer, {what}",
                    tokens * (7 * m.hidden + m.intermediate) * d)]
    _margin(role)
    role.host_load = 2 * 4 * m.params if j.backend == "pairrm" else m.params * d
    if on_gpu and memory is not None:
        role.available = memory * min(pool.num_gpus, 1.0)
        if role.total > role.available:
            role.problems.append(
                f"judge: needs {_fmt(role.total)} per GPU, {_fmt(role.available)} available: "
                f"lower judge.{'max_batch_tokens' if j.backend == 'gpm' else 'batch_size'}, "
                "set judge.dtype=bfloat16 or raise pools.judge.num_gpus")
    return role


def _llm_judge(cfg: Config, m: ModelFacts, memory: Optional[float]) -> Role:
    """An LLM judge is a vLLM engine like a generator's, whose sequences are judge prompts:
    the question, two responses of at most judge.max_response_tokens and the templates'
    words, with one verdict position."""
    j, pool, k = cfg.judge, cfg.pools.judge, cfg.sampling.k
    on_gpu, tp = pool.num_gpus > 0, pool.tensor_parallel_size
    # vLLM's "auto": the checkpoint's dtype (16-bit on GPUs for a float32 one).
    dtype = j.dtype if j.dtype != "auto" else \
        "float32" if m.checkpoint_dtype_bytes == 4 and not on_gpu else "bfloat16"
    overhead, where_from = _template_tokens(j.template)
    seq = cfg.data.max_prompt_length + 2 * j.max_response_tokens + overhead + 1
    where = f"{tp} GPU{'s' if tp > 1 else ''} each" if on_gpu else "on CPU"
    role = Role("judge", f"judge: {pool.replicas} x llm on vLLM (pools.judge.replicas), {where}"
                f", tensor_parallel_size {tp}, {dtype}" + (" (auto)" if j.dtype == "auto" else ""),
                on_gpu=on_gpu, processes=pool.replicas * tp)
    _vllm(role, m, "judge", j, pool, _DTYPE_BYTES[dtype], memory, seq=seq, unit="judge prompts",
          seq_how=f"data.max_prompt_length + 2 x judge.max_response_tokens + ~{overhead} of "
          f"templates{where_from} + 1 verdict",
          in_flight=f"{pool.batch_size * pool.max_in_flight * k * (k - 1)} (batch_size x "
          "max_in_flight x K(K-1))")
    if j.max_model_len and j.max_model_len < seq:
        role.notes.append(
            f"judge.max_model_len {j.max_model_len} is under the longest judge prompt (~{seq} "
            "tokens): prompts whose rendered pairs exceed it fail (Failed records); raise "
            "judge.max_model_len or lower judge.max_response_tokens")
    return role


def _template_tokens(template: Optional[str]) -> tuple[int, str]:
    """(tokens, a note) that the judge's template and the model's chat template add around the
    question and the two responses: the template file's text without its Jinja comments at ~3
    characters a token (English runs ~4: an upper estimate), plus 64 for the chat template's
    turn markers and system header (Llama 3.1's: ~35). The default template: ~210."""
    path, note = DEFAULT_JUDGE_TEMPLATE, ""
    if template and Path(template).expanduser().is_file():
        path = Path(template).expanduser()
    elif template:  # the engine refuses it at start; the plan goes on with the default's size
        note = f" (judge.template {template!r} not found: the default's)"
    text = re.sub(r"\{#.*?#\}", "", path.read_text(), flags=re.S)
    return math.ceil(len(text) / 3) + 64, note


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    models: list[ModelFacts]
    roles: list[Role]
    memory_note: str
    host: TrainerHost

    @property
    def problems(self) -> list[str]:
        return [p for r in self.roles for p in r.problems] + self.host.problems

    def format(self) -> str:
        on_gpu = any(r.on_gpu for r in self.roles)
        out = ["Memory plan (estimates; GiB = 2^30 bytes), "
               + (self.memory_note if on_gpu else "no role on a GPU: host RAM only")]
        out += [f"  model {m.describe()}" for m in self.models]
        for r in self.roles:
            out += ["", r.title]
            out += [f"  {item:<12} {detail:<58} {_fmt(b):>10}" for item, detail, b in r.lines]
            if not r.lines:
                continue
            where = "per GPU" if r.on_gpu else "host RAM per process"
            verdict = "" if r.available is None else \
                f" of {_fmt(r.available)}: " + ("fits" if not r.problems else "DOES NOT FIT")
            out.append(f"  {'total':<12} {where:<58} {_fmt(r.total):>10}{verdict}")
            out += [f"  {note}" for note in r.notes]
        out += ["", "host RAM while loading, model data only (each process also holds its "
                "Python, torch and CUDA runtime):"]
        total = 0.0
        for r in self.roles:
            if r.lines:
                load = r.host_load if r.on_gpu else max(r.host_load, r.total)
                total += load * r.processes
                out.append(f"  {r.name:<12} {_fmt(load):>10} per process x {r.processes:<3} = "
                           f"{_fmt(load * r.processes):>10}")
        out.append(f"  {'together':<12} {_fmt(total):>10} (one node's when the roles share "
                   "one, as in the shipped configs)")
        return "\n".join(out + [""] + self.host.lines(_fmt))


def build_plan(cfg: Config, gpu_memory: "float | dict[str, Optional[float]] | None", *,
               ranks_per_node: Optional[int] = None, node_memory_gb: Optional[float] = None,
               disk_free: Optional[float] = None) -> Plan:
    """The plan for `cfg` with `gpu_memory` GiB per GPU (one figure, or one per role; None:
    unknown, nothing on a GPU is checked), `ranks_per_node` trainer ranks per node (default:
    8 GPUs per node on GPUs, all ranks on one node on CPU), `node_memory_gb` GiB of host RAM per
    trainer node (default `run.trainer_node_memory_gb`; None: not checked) and `disk_free`
    bytes free in `run.output_dir` (None: not checked). Raises ModelConfigError when a
    model's config.json cannot be read."""
    per_role = gpu_memory if isinstance(gpu_memory, dict) else \
        {r: gpu_memory for r in ("trainer", "generator", "judge")}

    def mem(role: str) -> Optional[float]:
        gib = per_role.get(role)
        return None if gib is None else gib * GIB

    config, source = load_model_config(cfg.model.path, "model.path", cfg.model.cache_dir)
    policy = model_facts(config, cfg.model.path, source, "model.path")
    judge = judge_facts(cfg)
    trainer = _trainer(cfg, policy, mem("trainer"))
    n = cfg.trainer.num_workers
    k = min(n, ranks_per_node or (8 if cfg.trainer.use_gpu else n))
    node_gb = node_memory_gb if node_memory_gb is not None else cfg.run.trainer_node_memory_gb
    host = trainer_host(cfg, policy, training=trainer.total, ranks_per_node=k,
                        node_memory=None if node_gb is None else node_gb * GIB,
                        disk_free=disk_free, fmt=_fmt)
    trainer.host_load = host.load
    trainer.notes.append(f"host RAM at load per rank: {_fmt(host.load)} (the checkpoint's "
                         "pages of its shard, the largest tensor"
                         + (")" if cfg.trainer.use_gpu else ", its fp32 shard)"))
    roles = [trainer, _generator(cfg, policy, mem("generator"))]
    if judge is not None:
        roles.append(_judge(cfg, judge, mem("judge")))
    else:
        roles.append(Role("judge", f"judge: {cfg.pools.judge.replicas} x python "
                          f"({cfg.judge.function}): no model", on_gpu=False,
                          processes=cfg.pools.judge.replicas))
    known = {v for v in per_role.values() if v is not None}
    note = ("GPU memory unknown" if not known else
            "GPUs of " + ", ".join(f"{v:g}" for v in sorted(known)) + " GiB")
    return Plan([policy] + ([judge] if judge else []), roles, note, host)


def gpu_roles(cfg: Config) -> list[str]:
    """The roles of `cfg` that run on GPUs (a Python judge never does)."""
    p = cfg.pools
    return [role for role, on in (("trainer", cfg.trainer.use_gpu),
                                  ("generator", p.generator.num_gpus > 0),
                                  ("judge", p.judge.num_gpus > 0
                                   and cfg.judge.backend != "python")) if on]


def gpu_memory_gib(nodes: list[dict]) -> tuple[Optional[float], str]:
    """(GiB per GPU, how it was found) for the GPU nodes in `nodes` (`ray.nodes()` entries),
    from their `accelerator_type:<X>` resources: the smallest, so that every node fits; None
    when a GPU node's type is missing or not in ACCELERATOR_MEMORY_GIB."""
    sizes, kinds = [], set()
    for node in nodes:
        res = node.get("Resources") or {}
        if not node.get("Alive", True) or res.get("GPU", 0) <= 0:
            continue
        types = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
        kinds.update(types)
        known = [ACCELERATOR_MEMORY_GIB[t] for t in types if t in ACCELERATOR_MEMORY_GIB]
        if not known:
            return None, (f"accelerator type {'/'.join(types)} has no known memory" if types
                          else "a GPU node reports no accelerator_type")
        sizes.append(max(known))  # a node labelled both "A100" and "A100-80G"
    if not sizes:
        return None, "no GPU nodes"
    return min(sizes), f"accelerator type {'/'.join(sorted(kinds))}"


def _fmt(x: float) -> str:
    if x >= GIB / 10:
        return f"{x / GIB:.1f} GiB" if x >= 10 * GIB else f"{x / GIB:.2f} GiB"
    return f"{x / 2**20:.1f} MiB" if x >= 2**20 else f"{x / 2**10:.1f} KiB"
