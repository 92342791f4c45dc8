"""The job's control service: a small authenticated HTTP API, started by the driver.

Endpoints (every one except `/healthz` needs `Authorization: Bearer <token>`):
- `GET /healthz`: liveness of the server only (never touches the job), no token.
- `GET /status`: the driver's `JobControl.status()` as JSON.
- `GET /metrics`: Prometheus text format 0.0.4: `JobControl.metrics()` plus one labelled gauge
  per numeric field of each pool in `status()["pools"]`, e.g. `sppo_pool_size{pool="judge"}`.
- `POST /pools/{generator|judge}/scale` with `{"replicas": n}`: resize a pool while a round runs.
- `GET /rounds`: the round reports so far.
- `POST /v1/chat/completions`: OpenAI-style chat with the current policy.
- `GET /openapi.json`: the OpenAPI schema. It needs the token too: the issue asks for every
  endpoint but `/healthz` behind the token, and fuzzers and clients can send a header. For the
  same reason FastAPI's `/docs` and `/redoc` pages are off (their browser-side fetch of the
  schema carries no token).

Authentication is an ASGI middleware in front of routing, not a FastAPI dependency, so that it
runs before FastAPI parses the body: a request without the token gets 401 whatever its body or
path (a dependency would let a malformed body answer 422 first and unknown paths 404).

Errors always have the shape `{"error": {"type": str, "message": str, "details": [...]?}}` (the
OpenAI error envelope, so OpenAI clients show the message): 401 bad or missing token, 409 a
resize the control refused (outside the pool's [min, max]), 422 a malformed request (the message
names every bad field), 400 a body that is not UTF-8 (FastAPI's own answer) or a chat request
the policy cannot serve as asked, 503 no generator can serve a chat. Request models are strict
(no "3" for 3, no true for 1, finite floats), and every body is validated before the control is
called, so bad input never reaches it.

Threading: endpoints are plain functions that FastAPI runs on its worker threads, concurrently
with the driver's own loop. A `JobControl` must therefore be thread-safe; in particular
`ActorPool` is not, so `scale` must hold the same lock as the loop that calls the pool (or hand
the resize to that loop and wait for it).

Not here: the job itself (the driver implements `JobControl`), TLS (put a proxy in front when
binding beyond loopback), request-size limits and rate limiting.
"""

from __future__ import annotations

import enum
import hmac
import http
import logging
import math
import os
import re
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional, Protocol

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["JobControl", "create_app", "resolve_token", "ControlServer", "PROMETHEUS_CONTENT_TYPE"]

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TOKEN_FILE = "api_token"
_OPEN_PATHS = frozenset({"/healthz"})


class JobControl(Protocol):
    """What the service needs from the running job; the driver implements it.

    Called from the server's worker threads (see the module docstring): implementations must be
    thread-safe.

    - `status()`: `{"run": name, "round": int, "rounds": int, "stage": str, "progress": {...},
      "throughput": {...}, "pools": {"generator": {"size": n, "min": a, "max": b,
      "pending": p}, "judge": {...}}, "weight_version": int}`. Served as is; every numeric
      field of each pool also becomes a `sppo_pool_<field>{pool="..."}` gauge in `/metrics`.
    - `metrics()`: flat metric name -> number, e.g. `{"sppo_prompts_done": 12}`. Names are
      sanitised to `[a-zA-Z0-9_]` and prefixed with `sppo_` when they lack it; names ending in
      `_total` are typed as counters, the rest as gauges; non-numeric values are skipped.
    - `rounds()`: the round reports so far (JSON-serialisable dicts).
    - `scale(pool, replicas)`: resize; raises `ValueError` with a message when `replicas` is
      outside the pool's [min, max] or the pool is unknown (-> 409); returns the pool's new
      status (the same dict as in `status()["pools"][pool]`).
    - `chat(messages, ...)`: `n` dicts `{"text": str, "finish_reason": "stop" | "length",
      "prompt_tokens": int, "completion_tokens": int}`, optionally with `"weight_version": int`
      (reported as `system_fingerprint`). Raises `RuntimeError` when no generator can serve
      (-> 503) and may raise `ValueError` when the request cannot be served as asked, e.g. a
      prompt longer than the model's context (-> 400).
    """

    def status(self) -> dict: ...

    def metrics(self) -> dict[str, float]: ...

    def rounds(self) -> list[dict]: ...

    def scale(self, pool: str, replicas: int) -> dict: ...

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float,
             n: int) -> list[dict]: ...


# --------------------------------------------------------------------------- request/response


class _Strict(BaseModel):
    # No "3" for 3, no true for 1: a client sending the wrong type has a bug worth hearing about.
    model_config = ConfigDict(strict=True)


class PoolName(str, enum.Enum):
    generator = "generator"
    judge = "judge"


class ScaleRequest(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid")
    replicas: int = Field(ge=0, description="Target number of actors; must lie within the "
                                            "pool's configured [min_replicas, max_replicas].")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Strict):
    """OpenAI's request body, the fields this service honours. Other OpenAI fields (`stop`,
    `user`, penalties, ...) are accepted and ignored so that stock clients work."""

    model: Optional[str] = Field(None, description="Echoed back; the policy being trained "
                                                   "is always the one that answers.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.7, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=8)
    stream: Literal[False] = Field(False, description="Streaming is not supported.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorInfo(BaseModel):
    type: str
    message: str
    details: Optional[list[dict[str, Any]]] = None


class ErrorBody(BaseModel):
    error: ErrorInfo


def _error(code: int, message: str, *, details: Optional[list] = None,
           headers: Optional[dict[str, str]] = None) -> JSONResponse:
    kind = http.HTTPStatus(code).phrase.lower().replace(" ", "_").replace("-", "_")
    info = ErrorInfo(type=kind, message=message, details=details)
    return JSONResponse(ErrorBody(error=info).model_dump(exclude_none=True), status_code=code,
                        headers=headers)


def _doc(code: int, why: str) -> dict:
    return {code: {"model": ErrorBody, "description": why}}


_AUTH_DOC = _doc(401, "Missing or wrong bearer token.")
# For a route whose own media type is not JSON (FastAPI would document its errors as that).
_AUTH_DOC_JSON = {401: {"description": "Missing or wrong bearer token.", "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}}
_BAD_DOC = {**_doc(422, "Malformed request; the message names every bad field."),
            **_doc(400, "The body cannot be decoded (not UTF-8).")}


# --------------------------------------------------------------------------- auth


class _BearerAuth:
    """ASGI middleware: 401 for any HTTP request outside `open_paths` without the token."""

    def __init__(self, app: Any, token: str, open_paths: frozenset[str]):
        self.app = app
        self._token = token.encode()
        self._open = open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self._open and not self._ok(scope):
            response = _error(401, "missing or invalid bearer token: send "
                                   "'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _ok(self, scope: dict) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                # Bytes on both sides: compare_digest on str rejects non-ASCII input.
                return (scheme.lower() == b"bearer"
                        and hmac.compare_digest(credentials.strip(), self._token))
        return False


def resolve_token(env_var: str, run_dir: Path) -> str:
    """The API token: `$env_var` when set, else a new random one written to
    `<run_dir>/api_token`, readable by the owner only (0600 from creation: the file is created
    under a temporary name with O_EXCL and mode 0600, then renamed over any old token)."""
    token = os.environ.get(env_var, "").strip()
    if token:
        if not re.fullmatch(r"[\x21-\x7e]+", token):
            raise ValueError(f"${env_var}: the API token must be printable ASCII without spaces")
        return token
    token = secrets.token_urlsafe(32)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{TOKEN_FILE}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits off, never added; make it exact
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, run_dir / TOKEN_FILE)
    return token


# --------------------------------------------------------------------------- metrics text


def _metric_name(name: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return name if name.startswith("sppo_") else f"sppo_{name}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _prometheus_text(flat: dict[str, Any], pools: dict[str, dict[str, Any]]) -> str:
    # family name -> (help, {label text: value}); one HELP/TYPE block per family.
    families: dict[str, tuple[str, dict[str, float]]] = {}

    def add(raw: str, help_text: str, labels: str, value: Any) -> None:
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)):
            return  # a text field in the control's dict is not a sample
        name = _metric_name(raw)
        families.setdefault(name, (help_text, {}))[1][labels] = float(value)

    for key, value in flat.items():
        add(key, f"SPPO job metric {key!r}.", "", value)
    for pool, fields in pools.items():
        for key, value in fields.items():
            add(f"pool_{key}", f"Actor pool {key!r}, by pool.", f'{{pool="{_label(pool)}"}}',
                value)

    lines = []
    for name, (help_text, samples) in families.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {_number(value)}" for labels, value in samples.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the app


def create_app(control: JobControl, token: str) -> FastAPI:
    """The FastAPI app serving `control`, every route but `/healthz` behind `token`."""
    if not token:
        raise ValueError("create_app: the API token must not be empty")
    app = FastAPI(title="SPPO control service", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(_BearerAuth, token=token, open_paths=_OPEN_PATHS)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        details, parts = [], []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"]
            if e["type"] == "json_invalid":
                msg = f"invalid JSON: {e.get('ctx', {}).get('error', msg)}"
            details.append({"loc": [str(p) for p in e["loc"]], "msg": msg, "type": e["type"]})
            parts.append(f"{loc}: {msg}")
        return _error(422, "; ".join(parts) or "invalid request", details=details)

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Any, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    def _crash(request: Any, exc: Exception) -> JSONResponse:
        # Starlette re-raises after sending this, so uvicorn logs the traceback.
        return _error(500, f"internal error: {exc.__class__.__name__}")

    @app.get("/healthz", response_model=Health, summary="Liveness of the server (no token)")
    def healthz() -> Health:
        return Health()

    @app.get("/status", response_model=dict[str, Any], responses=_AUTH_DOC,
             summary="Round, stage progress, throughput, pool sizes, weight version")
    def status() -> dict:
        return control.status()

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
             responses=_AUTH_DOC_JSON)
    def metrics() -> PlainTextResponse:
        text = _prometheus_text(control.metrics(), control.status()["pools"])
        return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/rounds", response_model=list[dict[str, Any]], responses=_AUTH_DOC,
             summary="The round reports so far")
    def rounds() -> list[dict]:
        return control.rounds()

    @app.post("/pools/{pool}/scale", response_model=dict[str, Any], summary="Resize a pool",
              responses={**_AUTH_DOC, **_BAD_DOC,
                         **_doc(409, "Refused by the pool, e.g. outside [min, max].")})
    def scale(pool: PoolName, body: ScaleRequest) -> dict:
        try:
            return control.scale(pool.value, body.replicas)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              summary="Chat with the current policy (OpenAI-style)",
              responses={**_AUTH_DOC, **_BAD_DOC,
                         **_doc(400, "The body cannot be decoded (not UTF-8), or the policy "
                                     "cannot serve this request as asked."),
                         **_doc(503, "No generator can serve right now.")})
    def chat(body: ChatRequest) -> ChatCompletion:
        messages = [m.model_dump() for m in body.messages]
        try:
            outs = control.chat(messages, max_tokens=body.max_tokens,
                                temperature=body.temperature, top_p=body.top_p, n=body.n)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        except RuntimeError as exc:
            raise HTTPException(503, str(exc)) from None
        choices = [ChatChoice(index=i, message=AssistantMessage(content=o["text"]),
                              finish_reason=o["finish_reason"]) for i, o in enumerate(outs)]
        prompt_tokens = outs[0]["prompt_tokens"] if outs else 0  # one prompt for all n
        completion_tokens = sum(o["completion_tokens"] for o in outs)
        versions = {o["weight_version"] for o in outs if "weight_version" in o}
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
            model=body.model or "sppo-policy", choices=choices,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
            system_fingerprint=(f"weights-v{max(versions)}" if versions else None))

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="Control service of an SPPO job.")
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            for path in _OPEN_PATHS:
                for operation in schema["paths"][path].values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    return app


# --------------------------------------------------------------------------- the server


class ControlServer:
    """Runs `app` with uvicorn on a daemon thread for the life of the job.

    `port=0` binds a free port; `.port` holds the bound one once `start()` returns.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8100, *,
                 log_level: str = "warning", start_timeout_s: float = 30.0):
        self.host = host
        self.port = port
        self._start_timeout_s = start_timeout_s
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "ControlServer":
        if self._thread is not None:
            raise RuntimeError("ControlServer.start: already started")
        self._thread = threading.Thread(target=self._run, name="sppo-control-service",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():  # uvicorn exits its thread when it cannot bind
                raise RuntimeError(f"control service failed to start on "
                                   f"{self.host}:{self.port} (see the uvicorn error above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"control service did not start within "
                                   f"{self._start_timeout_s:.0f}s")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        if self.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("control service listens on %s beyond loopback: anyone who can reach it "
                        "with the token can scale pools; put TLS in front", self.url)
        log.info("control service on %s", self.url)
        return self

    def _run(self) -> None:
        try:
            self._server.run()
        except SystemExit:  # uvicorn's answer to a port it cannot bind; it logged why
            pass

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._thread = None

    def __enter__(self) -> "ControlServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
