"""The ``glmv`` command line: ``ask``, ``ocr`` and ``html`` (and the front ends of later issues).

Flags map explicitly onto :class:`~glmv.settings.Settings` and
:class:`~glmv.settings.SamplingParams`; everything is validated (flags, images, prompt) before the
model is loaded. Errors print ``error: ...`` and exit 2 without a traceback (``--debug`` shows one).
The tutorial's flags (``--model_path``, ``--input``, ``--prompt``, ``--int4``, ``--stream``) keep
working, and ``glmv`` with no arguments does what the tutorial did: describe ``input/image_1.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from . import __version__
from .backends.base import Backend, GenerationRequest, Result, collect
from .errors import GlmvError
from .limits import Budget, add_limit_arguments, limits_from_args
from .outputs import save_html, text_as_page
from .prompts import TASKS, Message, user_message
from .settings import DEFAULT_MAX_NEW_TOKENS, SamplingParams, Settings

DEFAULT_IMAGE = "input/image_1.png"
SUBCOMMANDS = ("ask", "ocr", "html")
LOOPBACK = ("127.0.0.1", "localhost", "::1")

BackendFactory = Callable[[Settings], Backend]


# -- argument parsing ---------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model_path", dest="model", metavar="ID_OR_PATH",
                   help="hub id or local folder (default: $GLMV_MODEL or zai-org/GLM-4.6V-Flash); 'tiny' = tiny random test model")
    g.add_argument("--int4", dest="quant", action="store_const", const="nf4",
                   help="the tutorial's 4-bit: bitsandbytes nf4, double quantization, bf16 compute (needs CUDA)")
    g.add_argument("--quant", choices=["none", "nf4", "w4"], default=None,
                   help="weights: none (bf16), nf4 (= --int4), w4 (glmv's fast 4-bit: int4 with Triton kernels; "
                        "fits a 10 GB card and decodes faster than bf16)")
    g.add_argument("--engine", choices=["auto", "fast", "hf"], default=None,
                   help="decoder: fast (static cache, Triton kernels, CUDA graphs; default on CUDA) or hf (transformers generate)")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default=None,
                   help="weights dtype (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: auto)")


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote backend (any OpenAI-compatible server: vLLM, SGLang, another glmv serve)")
    g.add_argument("--backend", choices=["local", "openai"], default="local", help="where the model runs (default: local)")
    g.add_argument("--base-url", default=None, help="the server's API root, e.g. http://gpu-box:8000/v1")
    g.add_argument("--api-key", default=None, help="API key for --base-url (default: $OPENAI_API_KEY)")
    g.add_argument("--remote-model", default=None, help="model name on the server (default: the first it lists)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they come (default: on when stdout is a terminal)")
    g.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True,
                   help="let the model reason before answering (--no-thinking is faster)")
    g.add_argument("--show-thinking", action="store_true", help="print the model's reasoning, marked, before the answer")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help=f"answer length cap (default {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature, 0..2 (default 0.8; 0 = greedy)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling, (0, 1] (default 0.6)")
    g.add_argument("--top-k", type=int, default=None, help="top-k sampling, >= 0 (default 2)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="(default 1.1)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="scale images down to at most N pixels (fewer visual tokens, faster; default 4000000)")
    g.add_argument("--system", default=None, help="system prompt")
    g.add_argument("--pages", default=None, metavar="RANGE", help="PDF/deck pages, e.g. 1-5,9 (default: all)")
    g.add_argument("--pdf-long-side", type=int, default=1600, metavar="PX",
                   help="render PDF pages with this many pixels on the longer side (default 1600)")
    g.add_argument("--dpi", type=float, default=None, help="render PDF pages at this dpi instead of --pdf-long-side")
    g.add_argument("--json", action="store_true", help="print one JSON object (answer, thinking, usage, timings) instead of text")
    g.add_argument("--tools", action="store_true",
                   help="let the model call tools (crop/zoom into the images, render HTML and look at it)")
    g.add_argument("--max-steps", type=int, default=5, help="at most this many tool rounds (default 5)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmv",
        description="Run the GLM-4.6V vision-language models: describe images, read text, turn screenshots into HTML.",
        epilog="Also: glmv bench (speed against the GPU's bandwidth limit; glmv bench --help). "
               "With no command, glmv describes input/image_1.png like the original tutorial.",
    )
    parser.add_argument("--version", action="version", version=f"glmv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ask = sub.add_parser("ask", help="answer a prompt about zero or more images")
    ask.add_argument("images", nargs="*", metavar="IMAGE", help="path, http(s) URL, data: URI or - for stdin")
    ask.add_argument("-p", "--prompt", default=None, help="what to ask (default: 'describe this image')")

    ocr = sub.add_parser("ocr", help=TASKS["ocr"].help)
    ocr.add_argument("images", nargs="*", metavar="IMAGE")
    ocr.add_argument("-p", "--prompt", default=None, help="override the OCR prompt")

    html = sub.add_parser("html", help=TASKS["html"].help)
    html.add_argument("images", nargs="*", metavar="IMAGE")
    html.add_argument("-p", "--prompt", default=None, help="override the image-to-HTML prompt")
    html.add_argument("--out", default="html_code", help="folder for generated_YYYYMMDD_HHMMSS.html (default: html_code)")
    html.add_argument("--refine", type=int, default=0, metavar="N",
                      help="up to N rounds of: render the page, show it to the model beside the screenshot, correct it "
                           "(stops early when the visual score stops improving)")

    score = sub.add_parser("score", help="visual similarity of a page's render to a target screenshot (JSON)")
    score.add_argument("target", help="the target screenshot (PNG/JPEG)")
    score.add_argument("page", help="the HTML file")
    score.add_argument("--debug", action="store_true", help="show tracebacks")

    for p in (ask, ocr, html):
        p.add_argument("--input", action="append", default=[], metavar="IMAGE", help="an image (tutorial flag; repeatable)")
        _add_model_args(p)
        _add_backend_args(p)
        _add_generation_args(p)
        add_limit_arguments(p)

    batch = sub.add_parser("batch", help="run a task over files, folders, PDFs and decks; resumable")
    batch.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (recursive)")
    batch.add_argument("--task", choices=["ocr", "describe", "html", "ask"], default="ocr")
    batch.add_argument("-p", "--prompt", default=None, help="the prompt (required for --task ask)")
    batch.add_argument("--out", required=True, help="output folder (results, manifest.jsonl)")
    batch.add_argument("--format", choices=["md", "json", "both"], default="md")
    batch.add_argument("--batch-size", type=int, default=4, help="items in flight at once (batched by the engine)")
    batch.add_argument("--retry-failed", action="store_true", help="retry items that failed in an earlier run")
    batch.add_argument("--max-doc-pages", type=int, default=2000,
                       help="a PDF or deck with more pages to read fails with a message (default 2000)")
    _add_model_args(batch)
    _add_backend_args(batch)
    _add_generation_args(batch)

    ui = sub.add_parser("ui", help="the web app (Gradio) on http://127.0.0.1:7860")
    _add_model_args(ui)
    _add_backend_args(ui)
    g = ui.add_argument_group("web app")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=7860)
    g.add_argument("--out", default="html_code", help="folder for generated pages (default: html_code)")
    g.add_argument("--max-pixels", type=int, default=None, metavar="N", help="scale images down to at most N pixels")
    g.add_argument("--debug", action="store_true", help="show tracebacks")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions)")
    _add_model_args(serve)
    g = serve.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $GLMV_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="model name in the API (default: the --model value)")
    g.add_argument("--allowed-media-dir", default=None, metavar="DIR", help="let requests name local image files inside DIR")
    g.add_argument("--allow-remote-media", action="store_true", help="let requests name http(s) image URLs (the server fetches them)")
    g.add_argument("--max-queue", type=int, default=64, help="requests admitted at once; more get 429 (default 64)")
    g.add_argument("--max-batch", type=int, default=8, help="requests batched into one generation (default 8)")
    g.add_argument("--max-pixels", type=int, default=None, metavar="N", help="scale images down to at most N pixels")
    g.add_argument("--max-body-mb", type=int, default=64, help="largest request body accepted; more gets 413 (default 64)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    add_limit_arguments(serve)
    return parser


def _normalize_argv(argv: list[str]) -> list[str]:
    """Bare ``glmv`` and the tutorial's ``glmv --input x --prompt y`` mean ``glmv ask ...``."""
    if not argv:
        return ["ask"]
    if argv[0] in ("-h", "--help", "--version") or not argv[0].startswith("-"):
        return argv
    return ["ask", *argv]


# -- helpers -------------------------------------------------------------------------------------
class Printer:
    """Writes streamed thinking/answer text to stdout, with visible markers around the reasoning."""

    def __init__(self, out: TextIO, err: TextIO, show_thinking: bool) -> None:
        self.out, self.err = out, err
        self.show_thinking = show_thinking
        self.tty = out.isatty()
        self._section: str | None = None
        self._announced_thinking = False

    def _style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.tty else text

    def write(self, part: str, text: str) -> None:
        if part == "thinking":
            if not self.show_thinking:
                if not self._announced_thinking and self.err.isatty():
                    self.err.write("glmv: thinking ...\n")
                    self.err.flush()
                self._announced_thinking = True
                return
            if self._section != "thinking":
                self.out.write(self._style("── thinking ──", "2;36") + "\n")
                self._section = "thinking"
            self.out.write(self._style(text, "2"))
        else:
            if self._section == "thinking":
                self.out.write("\n" + self._style("── answer ──", "2;36") + "\n")
            self._section = "answer"
            self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self._section is not None:
            self.out.write("\n")
            self.out.flush()


def summary_line(result: Result) -> str:
    t, u = result.timings, result.usage
    tps = t.tokens_per_s(u.completion_tokens)
    parts = [
        f"{u.completion_tokens} tokens",
        f"prompt {u.prompt_tokens}",
        f"TTFT {t.ttft_s:.2f} s" if t.ttft_s is not None else "TTFT -",
        f"{tps:.1f} tok/s" if tps is not None else "- tok/s",
        f"total {t.total_s:.2f} s",
    ]
    if result.finish_reason != "stop":
        parts.append(f"finish: {result.finish_reason}")
    return "glmv: " + ", ".join(parts)


def _sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    SamplingParams().merged(**overrides)  # validate now, before anything is loaded
    return overrides


def _default_backend(settings: Settings) -> Backend:
    from .backends.local import LocalBackend

    return LocalBackend(settings).load()


def _remote_backend(args: argparse.Namespace) -> BackendFactory:
    if not args.base_url:
        raise GlmvError("--backend openai needs --base-url (for example http://localhost:8000/v1)")

    def factory(settings: Settings) -> Backend:
        from .backends.remote import RemoteBackend

        key = args.api_key or os.environ.get("OPENAI_API_KEY")
        return RemoteBackend(args.base_url, model=args.remote_model, api_key=key).load()

    return factory


# -- commands ------------------------------------------------------------------------------------
def run_task(
    args: argparse.Namespace,
    backend_factory: BackendFactory,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    task = args.command
    sampling_overrides = _sampling_from_args(args)
    settings = Settings.from_env(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        engine=args.engine,
        max_pixels=args.max_pixels,
        thinking=args.thinking,
    )
    sources = [*args.images, *args.input]
    prompt = args.prompt
    if task == "ask":
        if not sources and prompt is None:
            sources = [DEFAULT_IMAGE]
        if prompt is None:
            prompt = TASKS["describe"].prompt
    else:
        if not sources:
            raise GlmvError(f"glmv {task} needs an image: glmv {task} IMAGE")
        if task == "html" and len(sources) > 1:
            raise GlmvError("glmv html takes one screenshot; run it once per image")
        if prompt is None:
            prompt = TASKS[task].prompt
    if not prompt.strip():
        raise GlmvError("the prompt is empty: say what you want to know (for example -p 'describe this image')")
    if sources.count("-") > 1:
        raise GlmvError("standard input ('-') can be read only once")
    from .documents import RenderOptions, load_all

    # Everything is measured (headers, page counts) and checked against the limits before anything is decoded.
    budget = Budget(limits_from_args(args), separate_prompts=task == "ocr")
    budget.add_text(len(prompt) + len(args.system or ""))
    render = RenderOptions(args.pages, args.pdf_long_side, args.dpi, settings.max_pixels)
    media = load_all(sources, render, budget=budget, allow_remote=settings.allow_remote_media)
    if task == "html":
        from .outputs import ensure_writable_dir

        ensure_writable_dir(Path(args.out))
    # OCR reads one page (or image) per prompt; other tasks put everything in one prompt.
    groups = [[m] for m in media] if task == "ocr" and len(media) > 1 else [media]

    if getattr(args, "backend", "local") == "openai":
        backend_factory = _remote_backend(args)
    backend = backend_factory(settings)
    defaults = getattr(backend, "default_sampling", None) or SamplingParams()
    sampling = defaults.merged(**sampling_overrides)
    stream = args.stream if args.stream is not None else (stdout.isatty() and not args.json)
    if args.json:
        stream = False

    results: list[tuple[Any, Result]] = []
    for group in groups:
        messages: list[Message] = []
        if args.system:
            messages.append(Message("system", [args.system]))
        messages.append(user_message(prompt, group))
        if len(groups) > 1 and not args.json:
            stdout.write(f"\n<!-- {group[0].source} -->\n\n" if results else f"<!-- {group[0].source} -->\n\n")
        trace: list[Any] = []
        if args.tools:
            result, trace = _generate_with_tools(backend, messages, group, sampling, args, stream, stdout, stderr)
        else:
            request = GenerationRequest(messages=messages, sampling=sampling, thinking=args.thinking)
            result = _generate(backend, request, stream, args.show_thinking, stdout, stderr)
        if result is None:
            return 130
        result.trace = [step.to_dict() for step in trace]
        images = [m for m in group if hasattr(m, "original_size")]
        if len(images) == 1:  # grounding boxes in the input file's pixels (boxes are on a 0-1000 scale)
            result.output.with_image_size(*images[0].original_size)
        results.append((group, result))
        if not args.json:
            if not stream:
                printer = Printer(stdout, stderr, args.show_thinking)
                if result.output.thinking:
                    printer.write("thinking", result.output.thinking)
                printer.write("answer", result.output.answer)
                printer.end()
            stderr.write(summary_line(result) + "\n")

    html_path = None
    refine_versions: list[dict[str, Any]] = []
    result = results[-1][1]
    if task == "html":
        page = result.output.html
        if page is None:
            stderr.write("glmv: warning: the answer contained no HTML; saved the answer as text in a page\n")
            page = text_as_page(result.output.answer)
        html_path = save_html(page, Path(args.out))
        if args.refine > 0:
            if result.output.html is None:
                stderr.write("glmv: warning: no HTML to refine\n")
            else:
                from .media import LoadedImage

                target = next(m for m in media if isinstance(m, LoadedImage))
                versions = refine_html(backend, target, page, html_path, args.refine, sampling, args.thinking,
                                       Path(args.out), stderr)
                best = max(versions, key=lambda v: v["score"])
                html_path = Path(best["path"])
                refine_versions = versions
        if not args.json:
            stdout.write(f"{html_path}\n")

    if args.json:
        if len(results) == 1:
            payload = {"model": settings.model, "task": task, **result.to_dict()}
        else:
            pages = [{"source": g[0].source, **r.to_dict()} for g, r in results]
            payload = {"model": settings.model, "task": task, "pages": pages,
                       "answer": "\n\n".join(p["answer"] for p in pages),
                       "usage": {k: sum(p["usage"][k] for p in pages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
        if task == "html":
            payload["html_path"] = str(html_path)
            payload["html_found"] = result.output.html is not None
            if refine_versions:
                payload["versions"] = [{k: v[k] for k in ("version", "path", "score")} for v in refine_versions]
        stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    stdout.flush()
    return 0


def _generate_with_tools(backend: Backend, messages: list[Message], media: list[Any], sampling: SamplingParams,
                         args: argparse.Namespace, stream: bool, stdout: TextIO, stderr: TextIO):
    from .media import LoadedImage
    from .tools import ToolContext, default_registry, run_tool_loop

    if args.max_steps < 1:
        raise GlmvError("--max-steps must be at least 1")
    printer = Printer(stdout, stderr, args.show_thinking) if stream else None

    def on_chunk(chunk: Any) -> None:
        if printer is not None and chunk.type in ("thinking", "answer"):
            printer.write(chunk.type, chunk.text)

    def on_step(step: Any) -> None:
        if printer is not None:
            printer.end()
        stderr.write(f"glmv: {step.line()}\n")
        stderr.flush()

    ctx = ToolContext(images=[m for m in media if isinstance(m, LoadedImage)])
    try:
        result, trace, _ = run_tool_loop(backend, messages, default_registry(), ctx, sampling, thinking=args.thinking,
                                         max_steps=args.max_steps, on_step=on_step, on_chunk=on_chunk)
    except KeyboardInterrupt:
        stderr.write("\nglmv: cancelled\n")
        return None, []
    if printer is not None:
        printer.end()
    return result, trace


def _generate(backend: Backend, request: GenerationRequest, stream: bool, show_thinking: bool, stdout: TextIO,
              stderr: TextIO) -> Result | None:
    """Run one request, printing tokens as they come when streaming; None if interrupted."""
    cancel = threading.Event()
    try:
        chunks = backend.generate(request, cancel)
        if not stream:
            return collect(chunks)
        printer = Printer(stdout, stderr, show_thinking)

        def tee():
            for chunk in chunks:
                if chunk.type in ("thinking", "answer"):
                    printer.write(chunk.type, chunk.text)
                elif chunk.type == "status":
                    stderr.write(f"glmv: {chunk.text}\n")
                yield chunk

        result = collect(tee())
        printer.end()
        return result
    except KeyboardInterrupt:
        cancel.set()
        stderr.write("\nglmv: cancelled\n")
        return None


def run_score(args: argparse.Namespace, stdout: TextIO) -> int:
    from .score import score_page

    page = Path(args.page)
    if not page.is_file():
        raise GlmvError(f"cannot read page '{args.page}': no such file")
    report, _ = score_page(Path(args.target), page.read_text(encoding="utf-8", errors="replace"))
    stdout.write(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    return 0


def refine_html(backend: Backend, target_image: Any, first_html: str, first_path: Path, rounds: int,
                sampling: SamplingParams, thinking: bool, out_dir: Path, stderr: TextIO) -> list[dict[str, Any]]:
    from .refine import refine

    versions = []
    for v in refine(backend, target_image, first_html, first_path, rounds, sampling, thinking, out_dir):
        versions.append(v)
        stderr.write(f"glmv: version {v['version']}: overall {v['score']:.3f} -> {v['path']}\n")
        if v.get("stop"):
            stderr.write(f"glmv: {v['stop']}\n")
    return versions


def run_batch_command(args: argparse.Namespace, backend_factory: BackendFactory, stderr: TextIO) -> int:
    from .batch import Options, default_prompt, run_batch

    overrides = _sampling_from_args(args)
    settings = Settings.from_env(model=args.model, device=args.device, dtype=args.dtype, quant=args.quant,
                                 engine=args.engine, max_pixels=args.max_pixels, thinking=args.thinking)
    if args.batch_size < 1 or args.max_doc_pages < 1:
        raise GlmvError("--batch-size and --max-doc-pages must be at least 1")
    opts = Options(task=args.task, prompt=default_prompt(args.task, args.prompt), out=Path(args.out), fmt=args.format,
                   batch_size=args.batch_size, retry_failed=args.retry_failed, pages=args.pages,
                   long_side=args.pdf_long_side, dpi=args.dpi, max_pixels=settings.max_pixels, thinking=args.thinking,
                   sampling_overrides=overrides, max_doc_pages=args.max_doc_pages)
    if args.backend == "openai":
        backend_factory = _remote_backend(args)

    def factory() -> Backend:
        backend = backend_factory(settings)
        if hasattr(backend, "max_batch"):
            backend.max_batch = max(backend.max_batch, args.batch_size)
        return backend

    return run_batch(args.inputs, opts, factory, stderr)


def run_ui(args: argparse.Namespace, stderr: TextIO) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app talks to nobody but its users
    try:
        from .ui.app import CSS, WebApp, build_ui
        from .ui.manager import ModelManager
    except ImportError:
        raise GlmvError("glmv ui needs gradio: pip install 'glmv[ui]'") from None
    settings = Settings.from_env(model=args.model, device=args.device, dtype=args.dtype, quant=args.quant,
                                 engine=args.engine, max_pixels=args.max_pixels)
    from .outputs import ensure_writable_dir

    out = ensure_writable_dir(Path(args.out))
    remote = _remote_backend(args) if args.backend == "openai" else None

    def factory(s: Settings, log: Callable[[str], None]) -> Backend:
        if remote is not None:
            return remote(s)
        from .backends.local import LocalBackend

        def both(line: str) -> None:
            log(line)
            stderr.write(f"glmv: {line}\n")

        return LocalBackend(s, log=both).load()

    manager = ModelManager(settings, factory)
    manager.load_async()
    app = WebApp(manager, out, max_pixels=settings.max_pixels)
    demo = build_ui(app)
    stderr.write(f"glmv: web app on http://{args.host}:{args.port} (the model loads in the background)\n")
    stderr.flush()

    def report() -> None:
        manager.wait()
        if manager.state == "error":
            stderr.write(f"glmv: error: {manager.message}\n")
            stderr.flush()

    threading.Thread(target=report, daemon=True).start()
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=True, quiet=True,
                    allowed_paths=[str(out.resolve())], css=CSS)
    finally:
        manager.close()
    return 0


def run_serve(args: argparse.Namespace, backend_factory: BackendFactory, stderr: TextIO) -> int:
    try:
        import uvicorn

        from .server.app import ServerConfig, build_app
    except ImportError:
        raise GlmvError("glmv serve needs fastapi and uvicorn: pip install 'glmv[server]'") from None
    settings = Settings.from_env(model=args.model, device=args.device, dtype=args.dtype, quant=args.quant,
                                 engine=args.engine, max_pixels=args.max_pixels)
    api_key = args.api_key or os.environ.get("GLMV_API_KEY")
    media_dir = None
    if args.allowed_media_dir:
        media_dir = Path(args.allowed_media_dir).expanduser()
        if not media_dir.is_dir():
            raise GlmvError(f"--allowed-media-dir '{args.allowed_media_dir}' is not a folder")
    if args.max_queue < 1 or args.max_batch < 1 or args.max_body_mb < 1:
        raise GlmvError("--max-queue, --max-batch and --max-body-mb must be at least 1")
    if args.host not in LOOPBACK and not api_key:
        stderr.write(f"glmv: warning: listening on {args.host} without --api-key: anyone who can reach this "
                     f"address can use the model\n")
    backend = backend_factory(settings)
    if hasattr(backend, "max_batch"):
        backend.max_batch = args.max_batch
    config = ServerConfig(model_name=args.served_model_name or settings.model, api_key=api_key,
                          allowed_media_dir=media_dir, allow_remote_media=args.allow_remote_media,
                          max_queue=args.max_queue, max_pixels=settings.max_pixels,
                          max_body_bytes=args.max_body_mb * 2**20, limits=limits_from_args(args))
    app = build_app(backend, config)
    stderr.write(f"glmv: serving {config.model_name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)\n")
    stderr.flush()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        backend.close()
    return 0


def main(
    argv: Sequence[str] | None = None,
    *,
    backend_factory: BackendFactory | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    argv = _normalize_argv(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or bool(os.environ.get("GLMV_DEBUG"))
    try:
        if args.command in SUBCOMMANDS:
            return run_task(args, backend_factory or _default_backend, stdout, stderr)
        if args.command == "serve":
            return run_serve(args, backend_factory or _default_backend, stderr)
        if args.command == "ui":
            return run_ui(args, stderr)
        if args.command == "score":
            return run_score(args, stdout)
        if args.command == "batch":
            return run_batch_command(args, backend_factory or _default_backend, stderr)
        parser.print_help(stdout)
        return 0
    except GlmvError as exc:
        if debug:
            raise
        stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        stderr.write("\nglmv: interrupted\n")
        return 130
    except Exception as exc:  # a bug, not a user error: say so briefly
        if debug:
            raise
        stderr.write(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)\n")
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
