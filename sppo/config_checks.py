"""The value rules of a config: ranges, fields that a backend needs, combinations that cannot
run. `check_values(cfg)` lists every problem as (dotted field, message naming the value), so a
user fixes a config in one pass; `Config.validate()` raises them together.

Not here: types and unknown keys (checked while the dataclasses are built, `sppo.config`),
anything that needs the cluster or the filesystem.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sppo.config import Config, PoolConfig

__all__ = ["check_values", "LOGGERS", "logger_names"]

LOGGERS = ("tensorboard", "wandb", "mlflow")


def logger_names(value: str) -> list[str]:
    """`run.loggers` as a list: "tensorboard, wandb" -> ["tensorboard", "wandb"]."""
    return [x.strip() for x in value.split(",") if x.strip()]


class _Problems(list):
    """(field, message) pairs; `need` adds one when a rule does not hold."""

    def need(self, ok: bool, name: str, value: Any, why: str) -> None:
        if not ok:
            self.append((name, f"{why} (got {value!r})"))


def check_values(cfg: Config) -> list[tuple[str, str]]:
    """Every value problem of `cfg`, section by section."""
    out = _Problems()
    for check in (_sampling, _data, _judge, _trainer, _pools, _generator, _weight_sync, _run):
        check(cfg, out)
    return list(out)


def _sampling(cfg: Config, out: _Problems) -> None:
    s = cfg.sampling
    out.need(s.k >= 2, "sampling.k", s.k, "must be >= 2: SPPO compares responses pairwise")
    out.need(s.temperature >= 0, "sampling.temperature", s.temperature, "must be >= 0")
    out.need(0 < s.top_p <= 1, "sampling.top_p", s.top_p, "must be in (0, 1]")
    out.need(s.max_new_tokens > 0, "sampling.max_new_tokens", s.max_new_tokens, "must be > 0")


def _data(cfg: Config, out: _Problems) -> None:
    d = cfg.data
    out.need(d.max_prompt_length > 0, "data.max_prompt_length", d.max_prompt_length,
             "must be > 0")
    out.need(d.eval_prompts >= 0, "data.eval_prompts", d.eval_prompts, "must be >= 0")
    out.need(d.max_prompts is None or d.max_prompts > 0, "data.max_prompts", d.max_prompts,
             "must be > 0 or null")
    out.need(bool(d.path), "data.path", d.path, "must not be empty")
    out.need(bool(d.prompt_column) or bool(d.messages_column), "data.prompt_column",
             d.prompt_column, "set prompt_column or messages_column")
    out.need(d.from_journal is None or bool(d.from_journal.strip()), "data.from_journal",
             d.from_journal, "must be a journal directory or null")
    out.need(bool(cfg.model.path), "model.path", cfg.model.path, "must not be empty")


def _judge(cfg: Config, out: _Problems) -> None:
    j = cfg.judge
    if j.backend == "python":
        out.need(bool(j.function), "judge.function", j.function,
                 "required when judge.backend is 'python'")
    else:
        out.need(bool(j.model_path), "judge.model_path", j.model_path,
                 f"required when judge.backend is {j.backend!r}")
    out.need(j.batch_size > 0, "judge.batch_size", j.batch_size, "must be > 0")
    out.need(j.source_max_length > 0, "judge.source_max_length", j.source_max_length,
             "must be > 0")
    out.need(j.candidate_max_length > 0, "judge.candidate_max_length", j.candidate_max_length,
             "must be > 0")
    if j.backend == "gpm":
        out.need(j.max_length > 1, "judge.max_length", j.max_length, "must be > 1")
        out.need(j.max_batch_tokens >= j.max_length, "judge.max_batch_tokens",
                 j.max_batch_tokens, f"must hold one row of judge.max_length ({j.max_length})")
        out.need(j.tau > 0, "judge.tau", j.tau, "must be > 0")
    if j.backend != "llm":
        out.need(cfg.pools.judge.tensor_parallel_size == 1, "pools.judge.tensor_parallel_size",
                 cfg.pools.judge.tensor_parallel_size, "must be 1 unless judge.backend is 'llm'")
        return
    out.need(bool(j.label_a.strip()), "judge.label_a", j.label_a, "must not be empty")
    out.need(bool(j.label_b.strip()), "judge.label_b", j.label_b, "must not be empty")
    out.need(j.label_a != j.label_b, "judge.label_b", j.label_b,
             f"must differ from judge.label_a ({j.label_a!r})")
    out.need(j.template is None or bool(j.template), "judge.template", j.template,
             "must be a path to a Jinja file or null (the default template)")
    out.need(j.max_response_tokens > 0, "judge.max_response_tokens", j.max_response_tokens,
             "must be > 0")
    out.need(j.top_logprobs > 0 or j.top_logprobs == -1, "judge.top_logprobs", j.top_logprobs,
             "must be > 0, or -1 for the whole vocabulary")
    out.need(0 < j.gpu_memory_utilization <= 1, "judge.gpu_memory_utilization",
             j.gpu_memory_utilization, "must be in (0, 1]")
    out.need(j.kv_cache_gb is None or j.kv_cache_gb > 0, "judge.kv_cache_gb", j.kv_cache_gb,
             "must be > 0 or null")
    out.need(j.max_model_len is None or j.max_model_len > 0, "judge.max_model_len",
             j.max_model_len, "must be > 0 or null")
    if cfg.pools.judge.num_gpus == 0:
        out.need(j.kv_cache_gb is not None, "judge.kv_cache_gb", j.kv_cache_gb,
                 "set it for the llm judge on CPU (pools.judge.num_gpus is 0): there "
                 "gpu_memory_utilization would reserve that fraction of the machine's RAM")


def _trainer(cfg: Config, out: _Problems) -> None:
    t, need = cfg.trainer, out.need
    need(t.num_workers > 0, "trainer.num_workers", t.num_workers, "must be > 0")
    need(t.eta > 0, "trainer.eta", t.eta, "must be > 0 (eta = 1/beta)")
    need(t.beta > 0, "trainer.beta", t.beta, "must be > 0")
    need(t.lr > 0, "trainer.lr", t.lr, "must be > 0")
    need(t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay, "must be >= 0")
    need(0 <= t.warmup_ratio < 1, "trainer.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
    need(t.epochs > 0, "trainer.epochs", t.epochs, "must be > 0")
    need(t.schedule_epochs >= t.epochs, "trainer.schedule_epochs", t.schedule_epochs,
         f"must be >= trainer.epochs ({t.epochs})")
    need(t.micro_batch_size > 0, "trainer.micro_batch_size", t.micro_batch_size, "must be > 0")
    need(t.global_batch_size > 0, "trainer.global_batch_size", t.global_batch_size,
         "must be > 0")
    need(t.micro_batch_tokens >= 0, "trainer.micro_batch_tokens", t.micro_batch_tokens,
         "must be >= 0 (0: fixed micro_batch_size rows)")
    if t.micro_batch_tokens > 0:
        seqs = 2 if t.selection == "pair" else 1
        need(t.micro_batch_tokens >= seqs * t.max_length, "trainer.micro_batch_tokens",
             t.micro_batch_tokens, f"must hold one row: >= {seqs} x trainer.max_length "
             f"({seqs * t.max_length})" + (" for selection 'pair'" if seqs == 2 else ""))
    if t.global_batch_size > 0 and t.micro_batch_size > 0 and t.num_workers > 0:
        per_step = (t.micro_batch_size if t.micro_batch_tokens == 0 else 1) * t.num_workers
        need(t.global_batch_size % per_step == 0, "trainer.global_batch_size",
             t.global_batch_size,
             f"must be a multiple of micro_batch_size * num_workers ({per_step})"
             if t.micro_batch_tokens == 0 else f"must be a multiple of num_workers ({per_step})")
    need(t.max_grad_norm > 0, "trainer.max_grad_norm", t.max_grad_norm, "must be > 0")
    need(t.max_length > 0, "trainer.max_length", t.max_length, "must be > 0")
    need(t.stream_buffer > 0, "trainer.stream_buffer", t.stream_buffer, "must be > 0")
    need(t.max_failures >= 0, "trainer.max_failures", t.max_failures, "must be >= 0")
    if t.reference == "sampled":
        need(cfg.sampling.return_logprobs, "sampling.return_logprobs",
             cfg.sampling.return_logprobs, "must be true when trainer.reference is 'sampled'")
    if t.loss in ("dpo", "ipo", "sppo_hard"):
        need(t.selection == "pair", "trainer.selection", t.selection,
             f"loss {t.loss!r} needs selection 'pair'")


def _pools(cfg: Config, out: _Problems) -> None:
    for name in ("generator", "judge"):
        p: PoolConfig = getattr(cfg.pools, name)
        pre, need = f"pools.{name}", out.need
        need(p.replicas > 0, f"{pre}.replicas", p.replicas, "must be > 0")
        need(p.min_replicas > 0, f"{pre}.min_replicas", p.min_replicas, "must be > 0")
        need(p.max_replicas >= p.min_replicas, f"{pre}.max_replicas", p.max_replicas,
             f"must be >= min_replicas ({p.min_replicas})")
        if p.min_replicas <= p.max_replicas:  # else the bounds themselves are the problem
            need(p.min_replicas <= p.replicas <= p.max_replicas, f"{pre}.replicas", p.replicas,
                 f"must be within [min_replicas, max_replicas] = "
                 f"[{p.min_replicas}, {p.max_replicas}]")
        need(p.num_cpus >= 0, f"{pre}.num_cpus", p.num_cpus, "must be >= 0")
        need(p.num_gpus >= 0, f"{pre}.num_gpus", p.num_gpus, "must be >= 0")
        need(p.tensor_parallel_size > 0, f"{pre}.tensor_parallel_size", p.tensor_parallel_size,
             "must be > 0")
        need(p.batch_size > 0, f"{pre}.batch_size", p.batch_size, "must be > 0")
        need(p.max_in_flight > 0, f"{pre}.max_in_flight", p.max_in_flight, "must be > 0")
        need(p.max_restarts >= 0, f"{pre}.max_restarts", p.max_restarts, "must be >= 0")
        for key in ("scale_up_backlog", "scale_down_idle_s", "scale_cooldown_s"):
            need(getattr(p, key) >= 0, f"{pre}.{key}", getattr(p, key), "must be >= 0")


def _generator(cfg: Config, out: _Problems) -> None:
    g = cfg.generator
    out.need(0 < g.gpu_memory_utilization <= 1, "generator.gpu_memory_utilization",
             g.gpu_memory_utilization, "must be in (0, 1]")
    out.need(g.kv_cache_gb is None or g.kv_cache_gb > 0, "generator.kv_cache_gb",
             g.kv_cache_gb, "must be > 0 or null")
    if g.backend == "vllm" and cfg.pools.generator.num_gpus == 0:
        out.need(g.kv_cache_gb is not None, "generator.kv_cache_gb", g.kv_cache_gb,
                 "set it for vLLM on CPU (pools.generator.num_gpus is 0): there "
                 "gpu_memory_utilization would reserve that fraction of the machine's RAM")


def _weight_sync(cfg: Config, out: _Problems) -> None:
    w = cfg.weight_sync
    out.need(w.bucket_mb > 0, "weight_sync.bucket_mb", w.bucket_mb, "must be > 0")
    out.need(w.timeout_s > 0, "weight_sync.timeout_s", w.timeout_s, "must be > 0")
    if w.method == "object_store":
        out.need(cfg.generator.backend == "hf", "weight_sync.method", w.method,
                 "needs generator.backend 'hf': vLLM generators receive the weights in their "
                 "workers ('collective' or 'auto')")


def _run(cfg: Config, out: _Problems) -> None:
    r, need = cfg.run, out.need
    need(0 <= cfg.service.port < 65536, "service.port", cfg.service.port,
         "must be in 0..65535 (0: any free port)")
    need(r.rounds > 0, "run.rounds", r.rounds, "must be > 0")
    need(bool(r.name), "run.name", r.name, "must not be empty")
    need(r.log_every > 0, "run.log_every", r.log_every, "must be > 0")
    need(r.gpu_memory_gb is None or r.gpu_memory_gb > 0, "run.gpu_memory_gb", r.gpu_memory_gb,
         "must be > 0 or null")
    need(r.trainer_node_memory_gb is None or r.trainer_node_memory_gb > 0,
         "run.trainer_node_memory_gb", r.trainer_node_memory_gb, "must be > 0 or null")
    need(r.journal_chunk_prompts > 0, "run.journal_chunk_prompts", r.journal_chunk_prompts,
         "must be > 0")
    need(r.journal_flush_s > 0, "run.journal_flush_s", r.journal_flush_s, "must be > 0")
    need(r.samples_per_round >= 0, "run.samples_per_round", r.samples_per_round,
         "must be >= 0")
    unknown = [x for x in logger_names(r.loggers) if x not in LOGGERS]
    need(not unknown, "run.loggers", r.loggers,
         f"unknown logger(s) {unknown}; choose from {list(LOGGERS)}, comma-separated")
