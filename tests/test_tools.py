"""The tool loop with real tools (crop, Chromium render_html), bad calls, the visual score and --refine."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import threading

import pytest

from conftest import REPO, glmv_in_process
from glmv.cli import main
from glmv.media import load_image
from glmv.prompts import user_message
from glmv.settings import SamplingParams
from glmv.testing.scripted import ScriptedBackend
from glmv.tasks import run_tool_loop
from glmv.tools import Tool, ToolContext, ToolRegistry, default_registry

needs_browser = pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
needs_ocr = pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract-ocr is not installed")

PAGE = """<!DOCTYPE html><html><head><style>
body{font-family:sans-serif;margin:0} header{background:#1c2a4a;color:#fff;padding:20px 40px;font-size:28px}
.hero{background:#4078c8;color:#fff;padding:60px 80px} .hero h1{font-size:48px;margin:0} .hero p{font-size:22px}
.cards{display:flex;gap:30px;padding:40px 80px} .card{border:1px solid #ddd;border-radius:12px;padding:20px;width:300px}
</style></head><body><header>Skyline Travel</header>
<div class="hero"><h1>Find your next adventure</h1><p>Flights, hotels and tours in 140 countries.</p></div>
<div class="cards"><div class="card"><h2>Lisbon</h2><p>from 129 EUR</p></div><div class="card"><h2>Kyoto</h2>
<p>from 689 EUR</p></div><div class="card"><h2>Reykjavik</h2><p>from 249 EUR</p></div></div></body></html>"""
CHANGED = PAGE.replace("#4078c8", "#c84040").replace("Kyoto", "Osaka").replace("padding:60px 80px", "padding:90px 80px")
OTHER = """<!DOCTYPE html><html><body style="font-family:serif;background:#fafaf0"><h3 style="text-align:right;color:#070">
Quarterly numbers</h3><table border=1 style="margin:200px auto"><tr><td>Apples</td><td>12</td></tr></table></body></html>"""


def call(name: str, **args) -> str:
    body = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
                   for k, v in args.items())
    return f"<tool_call>{name}\n{body}</tool_call>"


def cli(args, backend):
    out, err = io.StringIO(), io.StringIO()
    code = main(args, backend_factory=lambda s: backend, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_crop_round_trip_through_the_cli():
    def script(req):
        if req.messages[-1].role == "tool":
            return "<think>Readable now.</think>The sign says OPEN."
        return "<think>Too small.</think>Zooming in." + call("crop", box=[600, 300, 900, 600])

    backend = ScriptedBackend(script)
    code, out, err = cli(["ask", str(REPO / "input" / "image_1.png"), "-p", "what does it say?", "--tools", "--json"], backend)
    assert code == 0, err
    data = json.loads(out)
    assert data["answer"] == "The sign says OPEN."
    (step,) = data["trace"]
    assert step["tool"] == "crop" and step["error"] is None and step["images"][0][0] == 1024
    assert "⚙ crop" in err  # every step is visible
    first, last = backend.requests
    assert [t["function"]["name"] for t in first.tools] == ["crop", "render_html"]
    assert [m.role for m in last.messages] == ["user", "assistant", "tool"]
    assert last.messages[1].tool_calls[0].arguments == {"box": [600, 300, 900, 600]}
    crop = last.messages[2].images[0]
    assert crop.size == (1024, 683)  # 300x300 on the 0-1000 scale of a 1024x683 image, enlarged


@pytest.mark.parametrize("bad,message", [
    (call("zoom", box=[0, 0, 10, 10]), "unknown tool 'zoom'"),
    (call("crop", box="[1, 2"), "box' must be a array"),
    (call("crop", box=[100, 100, 1200, 300]), "outside the image"),
    (call("crop", box=[300, 100, 200, 300]), "outside the image or empty"),
    (call("crop", image=5, box=[0, 0, 10, 10]), "out of range"),
    (call("crop"), "missing argument 'box'"),
    (call("crop", box=[0, 0, 10, 10], colour="red"), "unknown argument 'colour'"),
])
def test_bad_tool_calls_are_fed_back_not_crashes(bad, message):
    def script(req):
        if req.messages[-1].role == "tool":
            return "I could not use the tool."
        return bad

    backend = ScriptedBackend(script)
    ctx = ToolContext(images=[load_image(REPO / "input" / "image_1.png")])
    result, trace, messages = run_tool_loop(backend, [user_message("x", ctx.images)], default_registry(), ctx,
                                            SamplingParams(), max_steps=3)
    assert result.output.answer == "I could not use the tool."
    assert trace[0].error is not None and message in trace[0].error
    assert messages[-1].role == "tool" and messages[-1].text.startswith("error:")


def test_max_steps_ends_the_loop_without_tools():
    backend = ScriptedBackend(lambda req: call("crop", box=[0, 0, 500, 500]) if req.tools else "Final answer.")
    ctx = ToolContext(images=[load_image(REPO / "input" / "image_1.png")])
    result, trace, _ = run_tool_loop(backend, [user_message("x", ctx.images)], default_registry(), ctx, SamplingParams(),
                                     max_steps=2)
    assert len(trace) == 2 and result.output.answer == "Final answer."
    assert backend.requests[-1].tools is None


def test_custom_tools_and_tool_exceptions():
    def weather(args, ctx):
        if args["city"] == "Atlantis":
            raise RuntimeError("no such city")
        return [f"{args['city']}: 21 C, sunny"]

    registry = ToolRegistry([Tool("weather", "Current weather.", {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}, weather)])
    replies = iter([call("weather", city="Paris"), call("weather", city="Atlantis"), "Done."])
    backend = ScriptedBackend(lambda req: next(replies))
    result, trace, messages = run_tool_loop(backend, [user_message("weather?")], registry, ToolContext(), SamplingParams())
    assert trace[0].text == "Paris: 21 C, sunny" and trace[0].error is None
    assert "no such city" in trace[1].error and result.output.answer == "Done."



def test_the_tool_loop_is_still_importable_from_glmv_tools():
    """The previous README showed ``from glmv.tools import ... run_tool_loop``; code written from it keeps working
    (the loop itself is the task layer's now)."""
    from glmv import tools

    replies = iter([call("weather", city="Paris"), "Done."])
    registry = ToolRegistry([Tool("weather", "Current weather.", {"type": "object", "properties": {
        "city": {"type": "string"}}}, lambda args, ctx: [f"{args['city']}: 21 C"])])
    result, trace, _ = tools.run_tool_loop(ScriptedBackend(lambda req: next(replies)), [user_message("weather?")],
                                           registry, ToolContext(), SamplingParams())
    assert trace[0].text == "Paris: 21 C" and result.output.answer == "Done."
    assert tools.run_tool_loop is run_tool_loop

@needs_browser
def test_render_html_tool_uses_chromium_and_blocks_the_network():
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    page = (f'<html><body style="background:#08f"><img src="http://127.0.0.1:{srv.server_address[1]}/beacon.png">'
            f"<h1>Hello</h1></body></html>")
    replies = iter([call("render_html", html=page, viewport="phone"), "Looks blue."])
    backend = ScriptedBackend(lambda req: next(replies))
    result, trace, messages = run_tool_loop(backend, [user_message("check it")], default_registry(), ToolContext(),
                                            SamplingParams())
    srv.shutdown()
    assert trace[0].error is None and trace[0].images[0][0] == 390  # the phone viewport
    shot = messages[-1].images[0].image
    assert shot.getpixel((200, 400))[2] > 200  # the page really rendered (blue background)
    assert hits == []  # no request left the browser


@pytest.mark.slow
def test_tiny_model_runs_the_tool_loop(tiny_path):
    def run(*extra):
        p = glmv_in_process("ask", "input/image_1.png", "--model", "tiny", "--max-new-tokens", "6", "--json", *extra)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    with_tools, without = run("--tools"), run()
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 50  # the tools block


@needs_browser
@needs_ocr
def test_score_orders_pages_sensibly(tmp_path):
    from glmv.score import score_page
    from glmv.render import render_html

    target = render_html(PAGE, width=1280)
    same, _ = score_page(target, PAGE)
    changed, _ = score_page(target, CHANGED)
    other, _ = score_page(target, OTHER)
    assert same["overall"] > changed["overall"] > other["overall"]
    for report in (same, changed, other):
        assert all(0.0 <= report[k] <= 1.0 for k in ("block_match", "text", "position", "colour", "visual", "overall"))
    target.save(tmp_path / "target.png")
    (tmp_path / "page.html").write_text(CHANGED)
    p = glmv_in_process("score", str(tmp_path / "target.png"), str(tmp_path / "page.html"))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["overall"] == pytest.approx(changed["overall"], abs=0.02)


@needs_browser
@needs_ocr
def test_refine_keeps_versions_and_stops_when_no_better(tmp_path):
    from glmv.render import render_html

    shot = tmp_path / "target.png"
    render_html(PAGE, width=1280).save(shot)
    replies = iter([f"```html\n{OTHER}\n```", f"```html\n{CHANGED}\n```", f"```html\n{CHANGED}\n```", f"```html\n{PAGE}\n```"])
    backend = ScriptedBackend(lambda req: next(replies))
    code, out, err = cli(["html", str(shot), "--refine", "3", "--out", str(tmp_path / "out"), "--json"], backend)
    assert code == 0, err
    data = json.loads(out)
    scores = [v["score"] for v in data["versions"]]
    assert len(scores) == 3 and scores[1] > scores[0] and scores[2] <= scores[1]  # stopped: no improvement
    assert data["html_path"] == data["versions"][1]["path"]  # the best version is the answer
    assert len(list((tmp_path / "out").glob("generated_*.html"))) == 3
    # the model saw its render beside the target
    second = backend.requests[1].messages[-1]
    assert len(second.images) == 2 and "how your HTML below renders" in second.text
