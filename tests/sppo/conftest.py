"""Fixtures of the driver tests that need a Ray cluster of their own (test_journal.py):
`own_cluster`, a `ray start --head` cluster that outlives the driver processes a test starts
and SIGKILLs."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_cluster(tmp_path):
    """A `ray start --head` cluster of its own (temp dir, ports, auth token) for driver
    processes, so they cannot join the test session's cluster; stopped by signalling its
    process group, and checked to leave no process behind."""
    import psutil

    bindir = Path(sys.executable).parent
    if not (bindir / "ray").exists():
        pytest.skip(f"the ray command-line tool is not installed next to {sys.executable}")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # Its workers import the tests' slowed judges (tests/judges.py) and, like the
           # driver, the repo.
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths are limited
    log_path = tmp_path / "head.log"
    try:
        for _ in range(3):  # a port picked free may be taken before the head binds it
            gcs = _free_port()
            ports = [f"--dashboard-agent-listen-port={_free_port()}",
                     f"--dashboard-agent-grpc-port={_free_port()}",
                     f"--metrics-export-port={_free_port()}",
                     f"--runtime-env-agent-port={_free_port()}",
                     f"--ray-client-server-port={_free_port()}"]
            with open(log_path, "w") as log:
                head = subprocess.Popen(
                    [str(bindir / "ray"), "start", "--head", "--block", f"--port={gcs}",
                     "--num-cpus=8", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                     "--disable-usage-stats", *ports],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 120
            while head.poll() is None and time.monotonic() < deadline and \
                    not (Path(temp_dir) / "ray_current_cluster").is_file():  # written when up
                time.sleep(0.5)
            if head.poll() is None:
                break
            with contextlib.suppress(ProcessLookupError):  # whatever it had started
                os.killpg(head.pid, signal.SIGKILL)
        assert head.poll() is None and (Path(temp_dir) / "ray_current_cluster").is_file(), \
            f"the head did not start:\n{log_path.read_text()[-3000:]}"
        yield SimpleNamespace(address=f"127.0.0.1:{gcs}", env=env,
                              driver=lambda args, log_path: _driver(args, env, log_path))
    finally:
        procs = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # a throwaway cluster: no graceful stop needed
        head.wait(timeout=30)
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:  # e.g. a worker outside the group: ours, so stop it too
            p.kill()
        _, alive = psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not alive, f"processes of the driver's cluster left behind: {alive}"


def _driver(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """`python -m sppo.driver ARGS` in a process group of its own, output to `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "sppo.driver", *args], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
