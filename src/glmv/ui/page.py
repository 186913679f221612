"""``glmv ui``'s page: the Gradio layout and wiring over :class:`~glmv.ui.app.WebApp`.

:func:`build_ui` lays out the header, the model panel and the Describe/Find, OCR, Image → HTML and Chat
tabs, and maps each handler's values onto components. Errors never replace what is on the page: they go
to the tab's status line (a ``gr.Error`` would cover the chat and the input box with a red badge).
:func:`serve_ui` starts it with the page's CSS and script (the preview's fit-to-width) and the folders the
page may serve.
"""

from __future__ import annotations

import copy
import functools
import os
import secrets
import types
from pathlib import Path
from typing import Any, Iterator

from ..errors import GlmvError
from ..privacy import private_dir
from ..prompts import TASKS
from ..settings import DEFAULT_MAX_NEW_TOKENS, SAMPLING_BOUNDS, SamplingParams
from .app import (LEFT_QUEUE, MODEL_CHOICES, PRECISIONS, VIEWPORTS, ZOOMS, Knobs, WebApp, iframe,
                  messages_from_view)
from .store import new_id

CSS = """
.glmv-stats {font-size: 0.9em; color: #555}
.glmv-stats p {margin: 0}
.glmv-preview-empty {padding: 1em; color: #888}
footer {display: none !important}
@media (max-width: 640px) {
  .glmv-settings .form {flex-wrap: wrap !important}
}
"""

# Fit-to-width for previews: the page is laid out at its viewport width and scaled to the box; only the
# browser knows the box's width, so this runs there. It rescales whenever the page changes or resizes.
HEAD = """
<script>
(() => {
  function fit() {
    document.querySelectorAll('.glmv-preview-box[data-zoom="fit"]').forEach((box) => {
      const frame = box.querySelector('iframe');
      if (!frame || !box.clientWidth) return;
      const s = Math.min(1, box.clientWidth / Number(box.dataset.width));
      frame.style.transform = `scale(${s})`;
      box.style.height = Math.ceil(Number(box.dataset.height) * s) + 'px';
      box.style.overflow = 'hidden';
      box.dataset.scale = s.toFixed(4);
    });
  }
  new MutationObserver(fit).observe(document.documentElement, {childList: true, subtree: true});
  window.addEventListener('resize', fit);
})();
</script>
"""


def _safe_image(component: Any) -> Any:
    """Let a file that is not an image through to the handler, which names it and says what is wrong.

    Gradio's Image opens uploads with PIL before any handler runs and answers a text file renamed
    ``.png`` with its internals (``Could not preprocess input component…``)."""
    original = component.preprocess

    def preprocess(self: Any, payload: Any) -> Any:
        try:
            return original(payload)
        except Exception:
            return getattr(payload, "path", None)

    component.preprocess = types.MethodType(preprocess, component)
    return component


def _task_controls(name: str, task: str, run_label: str, image: Any, examples: Any) -> tuple[Any, Any, Any]:
    """Under a tab's image: the task's prompt (Enter runs), Run and Stop, and the examples (Describe and OCR).

    Element ids are ``{name}-prompt``, ``{name}-run``, ``{name}-stop`` and ``{name}-examples``."""
    import gradio as gr

    prompt = gr.Textbox(TASKS[task].prompt, label="Prompt", lines=1, max_lines=6, elem_id=f"{name}-prompt",
                        info="Enter runs")
    with gr.Row():
        run = gr.Button(run_label, variant="primary", elem_id=f"{name}-run")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{name}-stop")
    if examples:
        gr.Examples(examples, [image], label="Examples", elem_id=f"{name}-examples")
    return prompt, run, stop


def sampling_slider(name: str, label: str, defaults: SamplingParams, info: str) -> Any:
    """A slider over the range :data:`~glmv.settings.SAMPLING_BOUNDS` allows (what the server and the CLI accept
    too), starting at the loaded model's default."""
    import gradio as gr

    bound = SAMPLING_BOUNDS[name]
    lo, hi = bound.slider
    return gr.Slider(lo, hi, value=getattr(defaults, name), step=bound.step, label=label, info=info,
                     elem_id=name.replace("_", "-"), min_width=200)


def _thinking_box(name: str) -> tuple[Any, Any]:
    """The closed, hidden "Thinking" accordion (``{name}-think-box``) and the Markdown inside it."""
    import gradio as gr

    with gr.Accordion("Thinking", open=False, visible=False, elem_id=f"{name}-think-box") as box:
        text = gr.Markdown()
    return box, text


def browser_secret(folder: Path) -> str:
    """A secret kept in the cache folder: the browser's id stays readable after a server restart."""
    path = Path(folder) / "browser.secret"
    if not path.exists():
        path.write_text(secrets.token_hex(16))
    return path.read_text().strip()


def _errors_to(n: int, at: int, gen: Iterator[Any]) -> Iterator[Any]:
    """Run a handler; on a core error leave all ``n`` outputs as they are and put the message at ``at``."""
    import gradio as gr

    try:
        yield from gen
    except GlmvError as exc:
        out = [gr.skip()] * n
        out[at] = f"✕ {exc}"
        yield out
    except Exception as exc:  # out of memory and friends: say it, keep serving
        out = [gr.skip()] * n
        out[at] = f"✕ {type(exc).__name__}: {exc}"
        yield out


def guard(handler: Any, n: int, at: int) -> Any:
    """``handler`` with its errors sent to output ``at`` of ``n`` (same signature, so Gradio still passes
    the request to handlers that ask for it)."""

    @functools.wraps(handler)
    def guarded(*args: Any, **kwargs: Any) -> Iterator[Any]:
        yield from _errors_to(n, at, handler(*args, **kwargs))

    return guarded


def build_ui(app: WebApp) -> Any:
    import gradio as gr

    # Gradio finds the handlers' `request: gr.Request` through typing.get_type_hints, which resolves the
    # (postponed, string) annotations in this module's globals: gradio is imported here, not at import time.
    globals().setdefault("gr", gr)

    store = app.store

    def session(request: Any) -> str:
        return getattr(request, "session_hash", None) or "default"

    def kept(path: str | None) -> str | None:
        return store.keep(path) if store is not None else path

    examples = [[str(p)] for p in app.examples]

    with gr.Blocks(title="glmv · GLM-4.6V") as demo:
        header = gr.Markdown("## glmv", elem_id="glmv-header")
        status = gr.Markdown("", elem_id="glmv-status")
        with gr.Accordion("Model", open=False, elem_id="model-panel") as model_panel:
            with gr.Row():
                choice = gr.Dropdown(list(MODEL_CHOICES), value=_choice_for(app.manager.settings.model), label="Model",
                                     elem_id="model-choice")
                local = gr.Textbox(label="Local folder", placeholder="/path/to/checkpoint", elem_id="model-folder",
                                   value="" if _choice_for(app.manager.settings.model) != "local folder…" else app.manager.settings.model)
                precision = gr.Radio(list(PRECISIONS), value=_precision_for(app.manager.settings.quant), label="Precision",
                                     elem_id="model-precision")
            est = gr.Markdown(app.estimate(_choice_for(app.manager.settings.model), app.manager.settings.model,
                                           _precision_for(app.manager.settings.quant)), elem_id="model-estimate")
            load_btn = gr.Button("Load model", variant="secondary", elem_id="model-load")
            load_msg = gr.Markdown("", elem_id="model-msg")
        with gr.Row(elem_classes="glmv-settings"):
            show_thinking = gr.Checkbox(True, label="Show thinking", min_width=170)
            thinking_on = gr.Checkbox(True, label="Think first (off: faster)", min_width=170)
            max_new = gr.Slider(16, DEFAULT_MAX_NEW_TOKENS, value=2048, step=16, label="Max new tokens",
                                elem_id="max-new", min_width=300)
            defaults = app.default_sampling()
            temperature = sampling_slider("temperature", "Temperature", defaults,
                                          "0 = greedy; starts at the model's default")
            top_p = sampling_slider("top_p", "Top-p", defaults, "nucleus sampling; starts at the model's default")
            sampling_seen = gr.State([defaults.temperature, defaults.top_p])
        browser = (gr.BrowserState("", storage_key="glmv-browser", secret=browser_secret(store.folder))
                   if store is not None else gr.State(""))
        seen_failures = gr.State(0)

        with gr.Tabs():
            with gr.Tab("Describe"):
                with gr.Row():
                    with gr.Column(scale=1):
                        d_img = _safe_image(gr.Image(type="filepath", label="Image", elem_id="describe-image"))
                        d_mode = gr.Radio(["Describe", "Find"], value="Describe", label="Mode", elem_id="describe-mode",
                                          info="Find draws boxes around what you name")
                        d_prompt, d_run, d_stop = _task_controls("describe", "describe", "Run", d_img, examples)
                    with gr.Column(scale=2):
                        d_think_box, d_think = _thinking_box("describe")
                        d_answer = gr.Markdown(elem_id="describe-answer")
                        d_stats = gr.Markdown(elem_classes="glmv-stats", elem_id="describe-stats")
                        d_found = gr.Image(label="Found", visible=False, type="filepath", interactive=False,
                                           elem_id="describe-found")
                        d_files = gr.File(label="Download (PNG with boxes, JSON)", file_count="multiple",
                                          visible=False, elem_id="describe-files")
            with gr.Tab("OCR"):
                with gr.Row():
                    with gr.Column(scale=1):
                        o_img = _safe_image(gr.Image(type="filepath", label="Document or photo", elem_id="ocr-image"))
                        o_prompt, o_run, o_stop = _task_controls("ocr", "ocr", "Read text", o_img, examples)
                    with gr.Column(scale=2):
                        o_think_box, o_think = _thinking_box("ocr")
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
                        h_img = _safe_image(gr.Image(type="filepath", label="Screenshot", elem_id="html-image"))
                        h_prompt = gr.Textbox(TASKS["html"].prompt, label="Prompt", lines=2, max_lines=6,
                                              elem_id="html-prompt")
                        with gr.Row():
                            h_run = gr.Button("Generate page", variant="primary", elem_id="html-run")
                            h_stop = gr.Button("Stop", variant="stop", elem_id="html-stop")
                        if examples:
                            gr.Examples(examples, [h_img], label="Examples", elem_id="html-examples")
                        h_edit = gr.Textbox(label="Change the page", placeholder="make the header dark blue",
                                            elem_id="html-edit")
                        h_edit_btn = gr.Button("Apply change (new version)", elem_id="html-edit-run")
                        with gr.Row():
                            h_rounds = gr.Slider(1, 5, value=2, step=1, label="Refine rounds", elem_id="html-rounds")
                            h_refine_btn = gr.Button("Render, compare and refine", elem_id="html-refine")
                        h_versions = gr.Dropdown([], label="Versions", interactive=True, elem_id="html-versions")
                    with gr.Column(scale=2):
                        h_think_box, h_think = _thinking_box("html")
                        h_stats = gr.Markdown(elem_classes="glmv-stats", elem_id="html-stats")
                        with gr.Row():
                            h_view = gr.Radio(list(VIEWPORTS), value="desktop", label="Preview width", elem_id="html-view")
                            h_zoom = gr.Radio(list(ZOOMS), value="fit width", label="Zoom", elem_id="html-zoom")
                        h_preview = gr.HTML(iframe(None), elem_id="html-preview")
                        h_saved = gr.Markdown("", elem_classes="glmv-stats", elem_id="html-saved")
                        h_file = gr.File(label="Download this version", elem_id="html-file")
                        h_compare = gr.ImageSlider(label="Target ↔ render (drag the divider)", type="filepath",
                                                   elem_id="html-compare", max_height=600)
                        h_scores = gr.Markdown("", elem_id="html-scores")
                        h_code = gr.Code(language="html", label="HTML", elem_id="html-code")
            with gr.Tab("Chat"):
                history = gr.State([])
                chat_id = gr.State("")
                with gr.Row():
                    c_saved = gr.Dropdown([], label="Saved chats", interactive=True, elem_id="chat-saved", scale=3)
                    c_delete = gr.Button("Delete chat", scale=0, elem_id="chat-delete")
                    c_clear = gr.Button("New chat", scale=0, elem_id="chat-new")
                c_view = gr.Chatbot(label="Chat", height=520, elem_id="chat")
                c_box = gr.MultimodalTextbox(file_types=["image", "video", ".pdf", ".pptx", ".odp", ".docx"],
                                             file_count="multiple", elem_id="chat-box", label="Message",
                                             placeholder="Ask about images, PDFs, slides or a video (attach several, any turn)")
                if app.examples:
                    gr.Examples([[{"text": "What is in this picture?", "files": [str(app.examples[0])]}]]
                                + [[{"text": "Read the text in this image.", "files": [str(p)]}] for p in app.examples[1:2]],
                                [c_box], label="Examples", elem_id="chat-examples")
                with gr.Row():
                    c_tools = gr.Checkbox(False, label="Tools (zoom into images, render HTML)", elem_id="chat-tools")
                    c_find = gr.Checkbox(False, label="Find (draw boxes on the latest image)", elem_id="chat-find")
                    c_stats = gr.Markdown(elem_classes="glmv-stats", elem_id="chat-stats")
                    c_stop = gr.Button("Stop", variant="stop", scale=0, elem_id="chat-stop")

        # -- wiring ------------------------------------------------------------------------------
        common = [thinking_on, max_new, temperature, top_p]
        run_opts: dict[str, Any] = {"concurrency_limit": None}  # the line in front of the model is app.slots

        def think_box(show: bool, text: str) -> Any:
            return gr.update(visible=bool(show and text))

        def describe(img, mode, prompt, show, think, max_tokens, temp, top, request: gr.Request):
            knobs = Knobs(max_tokens, temp, top)
            if mode == "Find":
                gen = app.find(img, prompt, think, knobs, session(request))
            else:
                gen = ((*out, None, None) for out in app.describe(img, prompt, think, knobs, session(request)))
            for th, answer, st, png, files in gen:
                yield (think_box(show, th), th, answer, st, gr.update(value=png, visible=png is not None),
                       gr.update(value=files, visible=bool(files)))

        def describe_mode(mode, current):
            """Relabel the prompt box; swap the text only while it is the other mode's untouched default."""
            if mode == "Find":
                keep = current if (current or "").strip() != TASKS["describe"].prompt else ""
                return gr.update(label="What to find", value=keep, placeholder="the red house")
            return gr.update(label="Prompt", value=current if (current or "").strip() else TASKS["describe"].prompt,
                             placeholder=None)

        def ocr(img, prompt, show, think, max_tokens, temp, top, request: gr.Request):
            for th, md, raw, st, files in app.ocr(img, prompt, think, Knobs(max_tokens, temp, top), session(request)):
                yield think_box(show, th), th, md, raw, st, files

        h_outputs = [h_think_box, h_think, h_code, h_stats, h_file, h_saved, h_preview, versions, h_versions]

        def save_studio(bid, img, vers, saved):
            """Store the versions before the page shows them: a reload right after the result (the generator
            is closed at its yield) must not lose them. Returns what is now stored."""
            if store is not None and bid and vers and vers != saved:
                store.save_studio(bid, kept(img), [dict(v, render=kept(v.get("render"))) if v.get("render") else v
                                                   for v in vers])
                return copy.deepcopy(vers)
            return saved

        def html_out(gen, show, img, bid):
            saved = None
            for th, code, st, path, prev, vers, choices, chosen in gen:
                saved = save_studio(bid, img, vers, saved)
                yield (think_box(show, th), th, code, st, path, f"Saved to `{path}`" if path else gr.skip(), prev,
                       vers, gr.update(choices=choices, value=chosen))

        def html(img, prompt, show, think, max_tokens, temp, top, view, zoom, vers, bid, request: gr.Request):
            knobs = Knobs(max_tokens, temp, top)
            yield from html_out(app.html(img, prompt, think, knobs, view, vers, session(request), zoom), show, img, bid)

        def html_edit(img, instruction, show, think, max_tokens, temp, top, view, zoom, vers, current, bid,
                      request: gr.Request):
            knobs = Knobs(max_tokens, temp, top)
            yield from html_out(app.html_edit(img, instruction, think, knobs, view, vers, current,
                                              session(request), zoom), show, img, bid)

        def html_refine(img, rounds, think, max_tokens, temp, top, view, zoom, vers, current, bid, request: gr.Request):
            saved = None
            for code, st, path, prev, new_vers, choices, chosen, pair, table in app.html_refine(
                    img, rounds, think, Knobs(max_tokens, temp, top), view, vers, current, session(request), zoom):
                if code is None:  # progress: only the status line changes
                    yield (gr.skip(), st, *[gr.skip()] * 7)
                    continue
                saved = save_studio(bid, img, new_vers, saved)
                yield (code, st, path, f"Saved to `{path}`", prev, new_vers, gr.update(choices=choices, value=chosen),
                       pair, table)

        def pick(label, vers, view, img, zoom):
            code, path, prev, pair, table = app.pick_version(label, vers, view, img, zoom)
            return code, path, f"Saved to `{path}`" if path else "", prev, pair, table

        def saved_chats(bid: str, current: str | None = None) -> Any:
            chats = store.chats(bid) if store is not None and bid else []
            return gr.update(choices=[(title, cid) for cid, title, _ in chats], value=current)

        def chat(message, hist, view, cid, show, tools_on, find_on, think, max_tokens, temp, top, bid,
                 request: gr.Request):
            last = None
            knobs = Knobs(max_tokens, temp, top)
            # Each update is shown one step late, so the last one (the final status) leaves only after the chat
            # is stored: a reload right after the answer (the generator closed at its yield) keeps it.
            for item in app.chat(message, hist, view, show, tools_on, think, knobs, session(request), find=find_on):
                if last is not None:
                    yield (*last, gr.skip(), gr.skip())
                last = item
            if last is None:
                return
            if store is None or not bid or last[2] == LEFT_QUEUE:
                yield (*last, gr.skip(), gr.skip())
                return
            new_view = [dict(e, content={"path": kept(e["content"]["path"])}) if isinstance(e.get("content"), dict)
                        else e for e in last[0]]
            cid = cid or new_id()
            title = next((e["content"] for e in new_view if e["role"] == "user" and isinstance(e["content"], str)), "chat")
            store.save_chat(bid, cid, title, new_view)
            yield (new_view, last[1], last[2], gr.skip(), cid, saved_chats(bid, cid))

        def open_chat(cid, bid):
            found = store.chat(bid, cid) if store is not None and cid and bid else None
            if found is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return found, messages_from_view(found, app.max_pixels), cid, ""

        def delete_chat(cid, bid):
            if store is not None and cid and bid:
                store.delete_chat(bid, cid)
            return [], [], "", "", saved_chats(bid)

        def new_chat():
            return [], [], "", "", gr.update(value=None)

        def stop(request: gr.Request):
            app.stop(session(request))

        def load(ch, path, prec):
            return app.load(ch, path, prec)

        def tick(seen):
            m = app.manager
            opened = gr.update(open=True) if m.failures != seen else gr.skip()
            return m.status_markdown(), m.header(), opened, m.failures

        def sampling_tick(seen):
            """A model loaded (or swapped) since this page showed the sliders: start them at its defaults."""
            d = app.default_sampling()
            if [d.temperature, d.top_p] == seen:
                return gr.skip(), gr.skip(), gr.skip()
            return d.temperature, d.top_p, [d.temperature, d.top_p]

        def on_load(bid, request: gr.Request):
            """Fill the status at once (no stale text from when the page was built) and restore this
            browser's latest chat and studio versions."""
            m = app.manager
            bid = bid or new_id()
            chat_out: list[Any] = [saved_chats(bid), gr.skip(), gr.skip(), gr.skip()]
            if store is not None:
                chats = store.chats(bid)
                if chats:
                    found = store.chat(bid, chats[0][0])
                    if found is not None:
                        chat_out = [saved_chats(bid, chats[0][0]), found, messages_from_view(found, app.max_pixels),
                                    chats[0][0]]
            studio: list[Any] = [gr.skip()] * 7
            image, vers = store.studio(bid) if store is not None else (None, [])
            if vers:
                v = vers[-1]
                studio = [vers, gr.update(choices=[x["label"] for x in vers], value=v["label"]), image, v["code"],
                          iframe(v["code"]), v["path"], f"Saved to `{v['path']}`"]
            panel = gr.update(open=True) if m.state == "error" else gr.skip()
            return (bid, m.status_markdown(), m.header(), panel, m.failures, *chat_out, *studio)

        d_inputs = [d_img, d_mode, d_prompt, show_thinking, *common]
        d_outputs = [d_think_box, d_think, d_answer, d_stats, d_found, d_files]
        for trigger in (d_run.click, d_prompt.submit):
            trigger(guard(describe, 6, 3),
                    d_inputs, d_outputs, **run_opts)
        d_mode.change(describe_mode, [d_mode, d_prompt], d_prompt)
        o_outputs = [o_think_box, o_think, o_md, o_raw, o_stats, o_files]
        for trigger in (o_run.click, o_prompt.submit):
            trigger(guard(ocr, 6, 4),
                    [o_img, o_prompt, show_thinking, *common], o_outputs, **run_opts)
        h_run.click(guard(html, 9, 3),
                    [h_img, h_prompt, show_thinking, *common, h_view, h_zoom, versions, browser], h_outputs, **run_opts)
        h_edit_btn.click(guard(html_edit, 9, 3),
                         [h_img, h_edit, show_thinking, *common, h_view, h_zoom, versions, h_versions, browser],
                         h_outputs, **run_opts)
        h_refine_btn.click(guard(html_refine, 9, 1),
                           [h_img, h_rounds, *common, h_view, h_zoom, versions, h_versions, browser],
                           [h_code, h_stats, h_file, h_saved, h_preview, versions, h_versions, h_compare, h_scores],
                           **run_opts)
        pick_outputs = [h_code, h_file, h_saved, h_preview, h_compare, h_scores]
        for comp in (h_versions, h_view, h_zoom):
            comp.change(pick, [h_versions, versions, h_view, h_img, h_zoom], pick_outputs)
        c_outputs = [c_view, history, c_stats, c_box, chat_id, c_saved]
        turn = c_box.submit(guard(chat, 6, 2),
                            [c_box, history, c_view, chat_id, show_thinking, c_tools, c_find, *common, browser],
                            c_outputs, **run_opts)
        # Opening a saved chat, New chat, the trash icon and Delete end a turn in progress: left running, it
        # would stream back over the chat now shown, restore the old history and save (or resurrect) its chat.
        c_saved.input(None, None, None, cancels=[turn], queue=False).then(
            open_chat, [c_saved, browser], [c_view, history, chat_id, c_stats])
        # (Cancelled first, then emptied: the other way round, an update already on its way lands after.)
        # Closing the turn's generator also stops the model, as Stop does.
        c_delete.click(None, None, None, cancels=[turn], queue=False).then(
            delete_chat, [chat_id, browser], [c_view, history, chat_id, c_stats, c_saved])
        for clear in (c_clear.click, c_view.clear):  # the trash icon forgets the model-side history too
            clear(None, None, None, cancels=[turn], queue=False).then(
                new_chat, None, [c_view, history, chat_id, c_stats, c_saved])
        for btn in (d_stop, o_stop, h_stop, c_stop):
            btn.click(stop, None, None, queue=False)
        for box, thought in ((d_think_box, d_think), (o_think_box, o_think), (h_think_box, h_think)):
            show_thinking.change(think_box, [show_thinking, thought], box, queue=False)

        for comp in (choice, local, precision):
            comp.change(app.estimate, [choice, local, precision], est)
        load_btn.click(load, [choice, local, precision], [status, load_msg])
        demo.load(on_load, [browser],
                  [browser, status, header, model_panel, seen_failures, c_saved, c_view, history, chat_id,
                   versions, h_versions, h_img, h_code, h_preview, h_file, h_saved])
        timer = gr.Timer(1.0)
        timer.tick(tick, seen_failures, [status, header, model_panel, seen_failures], queue=False)
        timer.tick(sampling_tick, sampling_seen, [temperature, top_p, sampling_seen], queue=False)
    demo.queue(default_concurrency_limit=None)
    return demo


class FileGuard:
    """ASGI middleware over Gradio's ``/file=`` route.

    The pages folder and the kept uploads must be in ``allowed_paths`` so handlers may hand their files to
    components (Gradio then serves a copy from its cache, under a salted hash no other browser can guess).
    But Gradio also serves allowed folders directly, inline, by path: anyone reaching the port could read
    another user's ``generated_YYYYMMDD_HHMMSS.html`` and open it as a page of the app's own origin, where
    its scripts could read the browser id in localStorage. So those folders answer 403 here, and every file
    response is marked ``Content-Security-Policy: sandbox`` (an opened file runs in an opaque origin)."""

    def __init__(self, app: Any, private: list[str], public: list[str] = ()) -> None:
        self.app = app
        self.private = [os.path.realpath(p) for p in private]
        self.public = [os.path.realpath(p) for p in public]  # Gradio's cache, even inside a private folder

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or "/file=" not in scope["path"]:
            await self.app(scope, receive, send)
            return
        target = os.path.realpath(scope["path"].split("/file=", 1)[1])

        def inside(folders: list[str]) -> bool:
            return any(target == p or target.startswith(p + os.sep) for p in folders)

        if inside(self.private) and not inside(self.public):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"File not allowed."})
            return

        async def sandboxed(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"content-security-policy", b"sandbox"),
                                      (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, sandboxed)


def serve_ui(app: WebApp, demo: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Start the page; with ``block=False`` return at once (tests, scripts) and stop it with ``demo.close()``."""
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    # Gradio keeps every upload (users' images and documents) in its cache folder, /tmp/gradio by default,
    # made with the umask's mode: another local user could list and read them. Private like the store.
    private_dir(Path(get_upload_folder()))
    allowed = [str(app.html_dir.resolve())]
    if app.store is not None:
        allowed.append(str(app.store.media.resolve()))
    return demo.launch(server_name=host, server_port=port, show_error=True, quiet=True, allowed_paths=allowed,
                       css=CSS, head=HEAD, prevent_thread_lock=not block, footer_links=[],
                       app_kwargs={"middleware": [Middleware(FileGuard, private=allowed,
                                                             public=[get_upload_folder()])]})


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


__all__ = ["CSS", "HEAD", "build_ui", "serve_ui"]
