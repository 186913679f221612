"""The remote backend: the same front ends against any OpenAI-compatible endpoint.

vLLM or SGLang serving GLM-4.6V across GPUs and nodes, the hosted API, or another ``glmv serve``.
Images travel as data URIs. Reasoning may arrive as ``reasoning_content`` (vLLM's glm45 parser) or
inline as ``<think>`` in the content; both end up as ``thinking`` chunks, through the same chunk
assembler as the local backend (:class:`~glmv.backends.stream.ChunkAssembler`). Tool calls may arrive
as OpenAI ``tool_calls`` or as GLM text; both become :class:`~glmv.parsing.ToolCall` objects.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator

from ..errors import GenerationError, ModelLoadError, RequestError
from ..media import LoadedImage, image_to_data_uri
from ..parsing import ToolCall
from ..privacy import redact_url
from ..prompts import Message, validate_messages
from ..settings import SamplingParams
from .base import BackendBase, Chunk, GenerationRequest
from .stream import ChunkAssembler


def to_openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    tool_index = 0  # tool results answer the previous assistant turn's calls in order
    for m in messages:
        parts: list[dict[str, Any]] = []
        for c in m.content:
            if isinstance(c, LoadedImage):
                parts.append({"type": "image_url", "image_url": {"url": image_to_data_uri(c.image)}})
            elif hasattr(c, "frames"):  # a video: vLLM and glmv serve take video_url parts
                parts.append({"type": "video_url", "video_url": {"url": c.data_uri()}})
            elif c:
                parts.append({"type": "text", "text": c})
        entry: dict[str, Any] = {"role": m.role}
        if m.role in ("system", "assistant") and all(p["type"] == "text" for p in parts):
            entry["content"] = "".join(p["text"] for p in parts)
        else:
            entry["content"] = parts
        if m.role == "assistant":
            tool_index = 0
        if m.tool_calls:
            entry["tool_calls"] = [
                {"id": f"call_{i}", "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                for i, c in enumerate(m.tool_calls)
            ]
        if m.role == "tool":
            entry["tool_call_id"] = f"call_{tool_index}"
            tool_index += 1
        out.append(entry)
    return out


class RemoteBackend(BackendBase):
    """Talks to ``base_url`` with the official ``openai`` client."""

    name = "openai"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 sampling: SamplingParams | None = None, timeout_s: float = 600.0, client_module: Any = None) -> None:
        # client_module: something shaped like the openai package (glmv.backends.lite on the fast local path)
        if client_module is not None:
            openai = client_module
        else:
            try:
                import openai
            except ImportError:
                raise ModelLoadError("--backend openai needs the openai package: pip install 'glmv[server]'") from None
        self._openai = openai
        self.base_url = base_url
        self.shown_url = redact_url(base_url)  # for messages: a --base-url may carry user:password@
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout_s, max_retries=0)
        self.model = model
        self.default_sampling = sampling or SamplingParams()

    def load(self) -> "RemoteBackend":
        """Check the endpoint answers and pick its model when none was named."""
        try:
            models = [m.id for m in self.client.models.list().data]
        except self._openai.APIConnectionError as exc:
            raise ModelLoadError(f"cannot reach the server at {self.shown_url}: {exc} (is it running? check --base-url)") from None
        except self._openai.AuthenticationError:
            raise ModelLoadError(f"the server at {self.shown_url} refused the API key (pass --api-key)") from None
        except self._openai.APIError as exc:
            raise ModelLoadError(f"the server at {self.shown_url} answered an error: {exc}") from None
        if self.model is None:
            if not models:
                raise ModelLoadError(f"the server at {self.shown_url} lists no models; pass --remote-model NAME")
            self.model = models[0]
        return self

    @property
    def served_model(self) -> str | None:  # type: ignore[override]
        return self.model

    def close(self) -> None:
        self.client.close()

    def _params(self, request: GenerationRequest) -> dict[str, Any]:
        s = request.sampling
        params: dict[str, Any] = {
            "model": self.model,
            "messages": to_openai_messages(request.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
        }
        if s.seed is not None:
            params["seed"] = s.seed
        if s.stop:
            params["stop"] = list(s.stop)
        if request.tools:
            params["tools"] = request.tools
        extra: dict[str, Any] = {"top_k": s.top_k, "repetition_penalty": s.repetition_penalty}
        if not request.thinking:
            extra["chat_template_kwargs"] = {"enable_thinking": False}
        params["extra_body"] = extra
        return params

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        validate_messages(request.messages)
        if self.model is None:
            self.load()
        t0 = time.perf_counter()
        try:
            stream = self.client.chat.completions.create(**self._params(request))
        except self._openai.BadRequestError as exc:
            raise RequestError(f"the server refused the request: {_message(exc)}") from None
        except self._openai.UnprocessableEntityError as exc:
            raise RequestError(f"the server refused the request: {_message(exc)}") from None
        except self._openai.APIConnectionError as exc:
            raise GenerationError(f"cannot reach the server at {self.shown_url}: {exc}") from None
        except self._openai.APIStatusError as exc:
            raise GenerationError(f"the server at {self.shown_url} answered {exc.status_code}: {_message(exc)}") from None
        return self._stream(request, stream, cancel or threading.Event(), t0)

    def _stream(self, request: GenerationRequest, stream: Any, cancel: threading.Event, t0: float) -> Iterator[Chunk]:
        out = ChunkAssembler(max_new_tokens=request.sampling.max_new_tokens, stops=request.sampling.stop,
                             tools=request.tools, t0=t0)
        usage = out.usage
        calls: dict[int, dict[str, str]] = {}
        finish = None
        reported = False  # servers send usage only at the end: until then each streamed delta counts as a token
        try:
            for event in stream:
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if event.usage is not None:
                    reported = True
                    usage.prompt_tokens = event.usage.prompt_tokens or 0
                    usage.completion_tokens = event.usage.completion_tokens or 0
                    details = getattr(event.usage, "prompt_tokens_details", None)
                    usage.cached_tokens = getattr(details, "cached_tokens", None) or 0
                for choice in event.choices or []:
                    delta = choice.delta
                    reasoning = getattr(delta, "reasoning_content", None) or (delta.model_extra or {}).get("reasoning_content")
                    counted = 0 if reported or not (reasoning or delta.content) else 1
                    yield from out.push_thinking(reasoning or "", tokens=counted)
                    yield from out.push(delta.content or "")
                    for tc in delta.tool_calls or []:
                        slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                        if tc.function and tc.function.name:
                            slot["name"] += tc.function.name
                        if tc.function and tc.function.arguments:
                            slot["arguments"] += tc.function.arguments
                    if choice.finish_reason:
                        finish = choice.finish_reason
                if out.stopped:  # a stop string the server did not apply
                    finish = "stop"
                    break
        except self._openai.APIError as exc:
            raise GenerationError(f"the server at {self.shown_url} failed mid-answer: {exc}") from None
        except OSError as exc:  # httpx's transport errors (the official client does not wrap them mid-stream)
            raise GenerationError(f"the server at {self.shown_url} failed mid-answer: {exc}") from None
        except Exception as exc:
            if type(exc).__module__.split(".")[0] != "httpx":
                raise
            raise GenerationError(f"the server at {self.shown_url} failed mid-answer: {exc}") from None
        finally:
            stream.close()
        if finish is None:  # every OpenAI-style stream ends with a finish_reason: without one, the answer is cut
            raise GenerationError(f"the server at {self.shown_url} stopped sending before the answer was complete "
                                  f"(no finish_reason): it may have crashed or been stopped")
        for slot in calls.values():
            try:
                args = json.loads(slot["arguments"] or "{}")
            except ValueError:
                args = {"_raw": slot["arguments"]}
            out.add_tool_call(ToolCall(slot["name"], args if isinstance(args, dict) else {"value": args}))
        yield from out.done("length" if finish == "length" else "cancelled" if finish == "cancelled" else "stop")


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc)


__all__ = ["RemoteBackend", "to_openai_messages"]
