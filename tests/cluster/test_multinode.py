"""Multi-node, for real: the demo through `ray job submit` on a role-labelled cluster.

Four Ray nodes on this one machine, started the way docs/deploy.md tells users to start a
hand-made cluster: `ray start --head --labels role=head --num-cpus 0` and one
`ray start --address ... --labels role=<role>` each for generator, judge and trainer. Every
node runs its own raylet, object store, dashboard agent and runtime-env agent, so an actor on
the generator node and a Ray Train worker on the trainer node are in different Ray nodes: the
weight broadcast and the annotated rows cross node boundaries, and the repository reaches every
node through `--working-dir` (the job's runtime env), as on a real cluster.

After the job, Ray's own state (the dashboard's state API, `ray list actors/nodes/jobs`) says
where each of the job's actors ran; the run's round reports say that every prompt was
accounted for. Nothing here touches the test session's shared cluster (tests/conftest.py): its
own temp dirs (RAY_TMPDIR too, so that no address file lands in /tmp/ray), its own ports for
every server, nodes stopped by killing their own process groups.

Two things the set-up needs, each from a cluster that failed (docs/deploy.md has the evidence):
the nodes keep the machine's own address, not `--node-ip-address 127.0.0.1` (with loopback-bound
nodes `ray job submit` hangs before the job is created: the head's job agent calls
`ray.init("127.0.0.1:<gcs port>")`, which Ray rewrites to the machine's routable address, where
a loopback-bound GCS does not listen); and each node has a temp dir of its own (with a shared
one, every node's runtime-env agent deletes and unpacks again the working_dir that the driver
runs in).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"

# Logical CPUs per node (the machine has 2 cores; the actors mostly wait on each other). The head
# runs the driver and Ray's own bookkeeping actors only.
NODES = {"head": 0, "generator": 2, "judge": 1, "trainer": 2}
OBJECT_STORE_BYTES = 200 * 1024 * 1024

ROUNDS, PER_ROUND, EVAL_PROMPTS = 2, 8, 4
TRAIN_WORKERS = 2
DRIVER_ARGS = [f"run.rounds={ROUNDS}", "run.name=multinode",
               f"data.max_prompts={ROUNDS * PER_ROUND}", f"data.eval_prompts={EVAL_PROMPTS}",
               "sampling.max_new_tokens=8",
               "generator.backend=hf", "pools.generator.replicas=1", "pools.judge.replicas=1",
               f"trainer.num_workers={TRAIN_WORKERS}"]

# Which role's node each actor class must run on: Generator and Judge are actors/generator.py's
# and actors/judge.py's actor classes, RayTrainWorker is Ray Train's worker actor.
PLACED = {"Generator": "generator", "Judge": "judge", "RayTrainWorker": "trainer"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Every server a node starts, on a port of its own: the session's cluster and other test
    clusters hold Ray's defaults (the dashboard agent's 52365 among them; a head without its
    agent answers every submission with "No available agent")."""
    return [f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            # Workers on random ports: four raylets on one machine share no port range.
            "--min-worker-port=0", "--max-worker-port=0"]


class RoleCluster:
    """A head and one node per role, each a `ray start --block` in its own process group."""

    def __init__(self, env: dict[str, str], temp_dir: str):
        self.env, self.temp_dir = env, temp_dir
        self.gcs_port, self.dash_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dash_port}"
        self.procs: list[subprocess.Popen] = []

    def _start(self, role: str, args: list[str]) -> subprocess.Popen:
        # A temp dir per node, as separate machines have: nodes sharing one share
        # <temp>/session_*/runtime_resources, and each node's runtime-env agent, setting up the
        # job's working_dir there, deletes and unpacks again the directory that the driver on
        # the head runs in (its os.getcwd() then fails with FileNotFoundError).
        cmd = [str(RAY), "start", "--block", f"--labels=role={role}",
               f"--num-cpus={NODES[role]}", "--num-gpus=0",
               f"--object-store-memory={OBJECT_STORE_BYTES}",
               f"--temp-dir={Path(self.temp_dir) / role}",
               "--disable-usage-stats", *_node_ports(), *args]
        with open(Path(self.temp_dir) / f"ray-start-{role}.log", "a") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        head = self._start("head", ["--head", f"--port={self.gcs_port}",
                                    f"--dashboard-port={self.dash_port}",
                                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                    f"--ray-client-server-port={_free_port()}"])
        if not self._wait(lambda: self.ray("job", "list", "--address",
                                           self.address).returncode == 0,
                          "the head's job server", head):
            pytest.fail(f"the head did not start:\n{self.logs()}")
        # One node after the other: `ray start` gives its raylet 30 s to register, which a
        # busy 2-core machine starting three at once does not always meet.
        for n, role in enumerate(("generator", "judge", "trainer"), start=2):
            for _ in range(3):
                proc = self._start(role, [f"--address=127.0.0.1:{self.gcs_port}"])
                if self._wait(lambda n=n: self.alive() >= n, f"the {role} node", proc):
                    break
                self.procs.remove(proc)  # it gave up starting; its group is gone with it
            else:
                pytest.fail(f"the {role} node did not start:\n{self.logs()}")

    def alive(self) -> int:
        return len([n for n in self.nodes() if n["state"] == "ALIVE"])

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def state(self, kind: str, *args: str) -> list[dict]:
        """`ray list <kind>` from the dashboard's state API, as dicts."""
        out = self.ray("list", kind, "--address", self.address, "--detail", "--format=json",
                       "--limit=10000", *args)
        try:  # "No resource in the cluster" when there is none yet
            return json.loads(out.stdout) if out.returncode == 0 else []
        except json.JSONDecodeError:
            return []

    def nodes(self) -> list[dict]:
        return self.state("nodes")

    def _wait(self, ready, what: str, proc: subprocess.Popen, timeout_s: float = 180) -> bool:
        """True once `ready()`; False when `proc` exited first; fails the test on a timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return True
            if proc.poll() is not None:
                return False
            time.sleep(1)
        pytest.fail(f"no {what} after {timeout_s} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                         for p in sorted(Path(self.temp_dir).glob("ray-start-*.log")))

    def stop(self) -> None:
        for p in reversed(self.procs):  # workers first, the head (GCS) last
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for p in reversed(self.procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


@pytest.fixture
def role_cluster():
    if not RAY.exists():
        pytest.skip(f"the ray command-line tool is not installed next to {sys.executable}")
    # Short: Ray's socket paths are limited. RAY_TMPDIR keeps every address file Ray writes
    # (ray_current_cluster) out of /tmp/ray, where the session's `ray.init()` would find it.
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           # Ray 2.60 authenticates nodes and job clients with a token: one for this cluster.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # A node told to stop drains first, for up to 30 s by default; nothing here needs it.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5"}
    env.pop("RAY_ADDRESS", None)
    cluster = RoleCluster(env, temp_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(cluster: RoleCluster, out_dir: Path,
            entrypoint: Optional[list[str]] = None) -> tuple[str, str]:
    """`ray job submit` of the demo (or of `entrypoint`); returns (submission id, the job's
    output)."""
    entrypoint = entrypoint or ["python", "-m", "sppo.driver", *DRIVER_ARGS,
                                f"run.output_dir={out_dir}", f"model.cache_dir={out_dir / 'cache'}"]
    for _ in range(10):
        submission_id = f"sppo-multinode-{secrets.token_hex(4)}"
        cmd = ["job", "submit", "--address", cluster.address, "--submission-id", submission_id,
               "--working-dir", str(REPO), "--", *entrypoint]
        try:  # ~80 s here; a submission that hangs fails the test instead of stalling it
            job = cluster.ray(*cmd, timeout=480)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            pytest.fail(f"`ray job submit` did not return in 480 s:\n"
                        f"{out.decode(errors='replace')[-3000:]}\n{cluster.logs()}")
        log = job.stdout + job.stderr
        if "No available agent" not in log:  # the head's job agent may still be starting
            return submission_id, log
        time.sleep(3)
    pytest.fail(f"the head's job agent never came up:\n{log[-3000:]}\n{cluster.logs()}")


@pytest.mark.slow
def test_demo_job_runs_each_role_on_its_own_node(role_cluster, tmp_path):
    cluster = role_cluster
    submission_id, log = _submit(cluster, tmp_path / "runs")

    # The job, from Ray's state: it succeeded, and its driver ran on the head.
    jobs = {j["submission_id"]: j for j in cluster.state("jobs")}
    job = jobs[submission_id]
    assert job["status"] == "SUCCEEDED", log[-6000:]

    nodes = {n["node_id"]: n for n in cluster.nodes()}
    role_of = {node_id: (n.get("labels") or {}).get("role") for node_id, n in nodes.items()}
    assert sorted(role_of.values()) == sorted(NODES), role_of

    # Every actor of the job, from Ray's state (dead ones included: the job is over).
    actors = cluster.state("actors", f"--filter=job_id={job['job_id']}")
    where: dict[str, list[str]] = defaultdict(list)
    for a in actors:
        where[a["class_name"]].append(role_of.get(a.get("node_id"), f"?{a.get('node_id')}"))
    print("actors of the job by class -> roles of their nodes:")
    for cls, roles in sorted(where.items()):
        print(f"  {cls}: {sorted(roles)}")
    assert role_of[job["driver_node_id"]] == "head"
    for cls, role in PLACED.items():
        assert where[cls], f"no {cls} actor in the job: {dict(where)}"
        assert set(where[cls]) == {role}, f"{cls} ran on {where[cls]}, not only on {role}"
    assert len(where["RayTrainWorker"]) == TRAIN_WORKERS

    # The run: two rounds, every prompt accounted for, the rows all reached the trainer and the
    # new weights all reached the generator.
    run = tmp_path / "runs" / "multinode"
    assert json.loads((run / "state.json").read_text())["completed_rounds"] == ROUNDS
    for t in range(ROUNDS):
        report = json.loads((run / "rounds" / f"round-{t}.json").read_text())
        counts = report["prompts"]
        lost = counts["prompts"] - counts["annotated"] - counts["failed"]
        print(f"round {t}: {counts['prompts']} prompts, {counts['annotated']} annotated, "
              f"{counts['failed']} failed, {lost} lost, {counts['rows']} rows; "
              f"trainer took {report['trainer']['rows_put']} rows; "
              f"generators at {report['sync']['generator_versions']}; timings "
              f"{ {k: round(v, 1) for k, v in report['timings_s'].items()} }")
        assert counts["prompts"] == PER_ROUND
        assert lost == 0
        assert len(report["failed"]) == counts["failed"] <= 1
        assert report["trainer"]["rows_put"] == counts["rows"] > 0
        sync = report["sync"]
        assert sync["method"] == "collective" and sync["receivers"] == 1
        assert sync["generator_versions"] == [t + 1]

    # Tensor parallelism on one node (CPUs stand in for GPUs: TP=2 at one CPU per rank): the
    # generator nodes have 2 CPUs and take the whole group on one node; the judge nodes have 1
    # each, so a group there is never placed (STRICT_PACK, where PACK would have spread it) and
    # the resource check refuses it before anything starts.
    _, log = _submit(cluster, tmp_path, ["python", "tests/cluster/tp_placement_probe.py"])
    lines = [l for l in log.splitlines() if l.startswith("TP_PROBE ")]
    assert len(lines) == 1, f"the probe job printed no TP_PROBE line:\n{log[-4000:]}"
    line = lines[0]
    probe = json.loads(line.removeprefix("TP_PROBE "))
    assert probe["generator"] == {"placed": True, "bundle_roles": ["generator", "generator"]}
    assert probe["judge"]["placed"] is False, probe
    assert probe["problems"][0].startswith(
        "pools.judge.tensor_parallel_size 2 needs 2 CPUs on one node (its ranks are placed "
        "together) but the largest of the nodes labelled role=judge has 1"), probe


def test_ray_dials_the_machine_address_for_a_loopback_one():
    """Why the nodes above keep the machine's address instead of `--node-ip-address 127.0.0.1`
    (docs/deploy.md): `ray.init(address="127.0.0.1:<port>")`, which the head's job agent calls
    for every submission, dials the machine's routable address instead of loopback, where a GCS
    bound to loopback does not listen, and the submission hangs."""
    from ray._private import services

    ip = services.get_node_ip_address()
    if ip == "127.0.0.1":
        pytest.skip("this machine has no address but loopback")
    assert services.canonicalize_bootstrap_address("127.0.0.1:6390") == f"{ip}:6390"
