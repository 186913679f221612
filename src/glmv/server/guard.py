"""The server's front door: a pure ASGI middleware that checks the API key and limits request bodies.

Starlette's ``@app.middleware("http")`` wrapper reads a body whole before anyone looks at its size and
hides the client's ``http.disconnect`` from the endpoint. This middleware counts bytes as they arrive
(with a Content-Length or chunked), answers 413 as soon as the limit is passed, and closes the
connection so the rest is never read. A Content-Length over the limit is refused before a byte of the
body is read (so ``Expect: 100-continue`` clients never send it). The app then receives the body in one
message and, after it, the real receive channel, so a client that leaves is still seen. A client that sends
the headers and then stalls (no body byte for ``body_timeout_s``) gets 408 and its connection is closed: it
would otherwise hold a request open forever, and with it a resident server's idle timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Awaitable, Callable

from .responses import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_METHODS = ("POST", "PUT", "PATCH")
BODY_TIMEOUT_S = 30.0  # the longest pause between two parts of a request body


async def send_error(send: Send, status: int, message: str, type_: str = "invalid_request_error",
                     code: str | None = None, close: bool = False) -> None:
    """Answer with an OpenAI error body; ``close`` tells uvicorn to drop the connection after it (a body
    still arriving is then never read)."""
    payload = json.dumps(error_body(message, type_, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """API key check (``/v1`` and ``/metrics``) and a body limit enforced while the body streams in.

    ``count(status)`` is called for every request refused here (the server's metrics)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, api_key: str | None = None,
                 count: Callable[[int], None] = lambda status: None,
                 body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.api_key = api_key
        self.count = count

    def _too_large(self) -> str:
        limit = self.max_body_bytes
        size = f"{limit // 2**20} MB" if limit >= 2**20 else f"{limit} bytes"
        return f"request body over {size}: send fewer or smaller images, or start the server with a larger --max-body-mb"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope.get("path", "").startswith(("/v1", "/metrics")):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key.encode()):
                self.count(401)
                await send_error(send, 401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                 "authentication_error", "invalid_api_key")
                return
        if scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            self.count(413)
            await send_error(send, 413, self._too_large(), code="body_too_large", close=True)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                self.count(408)
                await send_error(send, 408, f"the request body stopped arriving (nothing for {self.body_timeout_s:g} "
                                 f"s): send the whole body without pausing", code="request_timeout", close=True)
                return
            if message["type"] == "http.disconnect":
                return  # the client left while sending: nobody to answer
            part = message.get("body", b"")
            total += len(part)
            if total > self.max_body_bytes:  # chunked, or more than the Content-Length said
                self.count(413)
                await send_error(send, 413, self._too_large(), code="body_too_large", close=True)
                return
            chunks.append(part)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, when it comes

        await self.app(scope, replay, send)
