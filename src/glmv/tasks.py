"""The task layer: ask (with or without tools), OCR, HTML and the refine loop, once, for every front end.

Each task is a generator over one backend. It yields what a user would see, as typed events: the backend's
text chunks passed through as they come (:class:`~glmv.backends.base.Chunk`, every type but ``done``), a
:class:`ToolStep` per tool call, :class:`PageStarted` per OCR page, :class:`Saved` when a page is written,
the refine loop's :class:`RoundStarted` / :class:`Scoring` / :class:`RoundFinished` / :class:`RefineStopped`,
and :class:`Finished` with the collected result when a generation (or tool loop) is over. Every task takes a
``cancel`` event, honoured between tokens (the backend stops at the next one) and between the steps of a
tool loop or a refine round, including while a render is being scored.

The CLI, the web app and the batch runner turn these events into printed lines, page updates and files;
none of them runs a flow of its own. Layering: this module imports the core and the backend interface, never
a front end.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, TypeVar, Union

from .backends.base import Backend, Chunk, GenerationRequest, Result, Timings, Usage, collect
from .errors import GlmvError
from .media import LoadedImage
from .outputs import save_html, text_as_page
from .parsing import ParsedOutput
from .prompts import REFINE_PROMPT, TASKS, Message, user_message
from .settings import SamplingParams
from .tools import Step, ToolContext, ToolRegistry

# The most tool rounds one answer may take, for every front end; the round after the last is asked without
# tools, so the model has to answer.
MAX_TOOL_STEPS = 5


# -- events ------------------------------------------------------------------------------------------------
@dataclass
class ToolStep:
    """One tool call, carried out: the step as logged, and the content fed back (text and images)."""

    step: Step
    content: list[Any]


@dataclass
class Finished:
    """A generation is over (for the tool loop: its last round). ``messages`` is the conversation as the
    model saw it last, tool turns included; ``steps`` the tool calls made on the way."""

    result: Result
    steps: list[Step] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)


@dataclass
class PageStarted:
    """OCR: page ``index`` (0-based) of ``count`` starts; its chunks and :class:`Finished` follow."""

    index: int
    count: int
    source: str


@dataclass
class Saved:
    """A page was written (atomically, never over an existing file). ``html_found`` is false when the answer
    had no HTML and the page shows the answer as text."""

    path: Path
    page: str
    html_found: bool


@dataclass
class RoundStarted:
    """Refine: the model starts writing the correction of round ``round`` (1-based) of ``rounds``."""

    round: int
    rounds: int


@dataclass
class Scoring:
    """Refine: the page of round ``round`` (0 = the starting version) is being rendered and scored."""

    round: int


@dataclass
class RoundFinished:
    """Refine: a version, saved and scored. Version 1 is the starting page (round 0)."""

    round: int
    version: int
    path: Path
    html: str
    score: float
    report: dict[str, Any]
    render: Any  # PIL image of the page as rendered at the target's width


@dataclass
class RefineStopped:
    """Refine is over. ``reason``: None when every round ran, else what ended it (shown to the user);
    ``cancelled`` when that was the cancel event."""

    reason: str | None
    cancelled: bool = False


Event = Union[Chunk, ToolStep, Finished, PageStarted, Saved, RoundStarted, Scoring, RoundFinished, RefineStopped]
STOPPED = "stopped"
NO_HTML = "the answer had no HTML; stopping"
NO_BETTER = "the score stopped improving; stopping"
T = TypeVar("T")


# -- helpers the front ends share ----------------------------------------------------------------------------
def stats_line(usage: Usage, timings: Timings, sep: str = ", ") -> str:
    """Tokens, prompt tokens, time to first token, decode speed and total time, as every front end shows them."""
    tps = timings.tokens_per_s(usage.completion_tokens)
    return sep.join([
        f"{usage.completion_tokens} tokens",
        f"prompt {usage.prompt_tokens}",
        f"TTFT {timings.ttft_s:.2f} s" if timings.ttft_s is not None else "TTFT -",
        f"{tps:.1f} tok/s" if tps is not None else "- tok/s",
        f"total {timings.total_s:.2f} s",
    ])


def page_of(output: ParsedOutput) -> tuple[str, bool]:
    """The page to save for an answer: its HTML, or the answer shown as text when it has none."""
    if output.html is not None:
        return output.html, True
    return text_as_page(output.answer), False


def finish(events: Iterator[Event]) -> Finished:
    """Run a task to its (first) :class:`Finished`, ignoring the progress on the way."""
    for event in events:
        if isinstance(event, Finished):
            return event
    raise GlmvError("the task ended without a result")


# -- ask, with or without tools ---------------------------------------------------------------------------------
def _generate(backend: Backend, request: GenerationRequest,
              cancel: threading.Event) -> Generator[Event, None, Result]:
    """One generation: its chunks passed through (``done`` kept back), its result returned."""
    for chunk in backend.generate(request, cancel):
        if chunk.type == "done":
            return collect(iter([chunk]))
        yield chunk
    return collect(iter([]))  # raises: the stream ended without a result


def ask(backend: Backend, messages: list[Message], sampling: SamplingParams, *, thinking: bool = True,
        cancel: threading.Event | None = None, tools: ToolRegistry | None = None, ctx: ToolContext | None = None,
        max_steps: int = MAX_TOOL_STEPS) -> Iterator[Event]:
    """Answer the conversation. With ``tools``, the model may call them (at most ``max_steps`` rounds): each
    call is carried out, yielded as a :class:`ToolStep` and fed back, and the model continues. The tools see
    ``ctx`` (default: the images of the last message). Ends with one :class:`Finished`."""
    cancel = cancel or threading.Event()
    if tools is None:
        request = GenerationRequest(messages, sampling=sampling, thinking=thinking)
        result = yield from _generate(backend, request, cancel)
        yield Finished(result, [], list(messages))
        return
    if max_steps < 1:
        raise GlmvError("the tool loop needs at least 1 step (--max-steps)")
    ctx = ctx if ctx is not None else ToolContext(images=messages[-1].images)  # crop's image 0: the question's first
    messages = list(messages)
    steps: list[Step] = []
    schemas = tools.schemas()
    for round_ in range(max_steps + 1):
        request = GenerationRequest(messages, sampling=sampling, thinking=thinking,
                                    tools=schemas if round_ < max_steps else None)
        result = yield from _generate(backend, request, cancel)
        calls = result.output.tool_calls
        if not calls or round_ == max_steps or result.finish_reason == "cancelled":
            result.trace = [s.to_dict() for s in steps]
            yield Finished(result, steps, messages)
            return
        messages.append(Message("assistant", [result.output.answer] if result.output.answer else [], tool_calls=calls,
                                reasoning=result.output.thinking))
        for call in calls:
            if cancel.is_set():  # Stop: no more tools, no next round; the answer so far is the result
                result.finish_reason = "cancelled"
                result.trace = [s.to_dict() for s in steps]
                yield Finished(result, steps, messages)
                return
            t0 = time.perf_counter()
            content, error = tools.call(call, ctx)
            images = [c for c in content if isinstance(c, LoadedImage)]
            text = " ".join(c for c in content if isinstance(c, str))
            step = Step(call.name, call.arguments, error, text, [i.size for i in images], time.perf_counter() - t0)
            steps.append(step)
            messages.append(Message("tool", content))
            yield ToolStep(step, content)


def run_tool_loop(backend: Backend, messages: list[Message], registry: ToolRegistry, ctx: ToolContext,
                  sampling: SamplingParams, thinking: bool = True, max_steps: int = MAX_TOOL_STEPS,
                  cancel: threading.Event | None = None) -> tuple[Result, list[Step], list[Message]]:
    """The tool loop without progress: (result, steps, conversation with the tool turns)."""
    done = finish(ask(backend, messages, sampling, thinking=thinking, cancel=cancel, tools=registry, ctx=ctx,
                      max_steps=max_steps))
    return done.result, done.steps, done.messages


# -- OCR and HTML ----------------------------------------------------------------------------------------------
def ocr(backend: Backend, pages: list[Any], sampling: SamplingParams, *, prompt: str | None = None,
        before: list[Message] | None = None, cancel: threading.Event | None = None,
        **options: Any) -> Iterator[Event]:
    """Read the text of each image or document page, one prompt per page (the model reads one page at a time
    best): :class:`PageStarted`, the page's chunks and its :class:`Finished`, page after page. ``before``:
    messages that go first in every prompt (a system message); ``options`` as for :func:`ask`."""
    cancel = cancel or threading.Event()
    for i, page in enumerate(pages):
        if cancel.is_set():
            return
        yield PageStarted(i, len(pages), str(getattr(page, "source", "")))
        yield from ask(backend, [*(before or []), user_message(prompt or TASKS["ocr"].prompt, [page])], sampling,
                       cancel=cancel, **options)


def html(backend: Backend, messages: list[Message], sampling: SamplingParams, out_dir: Path,
         **options: Any) -> Iterator[Event]:
    """Generate a page and save it in ``out_dir`` under a new name (``generated_<time>[_n].html``): the HTML of
    the answer, or the answer as a text page when it has none (even a stopped answer is kept, as written).
    ``options`` as for :func:`ask`."""
    done = None
    for event in ask(backend, messages, sampling, **options):
        if isinstance(event, Finished):
            done = event
        yield event
    assert done is not None
    page, found = page_of(done.result.output)
    yield Saved(save_html(page, out_dir), page, found)


# -- refine: render, score, ask again ------------------------------------------------------------------------------
def _unless_cancelled(fn: Callable[[], T], cancel: threading.Event) -> T | None:
    """``fn()`` on a helper thread, given up (None) as soon as ``cancel`` is set: rendering and OCR take
    seconds and cannot be interrupted, so a Stop must not wait for them. Their result is then dropped."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name="glmv-refine-score", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.05)
        if cancel.is_set():
            return None
    if "error" in box:
        raise box["error"]
    return box["value"]


def refine(backend: Backend, target: LoadedImage, first_html: str, first_path: Path, rounds: int,
           sampling: SamplingParams, *, thinking: bool = True, out_dir: Path,
           cancel: threading.Event | None = None) -> Iterator[Event]:
    """The visual feedback loop for screenshot-to-HTML. Scores the starting page (version 1, round 0), then
    up to ``rounds`` times: shows the model its render beside the target with its code, takes the corrected
    page, scores it and saves it (a new file). Stops early when the answer has no HTML or the score stops
    improving (that version is still saved), and at once on ``cancel``: a round cut short saves nothing, the
    versions saved before it stay."""
    from .score import score_page

    cancel = cancel or threading.Event()
    html_, path = first_html, Path(first_path)
    best, render = None, None  # render: the last scored version's screenshot (round 0 sets it)
    for r in range(rounds + 1):
        if r > 0:
            yield RoundStarted(r, rounds)
            request = GenerationRequest(
                [user_message(REFINE_PROMPT.format(html=html_), [target, LoadedImage(render, "render", render.size)])],
                sampling=sampling, thinking=thinking, speculate=True)  # the new page mostly copies the old one
            result = yield from _generate(backend, request, cancel)
            if result.finish_reason == "cancelled" or cancel.is_set():
                yield RefineStopped(STOPPED, cancelled=True)
                return
            if result.output.html is None:
                yield RefineStopped(NO_HTML)
                return
            html_ = result.output.html
        yield Scoring(r)
        scored = _unless_cancelled(lambda: score_page(target.image, html_), cancel)
        if scored is None or cancel.is_set():
            yield RefineStopped(STOPPED, cancelled=True)
            return
        report, render = scored
        if r > 0:
            path = save_html(html_, out_dir)
        yield RoundFinished(r, r + 1, path, html_, report["overall"], report, render)
        if best is not None and report["overall"] <= best:
            yield RefineStopped(NO_BETTER)
            return
        best = report["overall"]
    yield RefineStopped(None)


__all__ = ["MAX_TOOL_STEPS", "Event", "ToolStep", "Finished", "PageStarted", "Saved", "RoundStarted", "Scoring",
           "RoundFinished", "RefineStopped", "stats_line", "page_of", "finish", "ask", "run_tool_loop", "ocr", "html",
           "refine"]
