"""bench/gpu_check.py (`make gpu-check`): what it does on a machine without a GPU, and its
training part's code path on CPU (`--device cpu --smoke`), in fresh processes as it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_without_a_gpu_it_says_so_and_exits_1(tmp_path):
    out = _run("--out", str(tmp_path))
    assert out.returncode == 1
    assert out.stdout.startswith("no GPU: torch ") and "nothing was measured" in out.stdout
    assert (tmp_path / "summary.txt").read_text().startswith("no GPU")


def test_the_training_part_runs_on_cpu_and_writes_its_figures(tmp_path):
    out = _run("--out", str(tmp_path), "--device", "cpu", "--smoke", "--parts", "train")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("gpu-check on CPU: torch ")
    assert summary[1].startswith("train: measured")
    figures = json.loads((tmp_path / "train.json").read_text())
    assert figures["load"] in ("sharded_read", "broadcast_from_rank0")
    assert figures["tokens_per_s"] > 0 and len(figures["steps"]) == 2
    assert all(s["loss"] == s["loss"] for s in figures["steps"])  # not NaN
