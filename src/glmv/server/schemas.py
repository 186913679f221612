"""The OpenAI chat-completions request format that ``glmv serve`` accepts, strictly.

Unknown fields are refused (422 naming them), not ignored: a client that sends ``response_format`` or
``logprobs`` must learn that they do nothing here. A few OpenAI fields that clients send by default are
accepted: ``store`` and ``metadata`` (informational; glmv stores nothing), ``reasoning_effort`` (thinking on
or off) and ``presence_penalty``/``frequency_penalty`` at 0 (any other value is a 400 naming the field).
Types are strict (``"0.5"`` is not a number, ``1.5`` not an integer, ``"yes"`` not a boolean), as OpenAI's
API has them. Values are range-checked by :class:`~glmv.settings.SamplingParams` against
:data:`~glmv.settings.SAMPLING_BOUNDS`, the bounds the CLI and the web app's sliders use too (and that this
schema documents).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..settings import SAMPLING_BOUNDS

MAX_JSON_DEPTH = 64  # tool schemas and arguments nest this deep at most (the chat template recurses on them)
MAX_MESSAGES = 2048  # bounds the work one request asks for: every message is validated and templated


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a JSON value (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class VideoURL(Strict):
    url: str


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(Strict):
    type: Literal["video_url"]
    video_url: VideoURL


class FileData(Strict):
    file_data: str | None = None  # a data: URI (application/pdf)
    filename: str | None = None
    file_id: str | None = None


class FilePart(Strict):
    type: Literal["file"]
    file: FileData


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart, FilePart], Field(discriminator="type")]


class FunctionCall(Strict):
    name: str
    arguments: str = "{}"


class ToolCallIn(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # the template keeps it only in the tool loop (after the last user turn)


class FunctionDef(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _not_too_deep(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and json_depth(value) > MAX_JSON_DEPTH:
            raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
        return value


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoiceFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class StreamOptions(Strict):
    include_usage: bool = False


class ChatTemplateKwargs(Strict):
    enable_thinking: bool | None = None


def bounded(name: str) -> Any:
    """A sampling field documented with its range from :data:`~glmv.settings.SAMPLING_BOUNDS`. The check itself
    is :class:`~glmv.settings.SamplingParams`' (a 400 saying ``invalid NAME VALUE: must be RULE``), the same one
    the CLI and the web app's sliders use: the bounds are declared once."""
    return Field(None, json_schema_extra=SAMPLING_BOUNDS[name].json_schema())


class ChatCompletionRequest(Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
    top_k: int | None = bounded("top_k")
    repetition_penalty: float | None = bounded("repetition_penalty")
    max_tokens: int | None = bounded("max_new_tokens")
    max_completion_tokens: int | None = bounded("max_new_tokens")
    stop: str | list[str] | None = None
    seed: int | None = bounded("seed")
    n: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # GLM thinks or does not: "none"/"minimal" turn thinking off, any other effort leaves it on.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # OpenAI's additive penalties: 0 (what clients send by default) is honoured exactly; any other value is a 400
    # naming the field (glmv's penalty is the multiplicative repetition_penalty), never silently ignored.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Informational only, accepted and ignored: glmv stores no completions (store) and keeps no tags (metadata).
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
