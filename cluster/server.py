"""The control service's server: uvicorn on a daemon thread for the life of the job
(`ControlServer`), and the API token it checks (`resolve_token`: from the environment, or a new
random one in the run directory, readable by the owner only).

Not here: the app (`cluster.service`).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI

__all__ = ["ControlServer", "resolve_token", "TOKEN_FILE"]

log = logging.getLogger("cluster.service")

TOKEN_FILE = "api_token"


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
