"""The driver as users run it: `ray job submit --working-dir . -- python -m sppo.driver ...`
against a separately started `ray start --head` cluster (its own temp dir and ports; stopped by
killing its process group, so the test session's own cluster is untouched)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_driver(tmp_path):
    bindir = Path(sys.executable).parent
    ray_bin = bindir / "ray"
    if not ray_bin.exists():
        pytest.skip(f"the ray command-line tool is not installed next to {sys.executable}")
    # Ray 2.60 authenticates job clients with a token; give head and client the same one.
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    # Ports of its own: the test session's cluster holds the defaults (the dashboard agent's
    # 52365 among them), and a second head on them would have no job agent.
    ports = [f"--dashboard-agent-listen-port={_free_port()}",
             f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
             f"--ray-client-server-port={_free_port()}"]
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are limited
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=8",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 60
        while time.time() < deadline:  # the dashboard's job server takes a moment
            probe = subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail(f"the head's job server never came up: {probe.stderr[-2000:]}")
        out_dir = tmp_path / "runs"
        cmd = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO),
               "--", "python", "-m", "sppo.driver", "run.rounds=1", "run.name=submitted",
               "data.max_prompts=8", "data.eval_prompts=4", "sampling.max_new_tokens=8",
               f"run.output_dir={out_dir}", f"model.cache_dir={tmp_path / 'cache'}"]
        for _ in range(10):
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            log = job.stdout + job.stderr
            if "No available agent" not in log:  # the head's job agent may still be starting
                break
            time.sleep(5)
        assert "succeeded" in log, log[-4000:]
        report = json.loads((out_dir / "submitted" / "rounds" / "round-0.json").read_text())
        assert report["prompts"]["annotated"] + report["prompts"]["failed"] == 8
        assert report["sync"]["generator_versions"] == [1]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
