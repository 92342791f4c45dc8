"""Judge throughput: the official PairRM call pattern vs the batched engine, side by side.

Official (what the SPPO reference code runs): `Blender.rank(prompts, candidates,
return_scores=True, batch_size=1)`, one prompt per step and one ordered pair per forward pass.
Batched: `PairRMEngine.logits`, all K(K-1) ordered pairs of all prompts sorted by length and cut
into batches of `--batch-size` pairs (several sizes may be given). Same tiny DeBERTa-v2 PairRM
(built offline, larger than the test one), same inputs; the runs are timed in turn `--repeats`
times and the medians compared, since the CPU may be shared. Both produce the same numbers; the
script checks that the official scores equal `bt_scores` of the batched logits.

    .venv/bin/python bench/judge.py          # 8 prompts, K=5, hidden 256, 4 layers
    .venv/bin/python bench/judge.py --batch-size 8 16 32 --threads 1 --hidden 384 --layers 6

Prints pairs/s for each and the ratios. A figure, not a pass/fail test. On a CPU the batched
forward is compute-bound: it saves the per-pass overhead and DeBERTa's per-pass projection of
its 512 relative-position embeddings, not the attention itself, so the gain shrinks as the
model and the texts grow; on a GPU a one-pair pass leaves the device mostly idle. On a busy
shared machine the one-pair passes suffer most from losing a core mid-op, which inflates the
ratio: the load average is printed, and `--threads 1` gives steadier figures.
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

from actors.engines.blender_compat import import_llm_blender  # noqa: E402
from actors.engines.pairrm import PairRMEngine  # noqa: E402
from sppo.preference import bt_scores  # noqa: E402
from sppo.tiny import WORDS  # noqa: E402
from sppo.tiny_pairrm import TinyPairRMSpec, ensure_tiny_pairrm  # noqa: E402


def texts(rng: random.Random, n: int, lo: int, hi: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."
            for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8, 32],
                    help="ordered pairs per forward pass; one batched run per value")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(10, 60))
    ap.add_argument("--response-words", type=int, nargs=2, default=(10, 100))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--cache-dir", default="~/.cache/sppo-ray")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = TinyPairRMSpec(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers,
                          num_attention_heads=max(2, args.hidden // 64))
    tiny = ensure_tiny_pairrm(args.cache_dir, spec)
    llm_blender = import_llm_blender()
    official = llm_blender.Blender(llm_blender.BlenderConfig(device=args.device, use_tqdm=False))
    official.loadranker(str(tiny.ranker_dir), device=args.device,
                        model_name=str(tiny.backbone_dir))
    batched = PairRMEngine(str(tiny.ranker_dir), backbone=str(tiny.backbone_dir),
                           device=args.device, dtype="float32")
    rng = random.Random(0)
    prompts = texts(rng, args.prompts, *args.prompt_words)
    cands = [texts(rng, args.k, *args.response_words) for _ in prompts]
    pairs = args.prompts * args.k * (args.k - 1)

    def run_official():
        return official.rank(prompts, cands, return_scores=True, batch_size=1,
                             disable_tqdm=True)

    def run_batched(batch_size: int):
        batched.batch_size = batch_size
        return batched.logits(prompts, cands)

    def timed(fn, *a):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*a)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    run_official(), run_batched(args.batch_size[0])  # warm up
    t_off: list[float] = []
    t_bat: dict[int, list[float]] = {b: [] for b in args.batch_size}
    for _ in range(args.repeats):
        scores, t = timed(run_official)
        t_off.append(t)
        for b in args.batch_size:
            logits, t = timed(run_batched, b)
            t_bat[b].append(t)
            diff = np.abs(bt_scores(torch.tensor(np.stack(logits))).numpy() - scores).max()
            assert diff < 1e-3, f"batched logits disagree with llm-blender's scores by {diff}"

    off = pairs / statistics.median(t_off)
    print(f"model: tiny DeBERTa-v2 PairRM hidden={args.hidden} layers={args.layers} "
          f"heads={spec.num_attention_heads}, device={args.device}, "
          f"torch threads={torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"inputs: {args.prompts} prompts x K={args.k} -> {pairs} ordered pairs; prompt words "
          f"{tuple(args.prompt_words)}, response words {tuple(args.response_words)}; "
          f"median of {args.repeats}")
    print(f"  {'official Blender.rank(batch_size=1)':<42} {off:8.1f} pairs/s")
    for b in args.batch_size:
        bat = pairs / statistics.median(t_bat[b])
        print(f"  {f'batched PairRMEngine(batch_size={b})':<42} {bat:8.1f} pairs/s   "
              f"ratio {bat / off:5.2f}x")
    print(f"  (official scores == bt_scores(batched logits) within {diff:.1e})")


if __name__ == "__main__":
    main()
