"""ASGI middleware of the server: a request-body size limit and HTTP basic authentication.

Both are plain ASGI wrappers (no body is parsed here): the size limit reads the body up to its bound before the
application sees it and answers 413 above it; the login check compares credentials in constant time and answers
401 with ``WWW-Authenticate: Basic`` (as AUTOMATIC1111's ``--api-auth`` does).
"""

from __future__ import annotations

import base64
import binascii
import json
from secrets import compare_digest
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413.

    The body is read here and replayed to the application; later ``receive`` calls (a client disconnecting) pass
    through. An oversized body is read to its end and dropped before the 413 is sent (unread data would make the
    connection close with a reset, and the client might never see the answer), unless it is larger than
    ``drain_bytes`` (default ``16 * max_bytes``): then the 413 goes out at once and the connection is closed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else 16 * max_bytes

    async def _refuse(self, send: Send) -> None:
        await _send_json(send, 413, {"error": "RequestTooLarge",
                                     "detail": f"request body is larger than this server's limit of "
                                               f"{self.max_bytes} bytes (--max-body-mb)"},
                         [(b"connection", b"close")])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.drain_bytes:
                    await self._refuse(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            body = message.get("body", b"")
            size += len(body)
            if size <= self.max_bytes:
                chunks.append(body)
            elif chunks:
                chunks = []  # over the limit: keep reading (to drain), keep nothing
            if not message.get("more_body", False) or size > self.drain_bytes:
                break
        if size > self.max_bytes:
            await self._refuse(send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BasicAuth:
    """Require HTTP basic credentials from ``credentials`` (``{user: password}``) on every HTTP request."""

    def __init__(self, app: ASGIApp, credentials: dict[str, str]) -> None:
        self.app, self.credentials = app, dict(credentials)

    def _allowed(self, scope: Scope) -> bool:
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
        if header is None:
            return False
        scheme, _, encoded = header.decode("latin-1").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return False
        ok = False
        for name, secret in self.credentials.items():  # compare with every entry: no timing hint on user names
            ok |= compare_digest(user.encode(), name.encode()) & compare_digest(password.encode(), secret.encode())
        return bool(sep) and ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            await _send_json(send, 401, {"error": "Unauthorized", "detail": "Incorrect username or password"},
                             [(b"www-authenticate", b'Basic realm="sd_mlx"')])
            return
        await self.app(scope, receive, send)
