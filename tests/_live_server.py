"""A real uvicorn server on 127.0.0.1 (a free port) in a background thread, and a small HTTP client, for the server
tests. Requests go through real sockets (http.client), so disconnects and body limits behave as in production."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from typing import Any

from PIL import Image


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``with LiveServer(config) as srv:`` serves ``create_app(config)``; ``srv.call(...)`` sends requests.

    Attributes:
        app: the FastAPI app; ``app.state.server`` is its :class:`sd_mlx.server.app.Server`.
        port: the port.
    """

    def __init__(self, config: Any, load: Any = None, auth: tuple[str, str] | None = None) -> None:
        import uvicorn

        from sd_mlx.server import create_app

        self.app = create_app(config, load=load)
        self.port = free_port()
        self.auth = auth
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, name="uvicorn-test", daemon=True)

    @property
    def server(self) -> Any:
        """The :class:`sd_mlx.server.app.Server` behind the app."""
        return self.app.state.server

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(60)
        assert not self._thread.is_alive(), "the test server did not stop"

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, dict[str, str], Any]:
        """Send one request; returns ``(status, headers, parsed JSON or the text)``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = dict(headers or {})
        if self.auth is not None and "Authorization" not in hdrs:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            hdrs["Authorization"] = f"Basic {token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
            out_headers = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        text = payload.decode("utf-8", "replace")
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, out_headers, parsed

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """:meth:`call` that expects 200 and returns the JSON."""
        status, _, data = self.call(method, path, body, **kw)
        assert status == 200, (status, data)
        return data

    def wait_for(self, predicate: Any, timeout: float = 60, what: str = "condition") -> Any:
        """Poll ``GET /sdapi/v1/progress?skip_current_image=true`` until ``predicate(progress)`` is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.ok("GET", "/sdapi/v1/progress?skip_current_image=true")
            if predicate(p):
                return p
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")


def decode_png(b64: str) -> Image.Image:
    """A base64 PNG from a response, loaded."""
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def png_b64(image: Image.Image, fmt: str = "PNG") -> str:
    """``image`` encoded as base64 (PNG by default)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()
