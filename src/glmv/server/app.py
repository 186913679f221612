"""``glmv serve``: an OpenAI-compatible HTTP server over any glmv backend (FastAPI + uvicorn).

``build_app(backend, config)`` is a factory: nothing is global, so tests build as many apps as they
like. Requests are parsed strictly (unknown fields: 422), converted to core messages under the media
policy (data: URIs always; http(s) only with ``--allow-remote-media``; local files only inside
``--allowed-media-dir``), validated and processed before they are queued, so a bad request never
reaches the GPU. Admission is bounded (``--max-queue``; beyond it 429 with Retry-After); the backend
batches what waits together. Bodies are limited while they arrive and the API key checked by a pure
ASGI middleware (``guard.py``), which leaves the client's disconnect visible: a client that leaves,
streamed or not, frees its slot at once, and its generation stops at the next token (or, still queued,
leaves the queue). Routes delegate in one line (the chat route to :class:`ChatCompletions`); what they answer
is built in ``responses.py`` from the ``openai`` package's own types.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..backends.base import Backend, Chunk, GenerationRequest, check_backend
from ..documents import PlannedInput, RenderOptions, charge, decode_planned, plan_input
from ..errors import ContextLengthError, GlmvError, LimitError, MediaError, RequestError
from ..limits import Budget, Limits
from ..parsing import PartialCall, ToolCall
from ..prompts import Message
from ..settings import DEFAULT_MAX_PIXELS, SamplingParams
from .guard import BODY_TIMEOUT_S, RequestGuard
from .responses import ChunkEvents, completion, dump, error_body, finish_reason, model_list, sse
from .schemas import (MAX_JSON_DEPTH, ChatCompletionRequest, ChatMessage, FilePart, ImagePart, TextPart, VideoPart,
                      json_depth)


@dataclass
class ServerConfig:
    model_name: str = "glmv"
    api_key: str | None = None
    allowed_media_dir: Path | None = None
    allow_remote_media: bool = False
    max_queue: int = 64
    max_body_bytes: int = 64 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    limits: Limits = field(default_factory=Limits)  # work per request, checked before decoding or tokenizing
    body_timeout_s: float = BODY_TIMEOUT_S  # a body that stalls this long gets 408 (see guard.py)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


INVALID_JSON = ("We could not parse the JSON body of your request: send a JSON object encoded as UTF-8 "
                "(Content-Type: application/json)")
MAX_LISTED_ERRORS = 5


def _validation_error(errors: list[dict[str, Any]]) -> APIError:
    """One OpenAI error for a request that does not match the schema: invalid JSON is a 400 (as OpenAI
    answers it), unknown fields and wrong types a 422 naming the first few places."""
    if any(err.get("type") == "json_invalid" for err in errors):
        return APIError(400, INVALID_JSON)
    if any(err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",) for err in errors):
        return APIError(400, "the request body is empty: send a JSON object (Content-Type: application/json)")
    unknown, bad = [], []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")[:200]
        if err.get("type") == "extra_forbidden":
            unknown.append(loc)
        elif not loc and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            return APIError(400, "the request body must be a JSON object (Content-Type: application/json)")
        else:
            bad.append(f"{loc or 'body'}: {err.get('msg')}")

    def listed(items: list[str], sep: str) -> str:
        more = f" (and {len(items) - MAX_LISTED_ERRORS} more)" if len(items) > MAX_LISTED_ERRORS else ""
        return sep.join(items[:MAX_LISTED_ERRORS]) + more

    if unknown:
        msg = "unknown or unsupported field(s): " + listed(unknown, ", ")
        if bad:
            msg += "; " + listed(bad, "; ")
    else:
        msg = "invalid request: " + listed(bad, "; ")
    return APIError(422, msg, param=(unknown or [None])[0], code="invalid_fields")


def _api_error_from(exc: GlmvError) -> APIError:
    if exc.status >= 500:
        return APIError(500, "the model failed to start this request", "server_error")
    if isinstance(exc, ContextLengthError):
        return APIError(exc.status, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, LimitError):  # 413, naming the limit (the message says which flag raises it)
        return APIError(exc.status, str(exc), param=exc.limit, code=exc.code)
    return APIError(exc.status, str(exc))


def _text_chars(body: ChatCompletionRequest) -> int:
    """Characters of text the prompt would hold (message text, tool-call arguments, tool definitions)."""
    n = 0
    for m in body.messages:
        if isinstance(m.content, str):
            n += len(m.content)
        elif m.content:
            n += sum(len(p.text) for p in m.content if isinstance(p, TextPart))
        n += sum(len(tc.function.arguments) + len(tc.function.name) for tc in m.tool_calls or [])
    if body.tools:
        n += len(json.dumps([t.model_dump(exclude_none=True) for t in body.tools]))
    return n


def check_request_size(body: ChatCompletionRequest, config: ServerConfig, context: int | None) -> None:
    """Cheap checks before any decoding or tokenizing: the text's length and max_tokens against the
    model's context (the exact prompt length is checked by the backend once it is tokenized)."""
    chars = _text_chars(body)
    if chars > config.limits.max_text_chars:
        raise APIError(400, f"the request holds {chars:,} characters of text; this server accepts at most "
                            f"{config.limits.max_text_chars:,} (max_text_chars): shorten the prompt, or start the "
                            f"server with a higher --max-text-chars", param="messages", code="context_length_exceeded")
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if asked is not None and context is not None and asked >= context:
        raise APIError(400, f"{field} is too large: {asked}. This model's context is {context} tokens, prompt and "
                            f"answer together: ask for fewer", param=field, code="invalid_value")


# -- request conversion ------------------------------------------------------------------------
# Media parts are converted in two passes: first every part is read and measured (image headers, PDF
# page counts and sizes, video headers) and charged to the request's Budget; only when the whole
# request is within its limits is anything decoded or rendered.
_KINDS = {ImagePart: "image", VideoPart: "video", FilePart: "pdf"}


@dataclass
class _Pending:
    """A media part measured but not decoded yet, and where it sits in the request (for messages)."""

    where: str
    planned: PlannedInput


def _allowed_path(url: str, config: ServerConfig) -> Path:
    path_text = url[len("file://"):] if url.startswith("file://") else url
    if config.allowed_media_dir is None:
        raise MediaError("reading local files is disabled on this server (start it with --allowed-media-dir DIR, or send a data: URI)")
    root = config.allowed_media_dir.resolve()
    try:
        path = Path(path_text).expanduser()
        path = (root / path).resolve() if not path.is_absolute() else path.resolve()
        if not path.is_relative_to(root):
            raise MediaError(f"'{path_text}' is outside the allowed media folder")
        if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO would hang the request
            raise MediaError(f"'{path_text}' is not a regular file")
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a name too long, a symlink loop
        raise MediaError(f"cannot read '{path_text[:200]}': {getattr(exc, 'strerror', None) or exc}") from None
    return path


def _media_source(url: str, config: ServerConfig, what: str) -> tuple[Any, bool]:
    """What a media URL may be read as under the server's policy: (source, whether fetching it is allowed)."""
    if url.startswith("data:"):
        return url, False
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("http", "https"):
        if not config.allow_remote_media:
            raise MediaError(f"fetching remote {what}s is disabled on this server (start it with --allow-remote-media, "
                             f"or send a data: URI)")
        return url, True
    if scheme not in ("", "file"):
        raise MediaError(f"unsupported {what} URL scheme '{scheme}': send a data: URI")
    return _allowed_path(url, config), False


def _plan_part(part: ImagePart | VideoPart | FilePart, config: ServerConfig, where: str) -> _Pending:
    kind = _KINDS[type(part)]
    try:
        if isinstance(part, FilePart):
            if part.file.file_id:
                raise APIError(422, f"{where}: file_id is not supported here; send the file as file_data (a data: URI)",
                               param=where, code="unsupported_content")
            source, remote_ok = part.file.file_data or "", False
            if not source.startswith("data:"):
                raise MediaError("file_data must be a data: URI (data:application/pdf;base64,...)")
        else:
            url = part.image_url.url if isinstance(part, ImagePart) else part.video_url.url
            source, remote_ok = _media_source(url, config, kind)
        opts = RenderOptions(max_pixels=config.max_pixels)
        return _Pending(where, plan_input(source, opts, kind=kind, allow_remote=remote_ok))
    except MediaError as exc:
        msg = str(exc)
        raise MediaError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _content(parts: str | list | None, config: ServerConfig, where: str, budget: Budget) -> list[Any]:
    """Text and measured media of one message, each media part charged to ``budget`` (nothing decoded)."""
    if parts is None:
        return []
    if isinstance(parts, str):
        return [parts]
    out: list[Any] = []
    for i, part in enumerate(parts):
        if isinstance(part, TextPart):
            out.append(part.text)
        elif type(part) in _KINDS:
            pending = _plan_part(part, config, f"{where}.content[{i}]")
            charge(pending.planned, budget, RenderOptions(max_pixels=config.max_pixels))
            out.append(pending)
    return out


def _decode(content: list[Any], config: ServerConfig) -> list[Any]:
    out: list[Any] = []
    for item in content:
        if not isinstance(item, _Pending):
            out.append(item)
            continue
        try:
            out.extend(decode_planned(item.planned, RenderOptions(max_pixels=config.max_pixels)))
        except MediaError as exc:
            raise MediaError(f"{item.where}: {exc}") from None
    return out


def _count_images(body: ChatCompletionRequest) -> int:
    return sum(isinstance(p, ImagePart) for m in body.messages if isinstance(m.content, list) for p in m.content)


def _tool_calls_in(message: ChatMessage, where: str) -> list[ToolCall]:
    calls = []
    for i, tc in enumerate(message.tool_calls or []):
        try:
            args = json.loads(tc.function.arguments or "{}")
        except (ValueError, RecursionError):
            raise RequestError(f"{where}.tool_calls[{i}].function.arguments is not valid JSON") from None
        if not isinstance(args, dict):
            raise RequestError(f"{where}.tool_calls[{i}].function.arguments must be a JSON object")
        if json_depth(args) > MAX_JSON_DEPTH:
            raise RequestError(f"{where}.tool_calls[{i}].function.arguments nests more than {MAX_JSON_DEPTH} "
                               f"levels deep")
        calls.append(ToolCall(tc.function.name, args))
    return calls


def _thinking(body: ChatCompletionRequest) -> bool:
    """Thinking on or off: ``chat_template_kwargs.enable_thinking`` (vLLM's switch) or ``reasoning_effort``
    (OpenAI's; GLM has one level, so "none" and "minimal" mean off and the rest on). On by default."""
    switch = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else None
    effort = None if body.reasoning_effort is None else body.reasoning_effort not in ("none", "minimal")
    if switch is not None and effort is not None and switch != effort:
        raise APIError(400, f"reasoning_effort '{body.reasoning_effort}' contradicts chat_template_kwargs."
                            f"enable_thinking={str(switch).lower()}: send one of them", param="reasoning_effort",
                       code="invalid_value")
    return next((v for v in (switch, effort) if v is not None), True)


def to_generation_request(body: ChatCompletionRequest, config: ServerConfig, defaults: SamplingParams,
                          context: int | None = None) -> GenerationRequest:
    """Validate and convert an OpenAI request into a core request (loads images; raises GlmvError/APIError).

    Media are measured and charged to a :class:`~glmv.limits.Budget` (``context``: the model's, in tokens)
    before any of them is decoded, so an over-limit request costs only the reading of headers.
    """
    if body.n not in (None, 1):
        raise APIError(422, "only n=1 is supported", param="n", code="unsupported_parameter")
    if body.tool_choice == "required":
        raise APIError(422, "tool_choice 'required' is not supported: use 'auto', 'none' or a named function",
                       param="tool_choice", code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):  # 0 is no penalty, exactly what glmv does without one
            raise APIError(400, f"{name} is not supported (only 0): glmv penalizes repetition with repetition_penalty "
                                f"(multiplicative, 1.0 = none, e.g. 1.1)", param=name, code="unsupported_parameter")
    budget = Budget(config.limits, context)
    budget.add_text(_text_chars(body))
    budget.count_images(_count_images(body))  # before a single image is read
    contents = [_content(m.content, config, f"messages[{i}]", budget) for i, m in enumerate(body.messages)]
    messages: list[Message] = []
    for i, (m, content) in enumerate(zip(body.messages, contents)):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        messages.append(Message(role, _decode(content, config), tool_calls=_tool_calls_in(m, where),  # type: ignore[arg-type]
                                reasoning=m.reasoning_content or ""))
    stop = body.stop
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = defaults.merged(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        max_new_tokens=asked,
        seed=body.seed,
        stop=tuple([stop] if isinstance(stop, str) else stop) if stop is not None else None,
    )
    tools = None
    if body.tools and body.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        if body.tool_choice is not None and not isinstance(body.tool_choice, str):
            name = body.tool_choice.function.name
            tools = [t for t in tools if t["function"]["name"] == name]
            if not tools:
                raise RequestError(f"tool_choice names '{name}', which is not among the tools")
    thinking = _thinking(body)
    return GenerationRequest(messages=messages, sampling=sampling, thinking=thinking, tools=tools,
                             exact_max_tokens=asked is not None)


# -- metrics ---------------------------------------------------------------------------------------
# engine counters shown in /metrics: name, help, key in the backend's serving_stats()
ENGINE_GAUGES = (
    ("glmv_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache", "prefix_hit_rate"),
    ("glmv_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache since start", "prefix_cached_tokens"),
    ("glmv_prefix_cache_blocks", "Blocks held by the prefix cache", "prefix_blocks"),
    ("glmv_prefix_cache_bytes", "Memory held by the prefix cache", "prefix_bytes"),
    ("glmv_speculative_tokens_per_step", "Tokens produced per draft-verification pass (prompt lookup)",
     "spec_tokens_per_step"),
    ("glmv_speculative_steps", "Draft-verification passes since start", "spec_steps"),
    ("glmv_speculative_tokens", "Tokens produced by draft-verification passes since start", "spec_tokens"),
)


class Metrics:
    def __init__(self, queue_depth: Any, engine_stats: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("glmv_requests", "Chat completion requests by HTTP status", ["status"], registry=self.registry)
        self.prompt_tokens = Counter("glmv_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.completion_tokens = Counter("glmv_completion_tokens", "Tokens generated", registry=self.registry)
        self.cached_tokens = Counter("glmv_cached_prompt_tokens", "Prompt tokens whose keys/values came from the prefix cache",
                                     registry=self.registry)
        for name, doc, key in ENGINE_GAUGES if engine_stats is not None else ():
            Gauge(name, doc, registry=self.registry).set_function(lambda key=key: float(engine_stats().get(key, 0.0)))
        self.in_flight = Gauge("glmv_requests_in_flight", "Requests admitted and not finished", registry=self.registry)
        depth = Gauge("glmv_queue_depth", "Requests waiting for or running on the model", registry=self.registry)
        depth.set_function(queue_depth)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
        self.ttft = Histogram("glmv_time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=self.registry)
        self.latency = Histogram("glmv_request_latency_seconds", "Whole request latency", buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# -- the app -------------------------------------------------------------------------------------
def build_app(backend: Backend, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    check_backend(backend)
    app = FastAPI(title="glmv", version="1", docs_url=None, redoc_url=None)
    metrics = Metrics(lambda: backend.queue_depth, backend.serving_stats)
    chat = ChatCompletions(backend, config, metrics)
    app.state.metrics = metrics
    app.state.config = config

    def error_response(exc: APIError) -> JSONResponse:
        metrics.requests.labels(str(exc.status)).inc()
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return error_response(APIError(400, INVALID_JSON))  # not UTF-8, nested too deep, a 5000-digit number
        return error_response(APIError(exc.status_code, str(exc.detail), "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError(500, "internal server error", "server_error"))

    app.add_middleware(RequestGuard, max_body_bytes=config.max_body_bytes, api_key=config.api_key,
                       count=lambda status: metrics.requests.labels(str(status)).inc(),
                       body_timeout_s=config.body_timeout_s)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, "queue_depth": backend.queue_depth}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return model_list(config.model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat.handle(body, request)

    return app


class ChatCompletions:
    """``POST /v1/chat/completions``: admission (``--max-queue``, then 429), the request converted and its
    media processed off the event loop, the client's disconnect watched, and the backend's chunks answered
    as one ``ChatCompletion`` or a stream of ``ChatCompletionChunk`` events (``responses.py``)."""

    def __init__(self, backend: Backend, config: ServerConfig, metrics: Metrics) -> None:
        self.backend, self.config, self.metrics = backend, config, metrics
        self.admitted = 0  # requests admitted and not finished (the event loop's only: no lock)

    async def handle(self, body: ChatCompletionRequest, request: Request) -> Response:
        backend, config, metrics = self.backend, self.config, self.metrics
        check_request_size(body, config, backend.context_length)
        if self.admitted >= config.max_queue:
            raise APIError(429, f"server busy: {self.admitted} requests in progress; retry shortly",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self.admitted += 1
        metrics.in_flight.inc()
        released = False
        finished = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admitted -= 1
                metrics.in_flight.dec()

        t0 = time.perf_counter()
        cancel = threading.Event()

        async def watch_client() -> None:
            """The client's disconnect (the only message left once the body is read) frees its slot at once."""
            while (await request.receive())["type"] != "http.disconnect":
                pass
            if not finished:
                cancel.set()
                if not released:
                    metrics.requests.labels("499").inc()
                release()

        watcher = asyncio.create_task(watch_client())
        try:
            defaults = backend.default_sampling
            try:
                gen_request = await asyncio.to_thread(to_generation_request, body, config, defaults,
                                                      backend.context_length)
                if cancel.is_set():  # the client left while its media was read: no tokenizing, no queueing
                    watcher.cancel()
                    return Response(status_code=499)
                stream = await _start(backend, gen_request, cancel)
            except GlmvError as exc:
                raise _api_error_from(exc) from None
        except BaseException:
            watcher.cancel()
            release()
            raise
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def stream_ended() -> None:
                watcher.cancel()
                release()

            gen = _sse(stream, ChunkEvents(cid, created, config.model_name), include_usage, metrics, t0, cancel,
                       stream_ended)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            done = await _collect(stream, watcher)
            finished = True
        finally:
            watcher.cancel()
            release()
        if done is None:  # the client left: nobody to answer (uvicorn drops what is sent)
            return Response(status_code=499)
        _record(done, metrics, t0)
        return JSONResponse(dump(completion(done, cid, created, config.model_name)))


class _ChunkStream:
    """Runs a backend's chunk iterator on its own thread and hands chunks to the event loop.

    Chunks wait in a deque; the loop is woken (``call_soon_threadsafe``, a write to its self-pipe) only when
    no wake-up is already pending, so under load, when the loop lags behind, one wake-up carries many chunks."""

    def __init__(self, chunks: Any, loop: asyncio.AbstractEventLoop, cancel: threading.Event) -> None:
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._lock = threading.Lock()
        self._woken = False  # a wake-up is scheduled on the loop and has not run yet
        self._chunks = chunks
        self._loop = loop
        self._cancel = cancel
        threading.Thread(target=self._pump, daemon=True, name="glmv-request").start()

    def _send(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            if self._woken:
                return
            self._woken = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._woken = False
        self._ready.set()

    def _pump(self) -> None:
        try:
            for chunk in self._chunks:
                self._send(chunk)
        except BaseException as exc:  # delivered to the consumer
            self._send(exc)
        finally:
            self._send(None)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while True:
            with self._lock:
                item = self._items.popleft() if self._items else _EMPTY
                if item is _EMPTY:
                    self._ready.clear()
            if item is _EMPTY:
                await self._ready.wait()
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


_EMPTY = object()  # no chunk waiting


async def _start(backend: Backend, request: GenerationRequest, cancel: threading.Event) -> _ChunkStream:
    chunks = await asyncio.to_thread(backend.generate, request, cancel)  # validation + media processing
    return _ChunkStream(chunks, asyncio.get_running_loop(), cancel)


async def _collect(stream: _ChunkStream, client_gone: asyncio.Task) -> Chunk | None:
    """The final chunk of a non-streamed request, or None as soon as its client disconnects."""

    async def result() -> Chunk:
        try:
            async for chunk in stream:
                if chunk.type == "done":
                    return chunk
        except GlmvError as exc:
            raise APIError(500, str(exc), "server_error") from None
        raise APIError(500, "generation ended without a result", "server_error")

    collector = asyncio.ensure_future(result())
    await asyncio.wait({collector, client_gone}, return_when=asyncio.FIRST_COMPLETED)
    if collector.done():
        return collector.result()
    collector.cancel()  # the backend sees the cancel event (set by the watcher) at its next token
    return None


def _record(done: Chunk, metrics: Metrics, t0: float) -> None:
    metrics.requests.labels("200").inc()
    metrics.prompt_tokens.inc(done.usage.prompt_tokens)
    metrics.completion_tokens.inc(done.usage.completion_tokens)
    metrics.cached_tokens.inc(done.usage.cached_tokens)
    if done.timings.ttft_s is not None:
        metrics.ttft.observe(done.timings.ttft_s)
    metrics.latency.observe(time.perf_counter() - t0)


async def _sse(stream: _ChunkStream, events: ChunkEvents, include_usage: bool, metrics: Metrics, t0: float,
               cancel: threading.Event, release: Any) -> AsyncIterator[str]:
    n_calls = 0
    streaming: dict[int, int] = {}  # the parser's call index -> the response's, for calls being streamed
    try:
        yield events.delta(role="assistant", content="")
        async for chunk in stream:
            if chunk.type == "thinking":
                yield events.delta(reasoning_content=chunk.text)
            elif chunk.type == "answer":
                yield events.delta(content=chunk.text)
            elif chunk.type == "tool_args":
                # vLLM's shape: id, name and the first fragment, then further argument fragments.
                if chunk.name is not None:
                    streaming[chunk.index] = n_calls
                    yield events.tool_call_head(n_calls, PartialCall(chunk.name, chunk.text))
                    n_calls += 1
                elif chunk.index in streaming:
                    yield events.tool_args(streaming[chunk.index], chunk.text)
            elif chunk.type == "tool_call" and chunk.tool_call is not None:
                if streaming:
                    streaming.pop(min(streaming))  # complete: its fragments were all sent
                else:  # a call that arrived whole (a remote server's parsed tool_calls)
                    yield events.tool_call_head(n_calls, chunk.tool_call)
                    n_calls += 1
            elif chunk.type == "done":
                _record(chunk, metrics, t0)
                yield events.delta(finish=finish_reason(chunk))
                if include_usage:
                    yield events.usage(chunk.usage)
        yield "data: [DONE]\n\n"
    except GlmvError as exc:
        metrics.requests.labels("500").inc()
        yield sse(error_body(str(exc), "server_error"))
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # a no-op when finished; frees the model at once when the client went away
        release()
