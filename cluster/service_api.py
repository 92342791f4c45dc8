"""What the control service speaks: the job's side of it (`JobControl`) and the HTTP bodies.

`JobControl` is what the service needs from the running job (`cluster.control.SelfPlayControl`
implements it); the pydantic models are the requests and responses, strict (no "3" for 3, no
true for 1, finite floats) so bad input never reaches the job, and errors always come in the
shape `{"error": {"type", "message", "details"?}}` (the OpenAI error envelope, so OpenAI clients
show the message).

Not here: routing, authentication and the metrics text (`cluster.service`), the server thread
(`cluster.server`).
"""

from __future__ import annotations

import enum
import http
from typing import Any, Literal, Optional, Protocol

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["JobControl", "PoolName", "ScaleRequest", "ChatMessage", "ChatRequest",
           "AssistantMessage", "ChatChoice", "Usage", "ChatCompletion", "Health", "ErrorInfo",
           "ErrorBody", "error_response", "error_doc"]


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


def error_response(code: int, message: str, *, details: Optional[list] = None,
           headers: Optional[dict[str, str]] = None) -> JSONResponse:
    kind = http.HTTPStatus(code).phrase.lower().replace(" ", "_").replace("-", "_")
    info = ErrorInfo(type=kind, message=message, details=details)
    return JSONResponse(ErrorBody(error=info).model_dump(exclude_none=True), status_code=code,
                        headers=headers)


def error_doc(code: int, why: str) -> dict:
    return {code: {"model": ErrorBody, "description": why}}
