"""``glmv ui``: the web app (Gradio) over the core. ``build_ui(app)`` is a factory; nothing is global.

:class:`WebApp` holds the handlers (plain Python generators, tested without a browser) and the per-session
stop events; :func:`build_ui` lays out the page: Describe, OCR, Image → HTML and Chat tabs, a model panel,
the thinking switches, streaming output with live token counts, and a Stop button that cancels generation
on the device. Generated pages are previewed only inside an iframe sandboxed without
``allow-same-origin``.
"""

import html as _html
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..backends.base import Chunk, GenerationRequest
from ..errors import GlmvError
from ..media import LoadedImage, load_image
from ..outputs import save_html, text_as_page, write_atomic
from ..prompts import TASKS, Message, user_message
from .manager import ModelManager, estimate, gpu_free_gb

MODEL_CHOICES = {
    "GLM-4.6V-Flash (9B)": "zai-org/GLM-4.6V-Flash",
    "GLM-4.6V (106B MoE)": "zai-org/GLM-4.6V",
    "tiny test model": "tiny",
    "local folder…": "",
}
PRECISIONS = {"bf16": "none", "4-bit fast (w4)": "w4", "4-bit nf4 (tutorial)": "nf4"}
VIEWPORTS = {"desktop": 1280, "phone": 390}
EDIT_PROMPT = (
    "Here is the current HTML of the page recreated from the screenshot:\n```html\n{code}\n```\n"
    "Change it as follows: {instruction}\n"
    "Keep everything else the same. Output the complete updated page as one ```html block."
)


@dataclass
class Run:
    """What a streamed generation has produced so far."""

    thinking: str = ""
    answer: str = ""
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    done: Chunk | None = None
    stopped: bool = False

    def stats(self) -> str:
        if self.done is None:
            elapsed = max(time.perf_counter() - self.started, 1e-6)
            return f"… {self.tokens} tokens · {self.tokens / elapsed:.1f} tok/s"
        u, t = self.done.usage, self.done.timings
        tps = t.tokens_per_s(u.completion_tokens)
        parts = [f"{u.completion_tokens} tokens", f"prompt {u.prompt_tokens}"]
        if t.ttft_s is not None:
            parts.append(f"first token {t.ttft_s:.2f} s")
        if tps:
            parts.append(f"{tps:.1f} tok/s")
        parts.append(f"{t.total_s:.1f} s")
        head = "■ stopped" if self.stopped else ("✓" if self.done.finish_reason != "length" else "✓ (length limit)")
        return f"{head} · " + " · ".join(parts)


def iframe(page: str | None, viewport: str = "desktop") -> str:
    """A preview of generated HTML: sandboxed (scripts run, but no same-origin access to the app)."""
    if not page:
        return "<div style='padding:1em;color:#888'>The preview appears here.</div>"
    width = VIEWPORTS.get(viewport, 1280)
    return (
        f'<div style="overflow:auto;border:1px solid #ddd;border-radius:8px;background:#fff">'
        f'<iframe class="glmv-preview" sandbox="allow-scripts" referrerpolicy="no-referrer" '
        f'style="width:{width}px;height:640px;border:0;display:block;margin:auto" '
        f'srcdoc="{_html.escape(page, quote=True)}"></iframe></div>'
    )


class WebApp:
    """The handlers behind the page. Each browser session has its own stop event and state."""

    def __init__(self, manager: ModelManager, html_dir: Path, max_pixels: int = 4_000_000) -> None:
        self.manager = manager
        self.html_dir = Path(html_dir)
        self.max_pixels = max_pixels
        self._stops: dict[str, threading.Event] = {}
        self._downloads = Path(tempfile.mkdtemp(prefix="glmv-ui-"))

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

    # -- the streaming core --------------------------------------------------------------------------
    def stream(self, messages: list[Message], thinking_on: bool, max_new_tokens: int, session: str,
               tools: list | None = None) -> Iterator[Run]:
        backend = self.manager.require()
        defaults = backend.default_sampling
        request = GenerationRequest(messages, sampling=defaults.merged(max_new_tokens=int(max_new_tokens)),
                                    thinking=bool(thinking_on), tools=tools)
        stop = self._new_stop(session)
        run = Run()
        chunks = backend.generate(request, stop)  # validation errors surface here, before any GPU work
        last = 0.0
        try:
            for chunk in chunks:
                if chunk.type == "thinking":
                    run.thinking += chunk.text
                elif chunk.type == "answer":
                    run.answer += chunk.text
                elif chunk.type == "done":
                    run.done = chunk
                    run.stopped = chunk.finish_reason == "cancelled"
                    assert chunk.result is not None
                    run.thinking, run.answer = chunk.result.thinking, chunk.result.answer
                    yield run
                    return
                run.tokens = chunk.usage.completion_tokens
                now = time.perf_counter()
                if now - last > 0.05:  # at most ~20 page updates a second
                    last = now
                    yield run
        finally:
            if run.done is None:
                stop.set()

    def _image(self, image: Any, where: str) -> LoadedImage:
        if image is None:
            raise GlmvError(f"{where}: upload an image first")
        return load_image(image, max_pixels=self.max_pixels)

    # -- tabs -----------------------------------------------------------------------------------------
    def describe(self, image, prompt, thinking_on, max_new, session) -> Iterator[tuple[str, str, str]]:
        img = self._image(image, "Describe")
        for run in self.stream([user_message(prompt or TASKS["describe"].prompt, [img])], thinking_on, max_new, session):
            yield run.thinking, run.answer, run.stats()

    def ocr(self, image, prompt, thinking_on, max_new, session) -> Iterator[tuple[str, str, str, str, list[str] | None]]:
        img = self._image(image, "OCR")
        for run in self.stream([user_message(prompt or TASKS["ocr"].prompt, [img])], thinking_on, max_new, session):
            files = None
            if run.done is not None and run.answer:
                stamp = time.strftime("%Y%m%d_%H%M%S")
                folder = Path(tempfile.mkdtemp(dir=self._downloads))
                files = [str(write_atomic(folder / f"ocr_{stamp}.md", run.answer + "\n")),
                         str(write_atomic(folder / f"ocr_{stamp}.txt", run.answer + "\n"))]
            yield run.thinking, run.answer, run.answer, run.stats(), files

    def html(self, image, prompt, thinking_on, max_new, viewport, versions, session):
        """Screenshot → page. Yields (thinking, code, stats, file, preview, versions, version choices, choice)."""
        img = self._image(image, "Image → HTML")
        yield from self._html_run([user_message(prompt or TASKS["html"].prompt, [img])], thinking_on, max_new,
                                  viewport, versions or [], session, "generated")

    def html_edit(self, image, instruction, thinking_on, max_new, viewport, versions, current, session):
        if not versions:
            raise GlmvError("generate a page first, then describe the change")
        if not (instruction or "").strip():
            raise GlmvError("describe the change, for example: make the header dark blue")
        base = next((v for v in versions if v["label"] == current), versions[-1])
        img = self._image(image, "Image → HTML")
        prompt = EDIT_PROMPT.format(code=base["code"], instruction=instruction.strip())
        yield from self._html_run([user_message(prompt, [img])], thinking_on, max_new, viewport, versions, session,
                                  f"edit: {instruction.strip()[:40]}")

    def _html_run(self, messages, thinking_on, max_new, viewport, versions, session, what):
        choices = [v["label"] for v in versions]
        for run in self.stream(messages, thinking_on, max_new, session):
            if run.done is None:
                yield run.thinking, run.answer, run.stats(), None, iframe(None), versions, choices, None
                continue
            page = run.done.result.html if run.done.result else None
            code = page if page is not None else text_as_page(run.answer)
            path = save_html(code, self.html_dir)
            label = f"v{len(versions) + 1} · {what} · {time.strftime('%H:%M:%S')}"
            versions = [*versions, {"label": label, "code": code, "path": str(path)}]
            stats = run.stats() + ("" if page is not None else " · warning: no HTML in the answer, saved it as text")
            yield (run.thinking, code, stats, str(path), iframe(code, viewport), versions,
                   [v["label"] for v in versions], label)

    def pick_version(self, label, versions, viewport, image=None):
        for v in versions or []:
            if v["label"] == label:
                return v["code"], v["path"], iframe(v["code"], viewport), self.comparison(image, v)
        return "", None, iframe(None), []

    def chat(self, message: dict, history: list[Message], chat_view: list, show_thinking: bool, use_tools: bool,
             thinking_on: bool, max_new, session, max_steps: int = 4):
        """One chat turn. ``message`` is a MultimodalTextbox value: {"text": ..., "files": [...]}.
        With ``use_tools`` the model may crop/zoom the conversation's images and render HTML; each step shows
        up in the chat as a collapsible message followed by the image the tool returned."""
        from ..documents import RenderOptions, load_all
        from ..limits import Budget
        from ..tools import ToolContext, default_registry

        text = (message or {}).get("text", "").strip()
        files = (message or {}).get("files", []) or []
        if not text:
            raise GlmvError("type a message (images alone need a question)")
        paths = [f if isinstance(f, str) else f.get("path") for f in files]
        # Images, PDF pages and videos, measured against the default work limits before any is decoded.
        media = load_all(paths, RenderOptions(max_pixels=self.max_pixels), budget=Budget())
        history = [*history, user_message(text, media)]
        view = list(chat_view or [])
        for p in paths:
            view.append({"role": "user", "content": {"path": p}})
        view.append({"role": "user", "content": text})
        registry = default_registry()
        ctx = ToolContext(images=[i for m in history for i in m.images])
        convo = list(history)
        steps: list[dict] = []
        for round_ in range(max_steps + 1):
            tools = registry.schemas() if use_tools and round_ < max_steps else None
            run = None
            for run in self.stream(convo, thinking_on, max_new, session, tools=tools):
                turn = []
                if show_thinking and run.thinking:
                    turn.append({"role": "assistant", "content": run.thinking, "metadata": {
                        "title": "Thinking", "status": "done" if run.answer or run.done else "pending"}})
                turn.append({"role": "assistant", "content": run.answer or ("…" if run.done is None else "")})
                new_history = history
                if run.done is not None:
                    new_history = [*history, Message("assistant", [run.answer])]
                yield view + steps + turn, new_history, run.stats(), {"text": "", "files": []}
            calls = run.done.result.tool_calls if run is not None and run.done is not None and run.done.result else []
            if not tools or not calls or run.stopped:
                return
            convo.append(Message("assistant", [run.answer] if run.answer else [], tool_calls=calls, reasoning=run.thinking))
            for call in calls:
                content, error = registry.call(call, ctx)
                convo.append(Message("tool", content))
                args = ", ".join(f"{k}={json.dumps(v)[:60]}" for k, v in call.arguments.items())
                note = error or " ".join(c for c in content if isinstance(c, str))
                steps.append({"role": "assistant", "content": note, "metadata": {"title": f"⚙ {call.name}({args})"}})
                for img in (c for c in content if isinstance(c, LoadedImage)):
                    path = Path(tempfile.mkdtemp(dir=self._downloads)) / f"{call.name}.png"
                    img.image.save(path)
                    steps.append({"role": "assistant", "content": {"path": str(path)}})

    # -- Image → HTML: the visual feedback loop ------------------------------------------------------
    def html_refine(self, image, rounds, thinking_on, max_new, viewport, versions, current, session):
        """Render the current version, show it beside the screenshot, let the model correct it; repeat."""
        from ..refine import refine

        if not versions:
            raise GlmvError("generate a page first, then refine it")
        base = next((v for v in versions if v["label"] == current), versions[-1])
        target = self._image(image, "Image → HTML")
        backend = self.manager.require()
        sampling = backend.default_sampling.merged(max_new_tokens=int(max_new))
        versions = list(versions)
        stop = self._new_stop(session)
        for v in refine(backend, target, base["code"], Path(base["path"]), int(rounds), sampling, bool(thinking_on),
                        self.html_dir):
            render_path = Path(tempfile.mkdtemp(dir=self._downloads)) / f"render-v{v['version']}.png"
            v["render"].save(render_path)
            if v["version"] == 1:  # the starting version: attach its score and render
                base.update(score=v["score"], render=str(render_path))
                entry = base
            else:
                entry = {"label": f"v{len(versions) + 1} · refined · score {v['score']:.2f}", "code": v["html"],
                         "path": v["path"], "score": v["score"], "render": str(render_path)}
                versions.append(entry)
            status = f"version {entry['label']}: visual score {v['score']:.3f}" + (f" · {v['stop']}" if v.get("stop") else "")
            yield (entry["code"], status, entry["path"], iframe(entry["code"], viewport), versions,
                   [x["label"] for x in versions], entry["label"], self.comparison(image, entry))
            if stop.is_set():
                return

    @staticmethod
    def comparison(image, entry) -> list:
        if not entry or not entry.get("render"):
            return []
        return [(image, "target"), (entry["render"], f"render · score {entry.get('score', 0):.2f}")]

    # -- model panel -----------------------------------------------------------------------------
    def estimate(self, choice: str, local_path: str, precision: str) -> str:
        model = MODEL_CHOICES.get(choice) or (local_path or "").strip()
        if not model:
            return "Enter the folder of a local checkpoint."
        return estimate(model, PRECISIONS.get(precision, "none"), gpu_free_gb()).markdown()

    def load(self, choice: str, local_path: str, precision: str) -> str:
        model = MODEL_CHOICES.get(choice) or (local_path or "").strip()
        if not model:
            raise GlmvError("enter the folder of a local checkpoint")
        self.manager.load_async(model=model, quant=PRECISIONS.get(precision, "none"))
        return self.manager.status_markdown()


CSS = """
.glmv-stats {font-size: 0.9em; color: #666}
footer {display: none !important}
"""


def build_ui(app: WebApp) -> Any:
    import gradio as gr

    def guarded(gen):
        """Turn core errors into messages on the page; the app keeps serving."""
        try:
            yield from gen
        except GlmvError as exc:
            raise gr.Error(str(exc)) from None
        except Exception as exc:  # out of memory and friends: say it, keep serving
            raise gr.Error(f"{type(exc).__name__}: {exc}") from None

    def session(request) -> str:
        return getattr(request, "session_hash", None) or "default"

    with gr.Blocks(title="glmv · GLM-4.6V") as demo:
        gr.Markdown("## glmv · GLM-4.6V vision")
        with gr.Row():
            status = gr.Markdown(app.manager.status_markdown(), elem_id="glmv-status")
        with gr.Accordion("Model", open=False):
            with gr.Row():
                choice = gr.Dropdown(list(MODEL_CHOICES), value=_choice_for(app.manager.settings.model), label="Model")
                local = gr.Textbox(label="Local folder", placeholder="/path/to/checkpoint",
                                   value="" if _choice_for(app.manager.settings.model) != "local folder…" else app.manager.settings.model)
                precision = gr.Radio(list(PRECISIONS), value=_precision_for(app.manager.settings.quant), label="Precision")
            est = gr.Markdown(app.estimate(_choice_for(app.manager.settings.model), app.manager.settings.model,
                                           _precision_for(app.manager.settings.quant)))
            load_btn = gr.Button("Load model", variant="secondary")
        with gr.Row():
            show_thinking = gr.Checkbox(True, label="Show thinking")
            thinking_on = gr.Checkbox(True, label="Think before answering (off: faster)")
            max_new = gr.Slider(16, 8192, value=2048, step=16, label="Max new tokens", elem_id="max-new")

        gpu = {"concurrency_limit": 1, "concurrency_id": "gpu"}
        with gr.Tabs():
            with gr.Tab("Describe"):
                with gr.Row():
                    with gr.Column(scale=1):
                        d_img = gr.Image(type="filepath", label="Image", elem_id="describe-image")
                        d_prompt = gr.Textbox(TASKS["describe"].prompt, label="Prompt", lines=2)
                        with gr.Row():
                            d_run = gr.Button("Describe", variant="primary", elem_id="describe-run")
                            d_stop = gr.Button("Stop", variant="stop", elem_id="describe-stop")
                    with gr.Column(scale=2):
                        with gr.Accordion("Thinking", open=False) as d_think_box:
                            d_think = gr.Markdown()
                        d_answer = gr.Markdown(elem_id="describe-answer")
                        d_stats = gr.Markdown(elem_classes="glmv-stats", elem_id="describe-stats")
            with gr.Tab("OCR"):
                with gr.Row():
                    with gr.Column(scale=1):
                        o_img = gr.Image(type="filepath", label="Document or photo", elem_id="ocr-image")
                        o_prompt = gr.Textbox(TASKS["ocr"].prompt, label="Prompt", lines=3)
                        with gr.Row():
                            o_run = gr.Button("Read text", variant="primary", elem_id="ocr-run")
                            o_stop = gr.Button("Stop", variant="stop")
                    with gr.Column(scale=2):
                        with gr.Accordion("Thinking", open=False) as o_think_box:
                            o_think = gr.Markdown()
                        with gr.Tab("Rendered"):
                            o_md = gr.Markdown(elem_id="ocr-rendered")
                        with gr.Tab("Raw text"):
                            o_raw = gr.Textbox(lines=14, buttons=["copy"], label="Text", elem_id="ocr-raw")
                        o_stats = gr.Markdown(elem_classes="glmv-stats", elem_id="ocr-stats")
                        o_files = gr.File(label="Download (.md, .txt)", file_count="multiple")
            with gr.Tab("Image → HTML"):
                versions = gr.State([])
                with gr.Row():
                    with gr.Column(scale=1):
                        h_img = gr.Image(type="filepath", label="Screenshot", elem_id="html-image")
                        h_prompt = gr.Textbox(TASKS["html"].prompt, label="Prompt", lines=3)
                        with gr.Row():
                            h_run = gr.Button("Generate page", variant="primary", elem_id="html-run")
                            h_stop = gr.Button("Stop", variant="stop")
                        h_edit = gr.Textbox(label="Change the page", placeholder="make the header dark blue")
                        h_edit_btn = gr.Button("Apply change (new version)")
                        with gr.Row():
                            h_rounds = gr.Slider(1, 5, value=2, step=1, label="Refine rounds")
                            h_refine_btn = gr.Button("Render, compare and refine", elem_id="html-refine")
                        h_versions = gr.Dropdown([], label="Versions", interactive=True, elem_id="html-versions")
                    with gr.Column(scale=2):
                        with gr.Accordion("Thinking", open=False) as h_think_box:
                            h_think = gr.Markdown()
                        h_stats = gr.Markdown(elem_classes="glmv-stats", elem_id="html-stats")
                        h_view = gr.Radio(list(VIEWPORTS), value="desktop", label="Preview width")
                        h_preview = gr.HTML(iframe(None), elem_id="html-preview")
                        h_code = gr.Code(language="html", label="HTML", elem_id="html-code")
                        h_file = gr.File(label="Saved page", elem_id="html-file")
                        h_compare = gr.Gallery(label="Target vs render (with the visual score)", columns=2, height=360,
                                               elem_id="html-compare")
            with gr.Tab("Chat"):
                history = gr.State([])
                c_view = gr.Chatbot(label="Chat", height=520, elem_id="chat")
                c_box = gr.MultimodalTextbox(file_types=["image", "video", ".pdf", ".pptx", ".odp", ".docx"],
                                             file_count="multiple", elem_id="chat-box",
                                             placeholder="Ask about images, PDFs, slides or a video (attach several, any turn)")
                with gr.Row():
                    c_tools = gr.Checkbox(False, label="Tools (zoom into images, render HTML)", elem_id="chat-tools")
                    c_stats = gr.Markdown(elem_classes="glmv-stats", elem_id="chat-stats")
                    c_stop = gr.Button("Stop", variant="stop", scale=0)
                    c_clear = gr.Button("New chat", scale=0)

        # -- wiring ------------------------------------------------------------------------------
        common = [thinking_on, max_new]

        def describe(img, prompt, think, max_tokens, request: gr.Request):
            yield from guarded(app.describe(img, prompt, think, max_tokens, session(request)))

        def ocr(img, prompt, think, max_tokens, request: gr.Request):
            yield from guarded(app.ocr(img, prompt, think, max_tokens, session(request)))

        def html_out(gen):
            for th, code, st, f, prev, vers, choices, chosen in guarded(gen):
                yield th, code, st, f, prev, vers, gr.update(choices=choices, value=chosen)

        def html(img, prompt, think, max_tokens, view, vers, request: gr.Request):
            yield from html_out(app.html(img, prompt, think, max_tokens, view, vers, session(request)))

        def html_edit(img, instruction, think, max_tokens, view, vers, current, request: gr.Request):
            yield from html_out(app.html_edit(img, instruction, think, max_tokens, view, vers, current, session(request)))

        def chat(message, hist, view, show, tools_on, think, max_tokens, request: gr.Request):
            yield from guarded(app.chat(message, hist, view, show, tools_on, think, max_tokens, session(request)))

        def html_refine(img, rounds, think, max_tokens, view, vers, current, request: gr.Request):
            for code, status, f, prev, new_vers, choices, chosen, gallery in guarded(
                    app.html_refine(img, rounds, think, max_tokens, view, vers, current, session(request))):
                yield code, status, f, prev, new_vers, gr.update(choices=choices, value=chosen), gallery

        def stop(request: gr.Request):
            app.stop(session(request))

        def load(ch, path, prec):
            try:
                return app.load(ch, path, prec)
            except GlmvError as exc:
                raise gr.Error(str(exc)) from None

        d_run.click(describe, [d_img, d_prompt, *common], [d_think, d_answer, d_stats], **gpu)
        o_run.click(ocr, [o_img, o_prompt, *common], [o_think, o_md, o_raw, o_stats, o_files], **gpu)
        h_outputs = [h_think, h_code, h_stats, h_file, h_preview, versions, h_versions]
        h_run.click(html, [h_img, h_prompt, *common, h_view, versions], h_outputs, **gpu)
        h_edit_btn.click(html_edit, [h_img, h_edit, *common, h_view, versions, h_versions], h_outputs, **gpu)
        h_versions.change(app.pick_version, [h_versions, versions, h_view, h_img], [h_code, h_file, h_preview, h_compare])
        h_view.change(app.pick_version, [h_versions, versions, h_view, h_img], [h_code, h_file, h_preview, h_compare])
        c_box.submit(chat, [c_box, history, c_view, show_thinking, c_tools, *common], [c_view, history, c_stats, c_box], **gpu)
        h_refine_btn.click(html_refine, [h_img, h_rounds, *common, h_view, versions, h_versions],
                           [h_code, h_stats, h_file, h_preview, versions, h_versions, h_compare], **gpu)
        c_clear.click(lambda: ([], [], ""), None, [c_view, history, c_stats])
        for btn in (d_stop, o_stop, h_stop, c_stop):
            btn.click(stop, None, None, queue=False)
        for box in (d_think_box, o_think_box, h_think_box):
            show_thinking.change(lambda v: gr.update(visible=v), show_thinking, box)

        for comp in (choice, local, precision):
            comp.change(app.estimate, [choice, local, precision], est)
        load_btn.click(load, [choice, local, precision], status)
        timer = gr.Timer(1.0)
        timer.tick(app.manager.status_markdown, None, status)
    demo.queue(default_concurrency_limit=8)
    return demo


def _choice_for(model: str) -> str:
    for label, value in MODEL_CHOICES.items():
        if value == model:
            return label
    return "local folder…"


def _precision_for(quant: str) -> str:
    for label, value in PRECISIONS.items():
        if value == quant:
            return label
    return "bf16"
