"""A small OpenAI-compatible client on the standard library, for the CLI's resident-model path.

The official ``openai`` package costs about half a second to import (pydantic models of the whole API);
a ``glmv ask`` answered by a resident ``glmv serve`` has a 1.5 s budget for everything, so that path uses
this module instead. It is a drop-in for the part of ``openai`` that
:class:`~glmv.backends.remote.RemoteBackend` uses: ``OpenAI(...).models.list()``, streamed
``chat.completions.create(...)``, ``close()``, and the error classes with the same names and attributes
(``status_code``, ``body``), so the backend's code is one for both clients. Responses are read as JSON and
seen through :class:`Obj`, an attribute view where a missing field reads as ``None``, as in openai's models.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any, Iterator


class APIError(Exception):
    def __init__(self, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.body = body


class APIConnectionError(APIError):
    pass


class APIStatusError(APIError):
    status_code = 0

    def __init__(self, message: str, status_code: int, body: Any = None) -> None:
        super().__init__(message, body)
        self.status_code = status_code


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


_STATUS_ERRORS = {400: BadRequestError, 401: AuthenticationError, 422: UnprocessableEntityError}


class Obj:
    """Attribute access over a JSON object; absent fields are None, nested objects and lists are wrapped."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _wrap(self._data.get(name))

    model_extra = None  # openai's models keep unknown fields here; every field is reachable as an attribute


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return Obj(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class _Stream:
    """The events of one server-sent-events response, closable part-way (which cancels on the server)."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self._conn, self._response = conn, response

    def __iter__(self) -> Iterator[Obj]:
        try:
            while True:
                line = self._response.readline()
                if not line:  # an SSE stream ends with [DONE]: EOF before it means the server went away
                    raise APIConnectionError("the server closed the connection before the answer was complete")
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if isinstance(event, dict) and "error" in event:
                    err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
                    raise APIError(str(err.get("message")), {"error": err})
                yield Obj(event)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise APIConnectionError(f"the connection broke mid-answer: {exc}") from None

    def close(self) -> None:
        self._conn.close()


class OpenAI:
    """``OpenAI(base_url=..., api_key=..., timeout=...)`` with ``models.list`` and ``chat.completions.create``."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0, max_retries: int = 0) -> None:
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"the lite client speaks plain http to a local server, not {base_url!r}")
        self._host, self._port, self._root = url.hostname, url.port or 80, url.path
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = timeout
        self.models = _Models(self)
        self.chat = _Chat(self)

    def _request(self, method: str, path: str,
                 body: dict[str, Any] | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        payload = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            conn.request(method, self._root + path, body=payload, headers=self._headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise APIConnectionError(f"Connection error: {exc}") from None
        if response.status >= 400:
            raw = response.read()
            conn.close()
            try:
                err_body: Any = json.loads(raw)
            except ValueError:
                err_body = {"error": {"message": raw.decode("utf-8", "replace")[:500]}}
            message = (err_body.get("error") or {}).get("message") if isinstance(err_body, dict) else None
            cls = _STATUS_ERRORS.get(response.status, APIStatusError)
            raise cls(f"Error code: {response.status} - {message or raw[:200]!r}", response.status, err_body)
        return conn, response

    def close(self) -> None:
        """Nothing to release: each request has its own connection, closed when it ends."""


class _Models:
    def __init__(self, client: OpenAI) -> None:
        self._client = client

    def list(self) -> Obj:
        conn, response = self._client._request("GET", "/models")
        try:
            return Obj(json.loads(response.read()))
        except (OSError, ValueError, socket.timeout) as exc:
            raise APIConnectionError(f"bad answer to /models: {exc}") from None
        finally:
            conn.close()


class _Completions:
    def __init__(self, client: OpenAI) -> None:
        self._client = client

    def create(self, *, extra_body: dict[str, Any] | None = None, **params: Any) -> _Stream:
        if not params.get("stream"):
            raise ValueError("the lite client only streams (stream=True)")
        conn, response = self._client._request("POST", "/chat/completions", {**params, **(extra_body or {})})
        return _Stream(conn, response)


class _Chat:
    def __init__(self, client: OpenAI) -> None:
        self.completions = _Completions(client)


__all__ = ["APIConnectionError", "APIError", "APIStatusError", "AuthenticationError", "BadRequestError", "OpenAI",
           "UnprocessableEntityError"]
