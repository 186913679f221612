"""The task layer (glmv.tasks) in-process: the events a user would see, cancel, the tool-step limit, saving."""

from __future__ import annotations

import ast
import datetime as dt
import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, png_bytes
from glmv import tasks
from glmv.backends.base import Chunk
from glmv.media import load_image
from glmv.prompts import TASKS, user_message
from glmv.settings import SamplingParams
from glmv.testing.scripted import ScriptedBackend

needs_score = pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("tesseract") is None,
                                 reason="refine scores renders: needs chromium and tesseract-ocr")
SAMPLING = SamplingParams()
PAGE = """<!DOCTYPE html><html><head><style>
body{font-family:sans-serif;margin:0} header{background:#1c2a4a;color:#fff;padding:20px 40px;font-size:28px}
.hero{background:#4078c8;color:#fff;padding:60px 80px} .hero h1{font-size:48px;margin:0}</style></head>
<body><header>Skyline Travel</header><div class="hero"><h1>Find your next adventure</h1>
<p>Flights, hotels and tours in 140 countries.</p></div></body></html>"""
CLOSER = PAGE.replace("#4078c8", "#c84040").replace("140 countries", "14 countries")
OTHER = """<!DOCTYPE html><html><body style="font-family:serif;background:#fafaf0"><h3 style="text-align:right">
Quarterly numbers</h3><table border=1 style="margin:200px auto"><tr><td>Apples</td><td>12</td></tr></table></body></html>"""


def call(name: str, **args) -> str:
    body = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{json.dumps(v)}</arg_value>\n" for k, v in args.items())
    return f"<tool_call>{name}\n{body}</tool_call>"


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "shot.png"
    p.write_bytes(png_bytes((200, 120)))
    return load_image(p)


def test_ask_passes_the_text_through_then_finishes(image):
    backend = ScriptedBackend("<think>a red box</think>It is red.")
    events = list(tasks.ask(backend, [user_message("what colour?", [image])], SAMPLING))
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert "".join(c.text for c in chunks if c.type == "thinking") == "a red box"
    assert "".join(c.text for c in chunks if c.type == "answer") == "It is red."
    assert all(c.type != "done" for c in chunks)  # the task's own Finished closes the stream
    assert isinstance(events[-1], tasks.Finished) and events.count(events[-1]) == 1
    result = events[-1].result
    assert result.output.answer == "It is red." and result.finish_reason == "stop"
    line = tasks.stats_line(result.usage, result.timings)
    assert line.startswith(f"{result.usage.completion_tokens} tokens, prompt {result.usage.prompt_tokens}, TTFT ")


def test_the_stats_line_is_the_same_in_the_cli_and_the_web_app(image):
    from glmv.cli import summary_line
    from glmv.ui.app import Run

    result = tasks.finish(tasks.ask(ScriptedBackend("one two three four five"), [user_message("x")], SAMPLING)).result
    line = tasks.stats_line(result.usage, result.timings, sep=" · ")
    assert "tok/s" in line and "TTFT" in line
    assert summary_line(result) == "glmv: " + tasks.stats_line(result.usage, result.timings)
    assert Run(done=result).stats() == "✓ · " + line


def test_ocr_asks_one_page_at_a_time(image, tmp_path):
    other = load_image(_png(tmp_path / "b.png", (90, 60)))
    backend = ScriptedBackend(lambda req: f"text of a {req.messages[-1].images[0].size[0]} px page")
    events = list(tasks.ocr(backend, [image, other], SAMPLING))
    starts = [e for e in events if isinstance(e, tasks.PageStarted)]
    assert [(s.index, s.count) for s in starts] == [(0, 2), (1, 2)]
    assert [e.result.output.answer for e in events if isinstance(e, tasks.Finished)] == \
        ["text of a 200 px page", "text of a 90 px page"]
    assert [len(r.messages[-1].images) for r in backend.requests] == [1, 1]
    assert all(r.messages[-1].text == TASKS["ocr"].prompt for r in backend.requests)


def test_html_saves_the_page_and_never_overwrites(image, tmp_path):
    out = tmp_path / "html"
    out.mkdir()
    # Files already there for this second and the next two: whatever second the runs land in, they collide
    now = dt.datetime.now()
    taken = {}
    for s in range(3):
        name = f"generated_{(now + dt.timedelta(seconds=s)).strftime('%Y%m%d_%H%M%S')}.html"
        taken[name] = f"<p>kept {s}</p>"
        (out / name).write_text(taken[name])
    replies = iter([f"```html\n{PAGE}\n```", f"```html\n{CLOSER}\n```", "Sorry, <no> page here."])
    backend = ScriptedBackend(lambda req: next(replies))
    saved = []
    for _ in range(3):
        events = list(tasks.html(backend, [user_message(TASKS["html"].prompt, [image])], SAMPLING, out))
        assert isinstance(events[-2], tasks.Finished) and isinstance(events[-1], tasks.Saved)
        saved.append(events[-1])
    assert len({s.path for s in saved}) == 3 and not {s.path.name for s in saved} & set(taken)
    assert [s.path.read_text() for s in saved] == [s.page for s in saved]
    assert [s.page.strip() for s in saved[:2]] == [PAGE, CLOSER]
    assert [s.html_found for s in saved] == [True, True, False]
    assert "Sorry, &lt;no&gt; page here." in saved[2].page  # the answer as a text page, escaped
    assert {n: (out / n).read_text() for n in taken} == taken  # nothing overwritten
    assert not list(out.glob(".*"))  # no temporary left behind


def test_the_tool_loop_shows_each_step_and_stops_at_the_limit(image):
    backend = ScriptedBackend(lambda req: call("crop", box=[0, 0, 500, 500]) if req.tools else "Final answer.")
    events = list(tasks.ask(backend, [user_message("look closer", [image])], SAMPLING, tools=_registry()))
    steps = [e for e in events if isinstance(e, tasks.ToolStep)]
    assert len(steps) == tasks.MAX_TOOL_STEPS
    assert all(s.step.name == "crop" and s.step.error is None and s.content[0].size[0] == 1024 for s in steps)
    assert backend.requests[-1].tools is None and len(backend.requests) == tasks.MAX_TOOL_STEPS + 1
    done = events[-1]
    assert isinstance(done, tasks.Finished) and done.result.output.answer == "Final answer."
    assert [t["tool"] for t in done.result.trace] == ["crop"] * tasks.MAX_TOOL_STEPS


def test_the_cli_and_the_web_app_share_the_tool_step_limit(tmp_path):
    from glmv.cli import build_parser, main
    from test_ui import make_app

    def script(req):
        return call("crop", box=[100, 100, 600, 600]) if req.tools else "Done looking."

    cli_backend = ScriptedBackend(script)
    out, err = io.StringIO(), io.StringIO()
    code = main(["ask", str(REPO / "input" / "image_1.png"), "-p", "zoom", "--tools", "--json"],
                backend_factory=lambda s: cli_backend, stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert len(json.loads(out.getvalue())["trace"]) == tasks.MAX_TOOL_STEPS

    app, ui_backend = make_app(tmp_path, script)
    message = {"text": "zoom", "files": [str(_png(tmp_path / "c.png", (300, 200)))]}
    for view, _, stats, _ in app.chat(message, [], [], False, True, True, 64, "s1"):
        pass
    titles = [m["metadata"]["title"] for m in view if (m.get("metadata") or {}).get("title", "").startswith("⚙")]
    assert len(titles) == tasks.MAX_TOOL_STEPS and stats.startswith("✓")
    assert len(ui_backend.requests) == len(cli_backend.requests) == tasks.MAX_TOOL_STEPS + 1
    assert build_parser().parse_args(["ask", "--tools"]).max_steps == tasks.MAX_TOOL_STEPS


def test_cancel_during_the_token_stream_stops_at_the_next_token(image):
    backend = ScriptedBackend("word " * 400, delay_s=0.005)
    cancel = threading.Event()
    seen, after = 0, 0
    for event in tasks.ask(backend, [user_message("talk", [image])], SAMPLING, cancel=cancel):
        if isinstance(event, Chunk):
            seen += 1
            after += cancel.is_set()
            if seen == 10:
                cancel.set()
                t0 = time.perf_counter()
        elif isinstance(event, tasks.Finished):
            done = event
    assert time.perf_counter() - t0 < 0.5 and after <= 1
    assert done.result.finish_reason == "cancelled"
    assert done.result.output.answer.startswith("word word") and ("word " * 400).startswith(done.result.output.answer)
    assert done.result.usage.completion_tokens < 20  # of 667 pieces


def test_cancel_during_a_tool_loop_runs_no_more_tools(image):
    cancel = threading.Event()
    backend = ScriptedBackend(lambda req: call("crop", box=[0, 0, 500, 500]) + call("crop", box=[0, 0, 90, 90]))
    steps = 0
    for event in tasks.ask(backend, [user_message("zoom", [image])], SAMPLING, cancel=cancel,
                           tools=_registry()):
        if isinstance(event, tasks.ToolStep):
            steps += 1
            cancel.set()
        elif isinstance(event, tasks.Finished):
            done = event
    # the second call of the round is not run, nor another round; the answer so far is reported as stopped
    assert steps == 1 and len(backend.requests) == 1 and done.result.finish_reason == "cancelled"
    assert [t["tool"] for t in done.result.trace] == ["crop"]


@needs_score
def test_cancel_while_the_model_writes_a_correction(tmp_path):
    target, first = _refine_start(tmp_path)
    cancel = threading.Event()
    backend = ScriptedBackend(f"```html\n{CLOSER}\n```", delay_s=0.01)
    events, chunks = [], 0
    for event in tasks.refine(backend, target, OTHER, first, 2, SAMPLING, out_dir=tmp_path / "out", cancel=cancel):
        events.append(event)
        if isinstance(event, Chunk):
            chunks += 1
            if chunks == 5:
                cancel.set()
                t0 = time.perf_counter()
    assert time.perf_counter() - t0 < 0.5
    kinds = [type(e).__name__ for e in events if not isinstance(e, Chunk)]
    assert kinds == ["Scoring", "RoundFinished", "RoundStarted", "RefineStopped"]
    assert events[-1].cancelled and events[-1].reason == tasks.STOPPED
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [first.name]  # nothing of the cut round


@needs_score
def test_cancel_while_a_round_is_scored_keeps_the_versions_saved_before(tmp_path):
    target, first = _refine_start(tmp_path)
    replies = iter([f"```html\n{CLOSER}\n```", f"```html\n{PAGE}\n```"])
    backend = ScriptedBackend(lambda req: next(replies))
    cancel = threading.Event()
    events, marks = [], {}
    for event in tasks.refine(backend, target, OTHER, first, 3, SAMPLING, out_dir=tmp_path / "out", cancel=cancel):
        events.append(event)
        if isinstance(event, tasks.Scoring):
            marks[event.round] = time.perf_counter()
            if event.round == 2:
                cancel.set()
        elif isinstance(event, tasks.RoundFinished):
            marks[f"scored {event.round}"] = time.perf_counter()
    stopped = time.perf_counter() - marks[2]
    scoring = marks["scored 1"] - marks[1]  # what a whole scoring takes here
    assert stopped < 0.5 and stopped < scoring / 2, (stopped, scoring)
    finished = [e for e in events if isinstance(e, tasks.RoundFinished)]
    assert [e.round for e in finished] == [0, 1] and finished[1].score > finished[0].score
    assert isinstance(events[-1], tasks.RefineStopped) and events[-1].cancelled
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert saved == sorted([first.name, finished[1].path.name])  # round 1's version kept, round 2's not written
    assert finished[1].path.read_text().strip() == CLOSER
    time.sleep(scoring)  # the abandoned scoring ends in the background and writes nothing either
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == saved


def test_tasks_import_no_front_end():
    tree = ast.parse((REPO / "src" / "glmv" / "tasks.py").read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    front = {"cli", "chat", "ui", "server", "batch", "bench", "bench_serve", "resident"}
    assert imported and not {m for m in imported if m.split(".")[0] in front}, imported


@pytest.mark.slow
def test_tiny_model_html_end_to_end(tiny_backend, tmp_path):
    """The real transformers path: a random tiny model writes no HTML, so its answer is saved as a text page."""
    image = load_image(REPO / "input" / "image_1.png", max_pixels=200_000)
    sampling = tiny_backend.default_sampling.merged(max_new_tokens=12, temperature=0.0)
    events = list(tasks.html(tiny_backend, [user_message(TASKS["html"].prompt, [image])], sampling, tmp_path,
                             thinking=False))
    done, saved = events[-2], events[-1]
    assert isinstance(done, tasks.Finished) and isinstance(saved, tasks.Saved)
    streamed = "".join(e.text for e in events if isinstance(e, Chunk) and e.type == "answer")
    assert streamed == done.result.output.answer and 0 < done.result.usage.completion_tokens <= 12
    assert done.result.usage.prompt_tokens > 100 and done.result.timings.ttft_s is not None
    assert saved.path.parent == tmp_path and saved.path.read_text() == saved.page
    assert saved.html_found == (done.result.output.html is not None)


def _png(path: Path, size) -> Path:
    path.write_bytes(png_bytes(size))
    return path


def _registry():
    from glmv.tools import default_registry

    return default_registry()


def _refine_start(tmp_path):
    """A target screenshot (PAGE rendered) and a poor first version (OTHER) saved as a refine would find it."""
    from glmv.outputs import save_html
    from glmv.render import render_html

    shot = tmp_path / "target.png"
    render_html(PAGE, width=1280).save(shot)
    return load_image(shot), save_html(OTHER, tmp_path / "out")
