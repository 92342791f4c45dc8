"""Tests of cluster/control.py: the control service (`cluster.service`, real uvicorn on loopback,
real HTTP) answering for a real self-play job (`SelfPlay` with the demo's components: HF
generators on the tiny model, the demo's Python judge, two FSDP2 trainer workers on gloo) on the
session's local Ray cluster, started the way the driver starts it (`cluster.launch.start_service`).

One job serves the whole module (setting it up costs a trainer start): round 0 runs while the
tests resize its pools through the API; between rounds the tests read its status, metrics,
rounds and chat, and fuzz the schema; round 1 then runs on the pools the fuzzing left behind.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray

from helpers import demo_config
from service_fuzz import fuzz_service
from cluster.launch import start_service
from sppo.driver import main

TOKEN_ENV = "SPPO_TEST_CONTROL_TOKEN"  # left unset: the token is generated into the run dir

# 2 rounds of 64 prompts (8 held out), small batches so a round spans many pool calls, and
# room to grow each pool to 2 actors.
OVERRIDES = ["run.rounds=2", "data.max_prompts=128", "data.eval_prompts=8",
             "pools.generator.batch_size=4", "pools.generator.max_replicas=2",
             "pools.judge.batch_size=4", "pools.judge.max_replicas=2",
             "service.enabled=true", "service.port=0", f"service.token_env={TOKEN_ENV}"]


def _cfg(tmp: Path, *extra: str):
    return demo_config(tmp, *OVERRIDES, *extra)


class Live:
    """The running job, its service and an authenticated client."""

    def __init__(self, job, server, token: str):
        self.job, self.server, self.token = job, server, token
        self.http = httpx.Client(base_url=server.url, timeout=60,
                                 headers={"Authorization": f"Bearer {token}"})

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def post(self, path: str, body) -> httpx.Response:
        return self.http.post(path, json=body)


@pytest.fixture(scope="module")
def live(ray_cluster, tmp_path_factory, monkeypatch_module):
    from cluster.selfplay import SelfPlay

    monkeypatch_module.delenv(TOKEN_ENV, raising=False)
    tmp = tmp_path_factory.mktemp("control")
    cfg = _cfg(tmp)
    run_dir = tmp / "run"
    job = SelfPlay(cfg, run_dir)
    server = start_service(cfg, run_dir, job)
    token = (run_dir / "api_token").read_text().strip()
    live = Live(job, server, token)
    try:
        assert live.get("/status").json()["stage"] == "starting"  # answers before set-up
        job.setup()
        job.evaluation.baseline(job.split.eval)
        yield live
    finally:
        live.http.close()
        server.stop()
        try:
            job.trainer.finish(timeout_s=300)
        finally:
            job.generators.shutdown()
            job.judges.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _live_actor_count(pool) -> int:
    actors = pool.actors()
    ray.get([a.__ray_ready__.remote() for a in actors], timeout=120)  # all answer: alive
    return len(actors)


def _ensure_round0(job) -> None:
    """The tests between rounds need round 0 done (the first test runs it mid-scaling)."""
    if job.next_round < 1:
        job.round(0)


def _check_accounting(report: dict, shard_ids: set[str]) -> None:
    counts, failed = report["prompts"], [f["prompt_id"] for f in report["failed"]]
    assert counts["prompts"] == len(shard_ids)
    assert counts["annotated"] + counts["failed"] == len(shard_ids)  # nothing lost
    assert len(set(failed)) == len(failed) and set(failed) <= shard_ids  # nothing twice
    assert report["trainer"]["rows_put"] == counts["rows"]


def test_status_and_scaling_mid_round(live):
    job = live.job
    shard_ids = {p.id for p in job.split.shards[0]}
    out: dict = {}
    runner = threading.Thread(target=lambda: out.setdefault("report", job.round(0)))
    runner.start()
    try:
        # Wait until the round is under way: some prompts done, not all.
        deadline = time.monotonic() + 120
        while True:
            status = live.get("/status").json()
            progress = status["progress"] or {}
            if 0 < progress.get("prompts_done", 0) < progress.get("prompts", 0):
                break
            assert time.monotonic() < deadline and runner.is_alive(), status
            time.sleep(0.05)
        assert status["round"] == 0 and status["rounds"] == 2
        assert status["stage"] == "generate+judge+train"
        assert status["pools"]["generator"]["size"] == 1
        assert status["weight_version"] == 0 and status["completed_rounds"] == 0
        assert status["trainer"]["round"] == 0
        metrics = live.get("/metrics").text
        assert "sppo_round_prompts_done " in metrics and "sppo_round 0" in metrics

        grown = live.post("/pools/generator/scale", {"replicas": 2})
        assert grown.status_code == 200, grown.text
        assert grown.json()["size"] == 2 and grown.json()["max"] == 2
        assert live.post("/pools/judge/scale", {"replicas": 2}).json()["size"] == 2
        # Still mid-round: the resize happened while prompts were in flight.
        after = live.get("/status").json()
        assert after["stage"] == "generate+judge+train", after
        assert after["progress"]["prompts_done"] < after["progress"]["prompts"], after
        assert _live_actor_count(job.generators) == 2
        assert live.post("/pools/judge/scale", {"replicas": 1}).json()["size"] == 1
    finally:
        runner.join(timeout=600)
    report = out["report"]
    _check_accounting(report, shard_ids)
    # Both generators, the one added mid-round included, hold the trained weights.
    assert report["sync"]["generator_versions"] == [1, 1]
    assert job.judges.size == 1 and _live_actor_count(job.generators) == 2
    status = live.get("/status").json()
    assert status["weight_version"] == 1 and status["completed_rounds"] == 1


def test_reads_auth_and_bad_requests_between_rounds(live):
    _ensure_round0(live.job)
    anon = httpx.Client(base_url=live.server.url, timeout=30)
    try:
        assert anon.get("/healthz").status_code == 200
        for method, path in [("GET", "/status"), ("GET", "/metrics"), ("GET", "/rounds"),
                             ("POST", "/pools/generator/scale"), ("GET", "/openapi.json"),
                             ("POST", "/v1/chat/completions")]:
            r = anon.request(method, path, json={"replicas": 1})
            assert r.status_code == 401, (path, r.text)
            wrong = anon.request(method, path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, (path, wrong.text)
    finally:
        anon.close()

    rounds = live.get("/rounds").json()
    assert [r["round"] for r in rounds] == [0]
    assert rounds[0]["prompts"]["annotated"] + rounds[0]["prompts"]["failed"] == len(
        live.job.split.shards[0])

    metrics = live.get("/metrics").text
    # The pool's size, whatever the tests before this one left it at (2 after the scaling
    # test, 1 when this test runs alone).
    size = live.job.generators.size
    assert size in (1, 2) and f'sppo_pool_size{{pool="generator"}} {float(size)}' in metrics
    assert "sppo_rounds_completed_total 1.0" in metrics
    assert "# TYPE sppo_rounds_completed_total counter" in metrics
    assert "sppo_win_rate_vs_round0 " in metrics

    bad = live.post("/pools/generator/scale", {"replicas": "two"})
    assert bad.status_code == 422 and "replicas" in bad.json()["error"]["message"]
    unknown = live.post("/pools/trainer/scale", {"replicas": 1})
    assert unknown.status_code == 422 and "pool" in unknown.json()["error"]["message"]
    too_many = live.post("/pools/generator/scale", {"replicas": 3})
    assert too_many.status_code == 409
    assert "[min_replicas, max_replicas] = [1, 2]" in too_many.json()["error"]["message"]
    no_messages = live.post("/v1/chat/completions", {"messages": []})
    assert no_messages.status_code == 422 and "messages" in no_messages.json()["error"]["message"]

    chat = live.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Say something with many e's."}],
        "max_tokens": 8, "n": 2, "temperature": 1.0})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert len(body["choices"]) == 2 and body["system_fingerprint"] == "weights-v1"
    assert 1 <= body["usage"]["completion_tokens"] <= 16 and body["usage"]["prompt_tokens"] > 0
    # Greedy answers are the policy's argmax: the same twice.
    greedy = [live.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
        "temperature": 0}).json()["choices"][0]["message"]["content"] for _ in range(2)]
    assert greedy[0] == greedy[1]
    too_long = live.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]


def test_fuzzed_service_then_the_next_round_loses_nothing(live):
    """Schemathesis against the live job's service (positive and negative cases from the served
    schema): no 5xx, nothing accepted without the token. Accepted scale requests really resize
    the pools (within [1, 2]); round 1 then runs on whatever the fuzzing left and must still
    account for every prompt."""
    job = live.job
    _ensure_round0(job)

    def short_generation(case) -> None:
        # Keep accepted generations short on 2 cores; out-of-range values stay as they are.
        tokens = case.body.get("max_tokens") if isinstance(case.body, dict) else None
        if type(tokens) is int and 32 < tokens <= 4096:
            case.body["max_tokens"] = 32

    seen = fuzz_service(live.server.url, live.token, max_examples=8, adjust=short_generation)
    assert len(seen) == 6 and all(code < 500 for codes in seen.values() for code in codes), seen
    assert 422 in seen["POST /pools/{pool}/scale"] and 422 in seen["POST /v1/chat/completions"]

    report = job.round(1)
    _check_accounting(report, {p.id for p in job.split.shards[1]})
    assert report["sync"]["generator_versions"] == [2] * job.generators.size
    assert live.get("/status").json()["weight_version"] == 2


def test_driver_refuses_to_start_when_the_service_port_is_taken(ray_cluster, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code = main([*OVERRIDES, f"service.port={port}", f"run.output_dir={tmp_path}",
                     f"model.cache_dir={tmp_path / 'cache'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: service: control service failed to start" in err and str(port) in err
    assert not (tmp_path / "demo" / "state.json").exists()  # nothing ran


def test_service_with_the_token_from_the_environment(ray_cluster, tmp_path, monkeypatch):
    """The KubeRay set-up: the token comes from the environment and the run directory does not
    exist yet when the service starts. Nothing secret is written; the env token works."""
    from cluster.selfplay import SelfPlay

    monkeypatch.setenv(TOKEN_ENV, "from-the-env")
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "fresh" / "run"
    server = start_service(cfg, run_dir, SelfPlay(cfg, run_dir))
    try:
        info = (run_dir / "service.json").read_text()
        assert f"${TOKEN_ENV}" in info and "from-the-env" not in info
        assert not (run_dir / "api_token").exists()
        ok = httpx.get(f"{server.url}/status", headers={"Authorization": "Bearer from-the-env"})
        assert ok.status_code == 200 and ok.json()["stage"] == "starting"
        assert ok.json()["pools"] == {} and ok.json()["progress"] is None
    finally:
        server.stop()
