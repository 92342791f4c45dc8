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
`actors.dispatch.ActorDispatcher` is not, so `scale` must hold the same lock as the loop that
calls it (or hand the resize to that loop and wait for it); `actors.pool.Pool` is.

Not here: the job's interface and the request/response bodies (`cluster.service_api`), the
server thread and the token file (`cluster.server`), the job itself (`cluster.control`
implements `JobControl`), TLS (put a proxy in front when binding beyond loopback),
request-size limits and rate limiting.
"""

from __future__ import annotations

import hmac
import math
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.service_api import (AssistantMessage, ChatChoice, ChatCompletion, ChatRequest,
                                 Health, JobControl, PoolName, ScaleRequest, Usage, error_doc,
                                 error_response)

__all__ = ["create_app", "PROMETHEUS_CONTENT_TYPE"]

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_OPEN_PATHS = frozenset({"/healthz"})

_AUTH_DOC = error_doc(401, "Missing or wrong bearer token.")
# For a route whose own media type is not JSON (FastAPI would document its errors as that).
_AUTH_DOC_JSON = {401: {"description": "Missing or wrong bearer token.", "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}}
_BAD_DOC = {**error_doc(422, "Malformed request; the message names every bad field."),
            **error_doc(400, "The body cannot be decoded (not UTF-8).")}


# --------------------------------------------------------------------------- auth


class _BearerAuth:
    """ASGI middleware: 401 for any HTTP request outside `open_paths` without the token."""

    def __init__(self, app: Any, token: str, open_paths: frozenset[str]):
        self.app = app
        self._token = token.encode()
        self._open = open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self._open and not self._ok(scope):
            response = error_response(401, "missing or invalid bearer token: send "
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
        return error_response(422, "; ".join(parts) or "invalid request", details=details)

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Any, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    def _crash(request: Any, exc: Exception) -> JSONResponse:
        # Starlette re-raises after sending this, so uvicorn logs the traceback.
        return error_response(500, f"internal error: {exc.__class__.__name__}")

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
                         **error_doc(409, "Refused by the pool, e.g. outside [min, max].")})
    def scale(pool: PoolName, body: ScaleRequest) -> dict:
        try:
            return control.scale(pool.value, body.replicas)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              summary="Chat with the current policy (OpenAI-style)",
              responses={**_AUTH_DOC, **_BAD_DOC,
                         **error_doc(400, "The body cannot be decoded (not UTF-8), or the policy "
                                     "cannot serve this request as asked."),
                         **error_doc(503, "No generator can serve right now.")})
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
