"""``glmv ui``'s handlers: plain Python generators over the core, tested without a browser.

:class:`WebApp` turns what a user typed or uploaded into core calls and yields what the page shows:
Describe (and Find, which draws the model's boxes on the image), OCR, Image → HTML with versions, edits and
the render-compare-refine loop, and Chat with documents and tools. Every generation goes through
:class:`~glmv.ui.slots.Slots`, so a waiting user sees their place in line and Stop takes them out of it.
Per-session stop events, no global state. The page itself is laid out in :mod:`glmv.ui.page`.
"""

from __future__ import annotations

import html as _html
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import tasks
from ..backends.base import Chunk, Result
from ..errors import GlmvError
from ..grounding import annotate, find_prompt
from ..media import LoadedImage, load_image
from ..outputs import write_atomic
from ..prompts import Message, user_message
from ..settings import DEFAULT_MAX_PIXELS, SamplingParams
from .manager import ModelManager, estimate, gpu_free_gb
from .slots import Slots

MODEL_CHOICES = {
    "GLM-4.6V-Flash (9B)": "zai-org/GLM-4.6V-Flash",
    "GLM-4.6V (106B MoE)": "zai-org/GLM-4.6V",
    "tiny test model": "tiny",
    "local folder…": "",
}
PRECISIONS = {"bf16": "none", "4-bit fast (w4)": "w4", "4-bit nf4 (tutorial)": "nf4"}
VIEWPORTS = {"desktop": 1280, "phone": 390}
ZOOMS = {"fit width": None, "50%": 0.5, "100%": 1.0}
PREVIEW_HEIGHT = 800
EDIT_PROMPT = (
    "Here is the current HTML of the page recreated from the screenshot:\n```html\n{code}\n```\n"
    "Change it as follows: {instruction}\n"
    "Keep everything else the same. Output the complete updated page as one ```html block."
)


LEFT_QUEUE = "■ stopped while waiting: it did not run"


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 21st ..."""
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


@dataclass
class Run:
    """What a streamed generation has produced so far (or where it waits in line)."""

    thinking: str = ""
    answer: str = ""
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    done: Result | None = None
    stopped: bool = False
    waiting: tuple[int, int] | None = None  # (place in line, people waiting) while queued
    left_queue: bool = False  # Stop pressed while waiting: it never ran
    steps: list[tasks.ToolStep] = field(default_factory=list)  # tool calls made so far (the tool loop)
    saved: tasks.Saved | None = None  # the page written (Image → HTML)

    def stats(self) -> str:
        if self.left_queue:
            return LEFT_QUEUE
        if self.waiting is not None:
            place, n = self.waiting
            return f"⏳ waiting for the model: {ordinal(place)} in line ({n} waiting) · Stop leaves the line"
        if self.done is None:
            elapsed = max(time.perf_counter() - self.started, 1e-6)
            return f"… {self.tokens} tokens · {self.tokens / elapsed:.1f} tok/s"
        head = "■ stopped" if self.stopped else ("✓" if self.done.finish_reason != "length" else "✓ (length limit)")
        return f"{head} · " + tasks.stats_line(self.done.usage, self.done.timings, sep=" · ")

    @property
    def over(self) -> bool:
        return self.done is not None or self.left_queue


def iframe(page: str | None, viewport: str = "desktop", zoom: str = "fit width") -> str:
    """A preview of generated HTML, sandboxed (scripts run, no same-origin access to the app).

    The page is laid out at the viewport's width and scaled: "fit width" scales it to the box (done by the
    page's script, which knows the box's width), the other zooms by a fixed factor."""
    if not page:
        return "<div class='glmv-preview-empty'>The preview appears here.</div>"
    width = VIEWPORTS.get(viewport, 1280)
    scale = ZOOMS.get(zoom)
    fixed = scale is not None
    s = scale or 1.0
    return (
        f'<div class="glmv-preview-box" data-width="{width}" data-height="{PREVIEW_HEIGHT}" '
        f'data-zoom="{"fixed" if fixed else "fit"}" '
        f'style="overflow:auto;border:1px solid #ddd;border-radius:8px;background:#fff;'
        f'height:{round(PREVIEW_HEIGHT * s) if fixed else 480}px">'
        f'<iframe class="glmv-preview" sandbox="allow-scripts" referrerpolicy="no-referrer" title="page preview" '
        f'style="width:{width}px;height:{PREVIEW_HEIGHT}px;border:0;display:block;transform-origin:0 0;'
        f'transform:scale({s})" srcdoc="{_html.escape(page, quote=True)}"></iframe></div>'
    )


def _gentle(exc: GlmvError, *paths: Any) -> GlmvError:
    """The same error naming files as the user knows them, not by the server's temporary upload paths."""
    text = str(exc)
    for path in paths:
        if isinstance(path, str) and path:
            text = text.replace(path, Path(path).name)
    return GlmvError(text)


def plain_view(view: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A chat as this app writes it: one entry per text or file, ``{"role", "content": str | {"path"}}``
    (plus ``metadata`` when titled). Gradio hands a chat back with each message's content as a list of
    typed parts; saved chats and the history rebuilt from them need the simple form."""
    out: list[dict[str, Any]] = []
    for e in view or []:
        meta = {k: v for k, v in (e.get("metadata") or {}).items() if v is not None}
        content = e.get("content")
        for part in content if isinstance(content, list) else [content]:
            if isinstance(part, str):
                value: Any = part
            elif isinstance(part, dict) and part.get("type") == "text":
                value = part.get("text", "")
            elif isinstance(part, dict) and isinstance(part.get("file"), dict) and part["file"].get("path"):
                value = {"path": part["file"]["path"]}
            elif isinstance(part, dict) and part.get("path"):
                value = {"path": part["path"]}
            else:
                continue
            out.append({"role": e.get("role"), "content": value, **({"metadata": meta} if meta else {})})
    return out


def messages_from_view(view: list[dict[str, Any]], max_pixels: int) -> list[Message]:
    """The model-side history of a chat, rebuilt from what the chat shows (for a chat reopened later).

    User files then the user's text make one user turn; an assistant entry without a title is the answer.
    Thinking and tool steps (titled entries) are not history, as in a live chat."""
    from ..documents import load_inputs

    history: list[Message] = []
    files: list[str] = []
    for entry in plain_view(view):
        content, titled = entry.get("content"), bool((entry.get("metadata") or {}).get("title"))
        if entry.get("role") == "user":
            if isinstance(content, dict):
                files.append(content["path"])
            elif isinstance(content, str):
                media = [m for p in files for m in load_inputs(p, max_pixels=max_pixels)]
                history.append(user_message(content, media))
                files = []
        elif isinstance(content, str) and not titled and history and history[-1].role == "user":
            history.append(Message("assistant", [content]))
    return history


@dataclass(frozen=True)
class Knobs:
    """The page's generation controls: the answer's length cap, temperature and top-p (None: the model's default).
    Handlers take one where they take ``max_new`` (a plain number there means the length cap alone)."""

    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None


def sampling_for(defaults: SamplingParams, knobs: "int | float | Knobs") -> SamplingParams:
    """The model's defaults with the page's controls applied (validated: the sliders' range is the model's)."""
    k = knobs if isinstance(knobs, Knobs) else Knobs(int(knobs))
    return defaults.merged(max_new_tokens=int(k.max_new_tokens), temperature=k.temperature, top_p=k.top_p)


class WebApp:
    """The handlers behind the page. Each browser session has its own stop event and state."""

    def __init__(self, manager: ModelManager, html_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                 concurrency: int = 1, store: Any = None, examples: Path | None = None) -> None:
        self.manager = manager
        self.html_dir = Path(html_dir)
        self.max_pixels = max_pixels
        self.slots = Slots(concurrency)
        self.store = store
        self.examples = sorted(Path(examples).glob("*.png")) if examples and Path(examples).is_dir() else []
        self._stops: dict[str, threading.Event] = {}
        self._downloads = Path(tempfile.mkdtemp(prefix="glmv-ui-"))

    def default_sampling(self) -> SamplingParams:
        """The loaded model's sampling defaults (the model card's until one is loaded): the sliders start there."""
        backend = self.manager.backend
        return backend.default_sampling if backend is not None else SamplingParams()

    # -- sessions and stop -----------------------------------------------------------------------
    def _new_stop(self, session: str) -> threading.Event:
        old = self._stops.get(session)
        if old is not None:
            old.set()  # a new run from the same browser ends the previous one
        event = threading.Event()
        self._stops[session] = event
        return event

    def stop(self, session: str) -> None:
        event = self._stops.get(session)
        if event is not None:
            event.set()

    def _queue(self, stop: threading.Event) -> Iterator[Run | int]:
        """Wait for a slot, yielding a waiting :class:`Run` when the place in line changes; the last item is
        the ticket (an int) once admitted. A Stop while waiting yields a ``left_queue`` run and ends."""
        ticket = self.slots.enter()
        seen = None
        admitted = False
        try:
            while not self.slots.wait(ticket, 0.1):
                if stop.is_set():
                    break
                place = self.slots.position(ticket)
                if place != seen and place[0] > 0:
                    seen = place
                    yield Run(waiting=place)
            admitted = not stop.is_set()
        finally:
            if not admitted:  # stopped, or the page went away: give the place in line back
                self.slots.leave(ticket)
        yield ticket if admitted else Run(left_queue=True)

    # -- the streaming core --------------------------------------------------------------------------
    def _task(self, session: str, max_new_tokens: Any,
              start: Callable[[Any, Any, threading.Event], Iterator[tasks.Event]]) -> Iterator[Run | tasks.Event]:
        """Wait for a slot (yielding waiting :class:`Run` items), then run the task ``start(backend, sampling,
        stop)`` and pass its events on. Stop, a new run from the same browser or the page going away cancels it."""
        backend = self.manager.require()
        sampling = sampling_for(backend.default_sampling, max_new_tokens)
        stop = self._new_stop(session)
        ticket = None
        for item in self._queue(stop):
            if isinstance(item, Run):
                yield item
            else:
                ticket = item
        if ticket is None:
            return
        finished = False
        try:
            yield from start(backend, sampling, stop)  # validation errors surface here, before any GPU work
            finished = True
        finally:
            if not finished:
                stop.set()
            self.slots.leave(ticket)

    @staticmethod
    def _follow(items: Iterator[Run | tasks.Event]) -> Iterator[Run]:
        """What a task has produced so far, as a :class:`Run`, at most ~20 times a second while text streams."""
        run = Run()
        last = 0.0
        for item in items:
            if isinstance(item, Run):  # still waiting in line, or left it
                yield item
            elif isinstance(item, Chunk):
                if item.type == "thinking":
                    run.thinking += item.text
                elif item.type == "answer":
                    run.answer += item.text
                run.tokens = item.usage.completion_tokens
                now = time.perf_counter()
                if now - last > 0.05:  # at most ~20 page updates a second
                    last = now
                    yield run
            elif isinstance(item, tasks.ToolStep):  # the next round writes a new answer
                run.steps.append(item)
                run.thinking = run.answer = ""
                yield run
            elif isinstance(item, tasks.Finished):
                run.done = item.result
                run.stopped = item.result.finish_reason == "cancelled"
                run.thinking, run.answer = item.result.output.thinking, item.result.output.answer
                yield run
            elif isinstance(item, tasks.Saved):
                run.saved = item
                yield run

    def stream(self, messages: list[Message], thinking_on: bool, max_new_tokens: int | Knobs, session: str,
               tools: Any = None, ctx: Any = None, max_steps: int = tasks.MAX_TOOL_STEPS) -> Iterator[Run]:
        """Ask (with ``tools``: the tool loop), in line with the other users."""
        return self._follow(self._task(session, max_new_tokens, lambda backend, sampling, stop: tasks.ask(
            backend, messages, sampling, thinking=bool(thinking_on), cancel=stop, tools=tools, ctx=ctx,
            max_steps=max_steps)))

    def _image(self, image: Any, where: str) -> LoadedImage:
        if image is None:
            raise GlmvError(f"{where}: upload an image first")
        try:
            return load_image(image, max_pixels=self.max_pixels)
        except GlmvError as exc:
            raise _gentle(exc, image) from None

    @staticmethod
    def _prompt(prompt: Any, where: str, example: str) -> str:
        """Every tab checks its prompt the same way: empty and blank are refused with one message."""
        text = (prompt or "").strip()
        if not text:
            raise GlmvError(f"{where}: the prompt is empty; type what you want, for example: {example}")
        return text

    def _download_dir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self._downloads))

    # -- tabs -----------------------------------------------------------------------------------------
    def describe(self, image, prompt, thinking_on, max_new, session) -> Iterator[tuple[str, str, str]]:
        img = self._image(image, "Describe")
        text = self._prompt(prompt, "Describe", "describe this image")
        for run in self.stream([user_message(text, [img])], thinking_on, max_new, session):
            yield run.thinking, run.answer, run.stats()

    def find(self, image, query, thinking_on, max_new, session):
        """Find mode: ask for boxes, draw them. Yields (thinking, answer, stats, annotated PNG, [PNG, JSON])."""
        img = self._image(image, "Find")
        what = self._prompt(query, "Find", "the red house")
        for run in self.stream([user_message(find_prompt(what), [img])], thinking_on, max_new, session):
            if run.done is None:
                yield run.thinking, run.answer, run.stats(), None, None
                continue
            annotated, files, note = self._annotate(img, run.answer, what)
            yield run.thinking, run.answer, run.stats() + note, annotated, files

    def _annotate(self, img: LoadedImage, answer: str, label: str) -> tuple[str | None, list[str] | None, str]:
        """Draw the answer's boxes on the image; (PNG path, [PNG, JSON], a note for the stats line)."""
        found = annotate(img, answer, label)  # drawn and reported in the uploaded file's own pixels
        if not found.boxes:
            return None, None, f" · {found.note}"
        folder = self._download_dir()
        png, data = found.save(folder / "found.png", folder / "found.json")
        return str(png), [str(png), str(data)], f" · {found.note}"

    def ocr(self, image, prompt, thinking_on, max_new, session) -> Iterator[tuple[str, str, str, str, list[str] | None]]:
        img = self._image(image, "OCR")
        text = self._prompt(prompt, "OCR", "read all the text")
        read = self._task(session, max_new, lambda backend, sampling, stop: tasks.ocr(
            backend, [img], sampling, prompt=text, thinking=bool(thinking_on), cancel=stop))
        for run in self._follow(read):
            files = None
            if run.done is not None and run.answer:
                stamp = time.strftime("%Y%m%d_%H%M%S")
                folder = self._download_dir()
                files = [str(write_atomic(folder / f"ocr_{stamp}.md", run.answer + "\n")),
                         str(write_atomic(folder / f"ocr_{stamp}.txt", run.answer + "\n"))]
            yield run.thinking, run.answer, run.answer, run.stats(), files

    def html(self, image, prompt, thinking_on, max_new, viewport, versions, session, zoom="fit width"):
        """Screenshot → page. Yields (thinking, code, stats, file, preview, versions, version choices, choice)."""
        img = self._image(image, "Image → HTML")
        text = self._prompt(prompt, "Image → HTML", "recreate this page as HTML")
        yield from self._html_run([user_message(text, [img])], thinking_on, max_new, viewport, versions or [],
                                  session, "generated", zoom)

    def html_edit(self, image, instruction, thinking_on, max_new, viewport, versions, current, session,
                  zoom="fit width"):
        if not versions:
            raise GlmvError("Image → HTML: generate a page first, then describe the change")
        change = self._prompt(instruction, "Change the page", "make the header dark blue")
        base = next((v for v in versions if v["label"] == current), versions[-1])
        img = self._image(image, "Image → HTML")
        prompt = EDIT_PROMPT.format(code=base["code"], instruction=change)
        yield from self._html_run([user_message(prompt, [img])], thinking_on, max_new, viewport, versions, session,
                                  f"edit: {change[:40]}", zoom)

    def _html_run(self, messages, thinking_on, max_new, viewport, versions, session, what, zoom):
        choices = [v["label"] for v in versions]
        write = self._task(session, max_new, lambda backend, sampling, stop: tasks.html(
            backend, messages, sampling, self.html_dir, thinking=bool(thinking_on), cancel=stop))
        for run in self._follow(write):
            if run.saved is None:
                yield run.thinking, run.answer, run.stats(), None, iframe(None), versions, choices, None
                continue
            code, path = run.saved.page, run.saved.path
            label = f"v{len(versions) + 1} · {what} · {time.strftime('%H:%M:%S')}"
            versions = [*versions, {"label": label, "code": code, "path": str(path)}]
            stats = run.stats() + ("" if run.saved.html_found else " · warning: no HTML in the answer, saved it as text")
            yield (run.thinking, code, stats, str(path), iframe(code, viewport, zoom), versions,
                   [v["label"] for v in versions], label)

    def pick_version(self, label, versions, viewport, image=None, zoom="fit width"):
        """(code, file, preview, comparison, scores) of the version called ``label``."""
        for v in versions or []:
            if v["label"] == label:
                return v["code"], v["path"], iframe(v["code"], viewport, zoom), self.comparison(image, v), scores_table(v)
        return "", None, iframe(None), None, ""

    def chat(self, message: dict, history: list[Message], chat_view: list, show_thinking: bool, use_tools: bool,
             thinking_on: bool, max_new, session, max_steps: int = tasks.MAX_TOOL_STEPS, find: bool = False):
        """One chat turn. ``message`` is a MultimodalTextbox value: {"text": ..., "files": [...]}.
        With ``use_tools`` the model may crop/zoom the conversation's images and render HTML; each step shows
        up in the chat as a collapsible message followed by the image the tool returned. With ``find`` the
        question asks for boxes, which are drawn on the conversation's latest image."""
        from ..documents import RenderOptions, load_all
        from ..limits import Budget
        from ..tools import ToolContext, default_registry

        text = self._prompt((message or {}).get("text"), "Chat",
                            "what is in this picture? (an image needs a question too)")
        files = (message or {}).get("files", []) or []
        paths = [f if isinstance(f, str) else f.get("path") for f in files]
        # Images, PDF pages and videos, measured against the default work limits before any is decoded.
        try:
            media = load_all(paths, RenderOptions(max_pixels=self.max_pixels), budget=Budget())
        except GlmvError as exc:
            raise _gentle(exc, *paths) from None
        images = [i for m in history for i in m.images] + [m for m in media if isinstance(m, LoadedImage)]
        if find and not images:
            raise GlmvError("Chat: Find needs an image in the conversation; attach one")
        history = [*history, user_message(find_prompt(text) if find else text, media)]
        view = plain_view(chat_view)
        for p in paths:
            view.append({"role": "user", "content": {"path": p}})
        view.append({"role": "user", "content": text})
        registry = default_registry() if use_tools else None
        ctx = ToolContext(images=[i for m in history for i in m.images])  # crop may look at every image so far
        steps: list[dict] = []
        shown = 0
        for run in self.stream(history, thinking_on, max_new, session, tools=registry, ctx=ctx, max_steps=max_steps):
            if run.left_queue:  # stopped before it ran: as if it was never sent
                yield list(chat_view or []), history[:-1], run.stats(), message
                return
            for step in run.steps[shown:]:
                steps += self._step_view(step)
            shown = len(run.steps)
            turn = []
            if show_thinking and run.thinking:
                turn.append({"role": "assistant", "content": run.thinking, "metadata": {
                    "title": "Thinking", "status": "done" if run.answer or run.done else "pending"}})
            turn.append({"role": "assistant", "content": run.answer or ("…" if run.done is None else "")})
            new_history = history
            stats = run.stats()
            if run.done is not None:
                new_history = [*history, Message("assistant", [run.answer])]
                if find:
                    png, _, note = self._annotate(images[-1], run.answer, text)
                    stats += note
                    if png:
                        turn.append({"role": "assistant", "content": {"path": png}})
            yield view + steps + turn, new_history, stats, {"text": "", "files": []}

    def _step_view(self, event: tasks.ToolStep) -> list[dict]:
        """A tool step as the chat shows it: a titled message with what came back, then any image it returned."""
        step = event.step
        args = ", ".join(f"{k}={json.dumps(v)[:60]}" for k, v in step.arguments.items())
        shown = [{"role": "assistant", "content": step.error or step.text,
                  "metadata": {"title": f"⚙ {step.name}({args})"}}]
        for img in (c for c in event.content if isinstance(c, LoadedImage)):
            path = self._download_dir() / f"{step.name}.png"
            img.image.save(path)
            shown.append({"role": "assistant", "content": {"path": str(path)}})
        return shown

    # -- Image → HTML: the visual feedback loop ------------------------------------------------------
    def html_refine(self, image, rounds, thinking_on, max_new, viewport, versions, current, session,
                    zoom="fit width"):
        """Render the current version, show it beside the screenshot, let the model correct it; repeat.

        Yields (code, status, file, preview, versions, choices, chosen, comparison, scores) after each step,
        with the round and its token count while the model writes; Stop ends the round in progress."""
        if not versions:
            raise GlmvError("Image → HTML: generate a page first, then refine it")
        base = next((v for v in versions if v["label"] == current), versions[-1])
        target = self._image(image, "Image → HTML")
        versions = list(versions)
        rounds = int(rounds)
        entry, done = base, 0

        def progress(status: str) -> tuple:  # only the status line changes (None: leave it as it is)
            return (None, status, *(None,) * 7)

        def shown(status: str) -> tuple:
            return (entry["code"], status, entry["path"], iframe(entry["code"], viewport, zoom), versions,
                    [x["label"] for x in versions], entry["label"], self.comparison(image, entry), scores_table(entry))

        def scored(mark: str) -> str:
            score = f": visual score {entry['score']:.3f}" if "score" in entry else ""
            return f"{mark} round {done} of {rounds} · {entry['label']}{score}"

        started = last = time.perf_counter()
        for item in self._task(session, max_new, lambda backend, sampling, stop: tasks.refine(
                backend, target, base["code"], Path(base["path"]), rounds, sampling, thinking=bool(thinking_on),
                out_dir=self.html_dir, cancel=stop)):
            now = time.perf_counter()
            if isinstance(item, Run):  # waiting in line
                yield progress(item.stats())
            elif isinstance(item, tasks.Scoring):
                head = (f"round {item.round} of {rounds}: scoring the render" if item.round
                        else "scoring the starting version")
                yield progress(f"… {head} · {now - started:.0f} s")
            elif isinstance(item, tasks.RoundStarted) or (isinstance(item, Chunk) and now - last > 0.1):
                last = now
                tokens = item.usage.completion_tokens if isinstance(item, Chunk) else 0
                yield progress(f"… round {done + 1} of {rounds}: the model is writing the correction: {tokens} tokens"
                               f" · {now - started:.0f} s")
            elif isinstance(item, tasks.RoundFinished):
                render_path = self._download_dir() / f"render-v{item.version}.png"
                item.render.save(render_path)
                if item.round == 0:  # the starting version: attach its score and render
                    base.update(score=item.score, report=_short_report(item.report), render=str(render_path))
                    entry = base
                else:
                    entry = {"label": f"v{len(versions) + 1} · refined · score {item.score:.2f}", "code": item.html,
                             "path": str(item.path), "score": item.score, "report": _short_report(item.report),
                             "render": str(render_path)}
                    versions.append(entry)
                done = item.round
                yield shown(scored("✓" if done == rounds else "…"))
            elif isinstance(item, tasks.RefineStopped):
                yield shown(scored("■" if item.cancelled else "✓") + (f" · {item.reason}" if item.reason else ""))

    @staticmethod
    def comparison(image, entry) -> tuple[str, str] | None:
        """(target, render) for the comparison slider, or None before a version was rendered."""
        if not entry or not entry.get("render") or not image:
            return None
        return (image, entry["render"])

    # -- model panel -----------------------------------------------------------------------------
    def estimate(self, choice: str, local_path: str, precision: str) -> str:
        model = MODEL_CHOICES.get(choice) or (local_path or "").strip()
        if not model:
            return "Enter the folder of a local checkpoint."
        return estimate(model, PRECISIONS.get(precision, "none"), gpu_free_gb()).markdown()

    def load(self, choice: str, local_path: str, precision: str) -> tuple[str, str]:
        """Start loading; (status, a message under the button). A choice that cannot work is refused here,
        before anything is unloaded."""
        model = MODEL_CHOICES.get(choice) or (local_path or "").strip()
        if not model:
            return self.manager.status_markdown(), "✕ enter the folder of a local checkpoint"
        try:
            self.manager.load_async(model=model, quant=PRECISIONS.get(precision, "none"))
        except GlmvError as exc:
            return self.manager.status_markdown(), f"✕ {exc}"
        return self.manager.status_markdown(), ""


def _short_report(report: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in report.items() if isinstance(v, float)}


def scores_table(entry: dict[str, Any] | None) -> str:
    """The version's visual scores on one line (it wraps on a phone, where a table would not fit)."""
    report = (entry or {}).get("report")
    if not report:
        return ""
    keys = [k for k in ("overall", "block_match", "text", "position", "colour", "visual") if k in report]
    return "**Scores** · " + " · ".join(f"{k.replace('_', ' ')} **{report[k]:.3f}**" for k in keys)
