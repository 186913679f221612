"""What ``glmv serve`` answers, built from the ``openai`` package's own types.

Completions, stream chunks, usage, tool calls, the model list and error objects are the ``openai`` types a
client parses them into (``ChatCompletion``, ``ChatCompletionChunk``, ``CompletionUsage``, ``Model``,
``ErrorObject``), so a field's name or shape cannot drift from OpenAI's API. glmv's additions travel as
extra fields, which these types allow: ``reasoning_content`` beside ``content`` (vLLM's name for GLM's
thinking). Serialized with ``exclude_unset``: every field glmv sets is sent, ``null`` included (OpenAI
sends ``"content": null`` beside tool calls and ``"finish_reason": null`` in each streamed delta; a client
indexing the JSON relies on it), and nothing glmv does not set appears.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from openai import BaseModel
from openai.types import CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage, ChatCompletionMessageToolCall
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall
from openai.types.shared import ErrorObject

from ..backends.base import Chunk, Usage
from ..parsing import PartialCall, ToolCall


def dump(model: BaseModel) -> dict[str, Any]:
    """The JSON object a client receives: the fields glmv set, extra ones (``reasoning_content``) included."""
    return model.model_dump(mode="json", exclude_unset=True)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """An OpenAI error object (``{"error": {"message", "type", "param", "code"}}``, null param/code kept)."""
    return {"error": dump(ErrorObject(message=message, type=type_, param=param, code=code))}


def usage_out(usage: Usage) -> CompletionUsage:
    """Token counts as OpenAI names them: prefix-cache hits are ``prompt_tokens_details.cached_tokens``,
    speculation's drafts ``completion_tokens_details.accepted/rejected_prediction_tokens``."""
    return CompletionUsage.model_validate({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"accepted_prediction_tokens": usage.accepted_prediction_tokens,
                                      "rejected_prediction_tokens": usage.rejected_prediction_tokens},
    })


def tool_call_out(call: ToolCall | PartialCall) -> ChatCompletionMessageToolCall:
    """A call as OpenAI carries it. A call cut off by the token limit keeps its arguments as far as they got
    (finish_reason "length" says so), exactly the fragments a streaming client received."""
    args = call.arguments if isinstance(call, PartialCall) else call.arguments_json()
    return ChatCompletionMessageToolCall(id=f"call_{uuid.uuid4().hex[:24]}", type="function",
                                         function={"name": call.name, "arguments": args})


def finish_reason(done: Chunk) -> str:
    """OpenAI's finish reason: a generation cancelled by its own client ended as far as it is concerned."""
    reason = done.finish_reason or "stop"
    return "stop" if reason == "cancelled" else reason


def completion(done: Chunk, cid: str, created: int, model: str) -> ChatCompletion:
    """The non-streamed answer: content (null when empty), reasoning_content, tool_calls, usage."""
    result = done.result
    assert result is not None
    fields: dict[str, Any] = {"role": "assistant", "content": result.answer or None}
    if result.thinking:
        fields["reasoning_content"] = result.thinking
    calls: list[ToolCall | PartialCall] = [*result.tool_calls, *([result.cut_call] if result.cut_call else [])]
    if calls:
        fields["tool_calls"] = [tool_call_out(c) for c in calls]
    message = ChatCompletionMessage.model_validate(fields)  # validate, not __init__: reasoning_content is an extra
    return ChatCompletion(id=cid, object="chat.completion", created=created, model=model,
                          choices=[Choice(index=0, message=message, finish_reason=finish_reason(done))],
                          usage=usage_out(done.usage))


class ChunkEvents:
    """One streamed completion's server-sent events, each a ``ChatCompletionChunk``: the role first, then
    reasoning / content / tool-call deltas, the finish reason, and the usage when the client asked for it."""

    def __init__(self, cid: str, created: int, model: str) -> None:
        self.cid, self.created, self.model = cid, created, model

    def _event(self, choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> str:
        fields: dict[str, Any] = {"usage": usage} if usage is not None else {}  # set only on the usage chunk
        return sse(ChatCompletionChunk(id=self.cid, object="chat.completion.chunk", created=self.created,
                                       model=self.model, choices=choices, **fields))

    def delta(self, finish: str | None = None, **fields: Any) -> str:
        """A delta (``role``, ``content``, ``reasoning_content``, ``tool_calls``); ``finish`` ends the choice."""
        return self._event([ChunkChoice(index=0, delta=ChoiceDelta.model_validate(fields), finish_reason=finish)])

    def tool_call_head(self, index: int, call: ToolCall | PartialCall) -> str:
        """A call's id and name with its first argument fragment (or all of it), as vLLM streams them."""
        head = dump(tool_call_out(call))
        return self.delta(tool_calls=[ChoiceDeltaToolCall.model_validate({"index": index, **head})])

    def tool_args(self, index: int, fragment: str) -> str:
        return self.delta(tool_calls=[ChoiceDeltaToolCall.model_validate(
            {"index": index, "function": {"arguments": fragment}})])

    def usage(self, usage: Usage) -> str:
        """The last chunk with ``stream_options.include_usage``: no choices, the request's usage."""
        return self._event([], usage_out(usage))


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying a chunk (or an error object)."""
    data = dump(payload) if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def model_list(model_name: str) -> dict[str, Any]:
    """``GET /v1/models``: the one model this server holds."""
    return {"object": "list", "data": [dump(Model(id=model_name, object="model", created=0, owned_by="glmv"))]}
