"""Tests of cluster/service.py: the real service on uvicorn (loopback, a free port) answering real
HTTP requests, with a `JobControl` backed by real `ActorDispatcher`s of small echo actors on the
local Ray cluster. `EchoJob` stands in for the driver: a job loop streaming items through a pool
on its own thread while the service's threads read its state and resize its pools.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import ray

from actors.dispatch import ActorDispatcher
from cluster.server import ControlServer, resolve_token
from cluster.service import PROMETHEUS_CONTENT_TYPE, create_app
from ray_echo import Echo
from service_fuzz import fuzz_service

TOKEN_ENV = "SPPO_TEST_SERVICE_TOKEN"

# Every endpoint behind the token, with a valid request for it.
AUTHED = [
    ("GET", "/status", None),
    ("GET", "/metrics", None),
    ("GET", "/rounds", None),
    ("POST", "/pools/judge/scale", {"replicas": 1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/openapi.json", None),
]


def _work(actor, x):
    return actor.work.remote(x)


def _echo_pool(name: str, size: int, delay: float) -> ActorDispatcher:
    make = lambda: ray.remote(Echo).options(num_cpus=0.1).remote(delay)  # noqa: E731
    return ActorDispatcher(make, size=size, max_in_flight=2, name=name)


class EchoJob:
    """A `JobControl` over real echo-actor pools, standing in for the driver's.

    `run(pool, stop)` is the job loop: it keeps `backlog` items pending in the pool until `stop`
    is set, then drains. `ActorDispatcher` is not thread-safe, so the loop and `scale` (called on
    the server's threads) share `lock`, and the loop sleeps outside it so that a waiting request
    gets it. `chat` is a TEST STAND-IN: it echoes the last user message through a generator
    actor; the real generator-backed chat comes with the driver.
    """

    def __init__(self, pools: dict[str, ActorDispatcher], bounds: dict[str, tuple[int, int]]):
        self.pools, self.bounds = pools, bounds
        self.lock = threading.Lock()
        self.stage = "idle"
        self.submitted = 0
        self.results: list = []
        self.reports: list[dict] = []
        self.control_calls = 0
        self._start = time.monotonic()

    # ---- the job loop
    def run(self, pool_name: str, stop: threading.Event, backlog: int = 6) -> None:
        pool = self.pools[pool_name]
        with self.lock:
            self.stage = f"{pool_name}:running"
        while True:
            with self.lock:
                if stop.is_set() and not pool.num_pending():
                    break
                while not stop.is_set() and pool.num_pending() < backlog:
                    pool.submit(self.submitted, _work)
                    self.submitted += 1
                self.results.extend(pool.results(timeout=0.05))
            time.sleep(0.005)
        with self.lock:
            self.stage = "idle"
            self.reports.append({"round": len(self.reports), "items": len(self.results)})

    # ---- JobControl
    def _pool_status(self, name: str) -> dict:
        lo, hi = self.bounds[name]
        pool = self.pools[name]
        return {"size": pool.size, "min": lo, "max": hi, "pending": pool.num_pending()}

    def status(self) -> dict:
        with self.lock:
            done = len(self.results)
            return {"run": "echo-test", "round": len(self.reports), "rounds": 3,
                    "stage": self.stage,
                    "progress": {"submitted": self.submitted, "done": done},
                    "throughput": {"items_per_s": done / (time.monotonic() - self._start)},
                    "pools": {name: self._pool_status(name) for name in self.pools},
                    "weight_version": len(self.reports)}

    def metrics(self) -> dict[str, float]:
        with self.lock:
            return {"sppo_items_done": len(self.results), "items_submitted_total": self.submitted,
                    "throughput/items per s": 1.5, "stage": self.stage}  # text: skipped

    def rounds(self) -> list[dict]:
        with self.lock:
            return list(self.reports)

    def scale(self, pool: str, replicas: int) -> dict:
        self.control_calls += 1
        if pool not in self.pools:
            raise ValueError(f"unknown pool {pool!r}")
        lo, hi = self.bounds[pool]
        if not lo <= replicas <= hi:
            raise ValueError(f"{pool}: replicas must be within [{lo}, {hi}] (got {replicas})")
        with self.lock:
            self.pools[pool].resize(replicas)
            return self._pool_status(pool)

    def chat(self, messages, *, max_tokens, temperature, top_p, n):
        self.control_calls += 1
        with self.lock:
            actors = self.pools["generator"].actors()
        if not actors:
            raise RuntimeError("no live generator to serve the request")
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        words, _ = ray.get(actors[0].work.remote(last.split()))
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        out = words[:max_tokens]
        return [{"text": " ".join(out), "finish_reason": "length" if len(words) > max_tokens
                 else "stop", "prompt_tokens": prompt_tokens, "completion_tokens": len(out),
                 "weight_version": 7} for _ in range(n)]


@contextmanager
def serving(control, token: str):
    server = ControlServer(create_app(control, token), port=0).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pools(ray_cluster):
    made = {"generator": _echo_pool("generator", 1, delay=0.0),
            "judge": _echo_pool("judge", 1, delay=0.05)}
    yield made
    for pool in made.values():
        pool.shutdown()


@pytest.fixture(scope="module")
def live(pools, tmp_path_factory):
    """The service over an `EchoJob`, its token generated into a run directory."""
    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(TOKEN_ENV, raising=False)
        token = resolve_token(TOKEN_ENV, run_dir)
    job = EchoJob(pools, {"generator": (1, 2), "judge": (1, 3)})
    with serving(job, token) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        yield client, job, run_dir, token


@contextmanager
def running(job: EchoJob, pool: str):
    stop = threading.Event()
    thread = threading.Thread(target=job.run, args=(pool, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the job loop did not finish"


def _wait(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --------------------------------------------------------------------------- auth and token


def test_token_file_is_owner_only_and_env_wins(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    old_umask = os.umask(0)  # a permissive umask must not widen the file
    try:
        first = resolve_token(TOKEN_ENV, tmp_path / "run")
    finally:
        os.umask(old_umask)
    path = tmp_path / "run" / "api_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first and len(first) >= 40
    second = resolve_token(TOKEN_ENV, tmp_path / "run")  # a restart replaces it
    assert second != first and path.read_text().strip() == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["api_token"]  # no temp file left

    monkeypatch.setenv(TOKEN_ENV, "  from-env-token  ")
    assert resolve_token(TOKEN_ENV, tmp_path / "other") == "from-env-token"
    assert not (tmp_path / "other" / "api_token").exists()
    monkeypatch.setenv(TOKEN_ENV, "two words")
    with pytest.raises(ValueError, match=TOKEN_ENV):
        resolve_token(TOKEN_ENV, tmp_path / "other")


def test_live_token_file_is_0600(live):
    _, _, run_dir, token = live
    path = run_dir / "api_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == token


def test_every_endpoint_but_healthz_needs_the_token(live):
    client, job, _, token = live
    anon = httpx.Client(base_url=client.base_url, timeout=30)
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/healthz").json() == {"status": "ok"}
    calls_before = job.control_calls
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"},
                    {"Authorization": token}, {"Authorization": f"Bearer {token}x"}]:
        for method, path, body in AUTHED + [("GET", "/no-such-page", None),
                                            ("POST", "/pools/judge/scale", "{not json")]:
            kwargs = {"content": body} if isinstance(body, str) else {"json": body}
            r = anon.request(method, path, headers=headers, **kwargs)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in r.json()["error"]["message"]
    assert job.control_calls == calls_before  # refused before reaching the job
    for method, path, body in AUTHED:
        assert client.request(method, path, json=body).status_code == 200, path
    anon.close()


def test_create_app_refuses_an_empty_token():
    with pytest.raises(ValueError, match="token"):
        create_app(object(), "")  # type: ignore[arg-type]


def test_server_binds_loopback_free_port_and_reports_bind_failure():
    app = create_app(object(), "t")  # type: ignore[arg-type]
    server = ControlServer(app, port=0).start()
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        with pytest.raises(RuntimeError, match="failed to start"):
            ControlServer(app, port=server.port).start()
    finally:
        server.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=2)


# --------------------------------------------------------------------------- the running job

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*"'
                     r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*")*\})? (\S+)$')


def _parse_metrics(text: str) -> dict[str, float]:
    """Check every line of Prometheus text format 0.0.4; return {name{labels}: value}."""
    helped, typed, samples = set(), set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter"), line
            typed.add(name)
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            assert m.group(1) in helped and m.group(1) in typed, f"no HELP/TYPE for {line!r}"
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    # And an independent parser agrees.
    from prometheus_client.parser import text_string_to_metric_families

    parsed = {s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in s.labels.items()) + "}"
                        if s.labels else ""): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    assert parsed == samples
    return samples


def test_status_metrics_and_rounds_reflect_the_running_job(live):
    client, job, _, _ = live
    with running(job, "judge"):
        _wait(lambda: client.get("/status").json()["progress"]["done"] >= 5)
        status = client.get("/status").json()
        assert status["run"] == "echo-test" and status["stage"] == "judge:running"
        assert status["pools"]["judge"] == {"size": 1, "min": 1, "max": 3,
                                            "pending": status["pools"]["judge"]["pending"]}
        assert status["pools"]["judge"]["pending"] > 0  # work in flight right now

        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"] == PROMETHEUS_CONTENT_TYPE
        samples = _parse_metrics(r.text)
        assert samples["sppo_items_done"] >= 5
        assert samples['sppo_pool_size{pool="judge"}'] == 1
        assert samples['sppo_pool_max{pool="judge"}'] == 3
        assert samples['sppo_pool_size{pool="generator"}'] == 1
        assert samples["sppo_throughput_items_per_s"] == 1.5  # name sanitised
        assert "# TYPE sppo_items_submitted_total counter" in r.text
        assert not any(name.startswith("sppo_stage") for name in samples)  # text skipped
        rounds_before = len(client.get("/rounds").json())
    status = client.get("/status").json()
    assert status["stage"] == "idle" and status["pools"]["judge"]["pending"] == 0
    assert status["progress"]["done"] == status["progress"]["submitted"]
    rounds = client.get("/rounds").json()
    assert len(rounds) == rounds_before + 1 and rounds[-1]["items"] == len(job.results)


def test_scaling_through_the_api_changes_live_actors_mid_round(live):
    client, job, _, _ = live
    pool = job.pools["judge"]
    job.results.clear()
    job.submitted = 0
    with running(job, "judge"):
        _wait(lambda: len(job.results) >= 3)
        r = client.post("/pools/judge/scale", json={"replicas": 3})
        assert r.status_code == 200, r.text
        assert r.json()["size"] == 3 and r.json()["pending"] > 0  # mid-round
        with job.lock:
            grown = pool.actors()
        assert len(grown) == 3
        assert len(set(ray.get([a.pid.remote() for a in grown]))) == 3  # three live processes
        _wait(lambda: len({pid for _, (_, pid) in list(job.results)}) == 3)  # all took work

        r = client.post("/pools/judge/scale", json={"replicas": 1})
        assert r.status_code == 200 and r.json()["size"] == 1 and r.json()["pending"] > 0
        with job.lock:
            assert len(pool.actors()) == 1
        seen = len(job.results)
        _wait(lambda: len(job.results) >= seen + 5)  # the round goes on with one actor
        assert client.get("/status").json()["pools"]["judge"]["size"] == 1
    items = sorted(item for item, _ in job.results)
    assert items == list(range(job.submitted))  # every item back exactly once
    assert all(item == echoed for item, (echoed, _) in job.results)


def test_scale_out_of_range_is_refused_with_the_message(live):
    client, job, _, _ = live
    for replicas in (4, 0):
        r = client.post("/pools/judge/scale", json={"replicas": replicas})
        assert r.status_code == 409, r.text
        assert r.json()["error"]["message"] == (f"judge: replicas must be within [1, 3] "
                                                f"(got {replicas})")
    assert job.pools["judge"].size == 1


CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, where", [
    ("/pools/judge/scale", {}, "body.replicas: Field required"),
    ("/pools/judge/scale", {"replicas": "2"}, "body.replicas: Input should be a valid integer"),
    ("/pools/judge/scale", {"replicas": 2.0}, "body.replicas: Input should be a valid integer"),
    ("/pools/judge/scale", {"replicas": True}, "body.replicas: Input should be a valid integer"),
    ("/pools/judge/scale", {"replicas": -1}, "body.replicas: Input should be greater than or "
                                             "equal to 0"),
    ("/pools/judge/scale", {"replicas": 2, "pool": "judge"}, "body.pool: Extra inputs"),
    ("/pools/judge/scale", [2], "body: Input should be a valid dictionary"),
    ("/pools/judge/scale", "{replicas: 2", "body.1: invalid JSON"),
    ("/pools/trainer/scale", {"replicas": 2}, "path.pool: Input should be 'generator' or "
                                              "'judge'"),
    (CHAT, {}, "body.messages: Field required"),
    (CHAT, {"messages": []}, "body.messages: List should have at least 1 item"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "body.messages.0.role: Input "
                                                              "should be 'system', 'user' or"),
    (CHAT, {"messages": [{"role": "user"}]}, "body.messages.0.content: Field required"),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, "body.messages.0.content: Input "
                                                           "should be a valid string"),
    (CHAT, {"messages": USER, "temperature": -0.1}, "body.temperature: Input should be greater "
                                                    "than or equal to 0"),
    (CHAT, {"messages": USER, "temperature": "hot"}, "body.temperature: Input should be a "
                                                     "valid number"),
    (CHAT, {"messages": USER, "top_p": 0}, "body.top_p: Input should be greater than 0"),
    (CHAT, {"messages": USER, "max_tokens": 0}, "body.max_tokens: Input should be greater"),
    (CHAT, {"messages": USER, "max_tokens": 4097}, "body.max_tokens: Input should be less"),
    (CHAT, {"messages": USER, "n": 9}, "body.n: Input should be less than or equal to 8"),
    (CHAT, {"messages": USER, "stream": True}, "body.stream: Input should be False"),
    (CHAT, '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     "body.temperature: Input should be a finite number"),
])
def test_malformed_requests_get_422_with_a_message(live, path, body, where):
    client, job, _, _ = live
    calls_before = job.control_calls
    if isinstance(body, str):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert where in error["message"], error["message"]
    assert error["type"] == "unprocessable_entity" and error["details"]
    assert job.control_calls == calls_before  # validated before the job saw it


def test_chat_answers_in_the_openai_shape(live):
    client, _, _, _ = live
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "one two three four five"}]
    r = client.post(CHAT, json={"model": "mine", "messages": messages, "max_tokens": 3, "n": 2,
                                "temperature": 0, "user": "ignored-openai-field"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "mine"
    assert body["system_fingerprint"] == "weights-v7"
    assert body["choices"] == [
        {"index": i, "message": {"role": "assistant", "content": "one two three"},
         "finish_reason": "length"} for i in range(2)]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}

    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "short"}]})
    assert r.status_code == 200
    assert r.json()["model"] == "sppo-policy"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert r.json()["choices"][0]["message"]["content"] == "short"


def test_chat_without_a_generator_is_503(live):
    client, job, _, _ = live
    with job.lock:
        job.pools["generator"].resize(0)
    try:
        r = client.post(CHAT, json={"messages": USER})
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "no live generator to serve the request"
    finally:
        with job.lock:
            job.pools["generator"].resize(1)


def test_openapi_schema_lists_every_endpoint(live):
    client, _, _, _ = live
    schema = client.get("/openapi.json").json()
    ops = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    assert ops == {("GET", "/healthz"), ("GET", "/status"), ("GET", "/metrics"),
                   ("GET", "/rounds"), ("POST", "/pools/{pool}/scale"),
                   ("POST", "/v1/chat/completions")}
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http",
                                                                 "scheme": "bearer"}
    assert schema["security"] == [{"bearer": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    scale = schema["paths"]["/pools/{pool}/scale"]["post"]
    assert {"401", "409", "422"} <= set(scale["responses"])
    assert client.get("/docs").status_code == 404  # its page would fetch the schema tokenless


# --------------------------------------------------------------------------- fuzzing


def test_schemathesis_finds_no_server_error_and_no_open_endpoint(pools):
    """Property-based requests from the served schema, positive and negative, against a live
    service over the real pools. Pool bounds are pinned to the current size so that accepted
    scale requests do not start and stop actors on a 2-core machine."""
    job = EchoJob(pools, {"generator": (1, 1), "judge": (1, 1)})
    token = "fuzz-token"
    with serving(job, token) as url:
        seen = fuzz_service(url, token, max_examples=20, budget_s=90)
    assert len(seen) == 6 and all(code < 500 for codes in seen.values() for code in codes), seen
    assert {200, 422} <= seen["POST /v1/chat/completions"], seen  # both sides of validation
    assert 422 in seen["POST /pools/{pool}/scale"], seen
