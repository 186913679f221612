"""The CLI, in-process against a scripted backend (level 2), and as a real process on the tiny model (level 3)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, bomb_png, glmv_in_process
from glmv.cli import main
from glmv.testing.scripted import ScriptedBackend

PAGE = "<!DOCTYPE html>\n<html><head><title>T</title></head><body><h1>Skyline</h1></body></html>"


class Run:
    def __init__(self, code, out, err, backend):
        self.code, self.out, self.err, self.backend = code, out, err, backend


def run_cli(args, script="<think>looking</think>A red square.", cwd=None, stdin=None):
    backend = ScriptedBackend(script)
    made = []

    def factory(settings):
        made.append(settings)
        backend.settings = settings
        return backend

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        code = main(args, backend_factory=factory, stdout=out, stderr=err)
    finally:
        os.chdir(old)
    r = Run(code, out.getvalue(), err.getvalue(), backend)
    r.settings = made[0] if made else None
    return r


def test_ask_prints_answer_and_summary(sample_png):
    r = run_cli(["ask", str(sample_png), "-p", "what colour?"])
    assert r.code == 0
    assert r.out.strip() == "A red square."
    assert "tokens" in r.err and "TTFT" in r.err and "tok/s" in r.err
    req = r.backend.requests[0]
    assert req.messages[-1].text == "what colour?" and len(req.messages[-1].images) == 1


def test_show_thinking_marks_reasoning(sample_png):
    r = run_cli(["ask", str(sample_png), "--show-thinking", "--stream"])
    assert r.code == 0
    assert "── thinking ──" in r.out and "looking" in r.out and "── answer ──" in r.out
    assert r.out.index("looking") < r.out.index("A red square.")
    hidden = run_cli(["ask", str(sample_png), "--stream"])
    assert "looking" not in hidden.out and "A red square." in hidden.out


def test_json_output_fields(sample_png):
    r = run_cli(["ask", str(sample_png), "--json"])
    assert r.code == 0
    data = json.loads(r.out)
    assert data["answer"] == "A red square." and data["thinking"] == "looking"
    assert set(data["usage"]) >= {"prompt_tokens", "completion_tokens"}
    assert set(data["timings"]) >= {"ttft_s", "tokens_per_s"}
    assert data["finish_reason"] == "stop"


def test_json_output_has_grounding_boxes_in_the_images_pixels(sample_png):
    # sample_png is 64x48: a box on the 0-1000 scale maps onto it.
    r = run_cli(["ask", str(sample_png), "--json", "-p", "where is the square?"],
                script="<think>find it</think>square: <|begin_of_box|>[[250,500,750,1000]]<|end_of_box|>")
    assert r.code == 0
    assert json.loads(r.out)["boxes"] == [{"label": "square", "box": [250, 500, 750, 1000], "pixels": [16, 24, 48, 48]}]


def test_no_arguments_is_the_tutorial_default(tmp_path, sample_png):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "image_1.png").write_bytes(sample_png.read_bytes())
    r = run_cli([], cwd=tmp_path)
    assert r.code == 0
    msg = r.backend.requests[0].messages[-1]
    assert msg.text == "describe this image" and len(msg.images) == 1


def test_tutorial_flags_still_work(sample_png):
    r = run_cli(["--model_path", "some/model", "--input", str(sample_png), "--prompt", "hi", "--stream"])
    assert r.code == 0 and r.settings.model == "some/model"
    assert r.backend.requests[0].messages[-1].text == "hi"


def test_prompt_without_image_is_text_only():
    r = run_cli(["ask", "-p", "what is 2+2?"])
    assert r.code == 0 and r.backend.requests[0].messages[-1].images == []


def test_sampling_and_thinking_flags_reach_the_request(sample_png):
    r = run_cli(["ask", str(sample_png), "--temperature", "0", "--top-p", "0.9", "--top-k", "5", "--seed", "3",
                 "--max-new-tokens", "77", "--no-thinking", "--max-pixels", "1000"])
    req = r.backend.requests[0]
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.max_new_tokens) == (0.0, 0.9, 5, 3, 77)
    assert req.thinking is False
    w, h = req.messages[-1].images[0].size
    assert w * h <= 1000


def test_ocr_uses_its_default_prompt(sample_png):
    r = run_cli(["ocr", str(sample_png)], script="| a | b |\n|---|---|\n| 1 | 2 |")
    assert r.code == 0
    assert "reading order" in r.backend.requests[0].messages[-1].text
    assert "| 1 | 2 |" in r.out


def test_html_extracts_and_saves(tmp_path, sample_png):
    script = f"<think>layout</think>Here you go:\n```html\n{PAGE}\n```"
    r = run_cli(["html", str(sample_png), "--out", str(tmp_path / "out"), "--json"], script=script)
    assert r.code == 0
    data = json.loads(r.out)
    path = Path(data["html_path"])
    assert path.parent == tmp_path / "out"
    assert path.name.startswith("generated_") and path.suffix == ".html"
    assert path.read_text().strip() == PAGE
    assert data["html_found"] is True


def test_html_raw_without_fence_and_path_printed(tmp_path, sample_png):
    r = run_cli(["html", str(sample_png), "--out", str(tmp_path)], script=f"<think>x</think>{PAGE}")
    assert r.code == 0
    path = Path(r.out.strip().splitlines()[-1])
    assert path.read_text().strip() == PAGE


def test_html_two_runs_in_one_second_do_not_overwrite(tmp_path, sample_png):
    for _ in range(2):
        assert run_cli(["html", str(sample_png), "--out", str(tmp_path)], script=PAGE).code == 0
    assert len(list(tmp_path.glob("generated_*.html"))) == 2


def test_html_without_html_in_answer_warns(tmp_path, sample_png):
    r = run_cli(["html", str(sample_png), "--out", str(tmp_path)], script="I cannot see a web page.")
    assert r.code == 0 and "no HTML" in r.err
    (page,) = tmp_path.glob("generated_*.html")
    assert "I cannot see a web page." in page.read_text()


# -- bad input: error naming the input, exit 2, nothing generated, nothing written -----------------
@pytest.mark.parametrize(
    "setup,args,message",
    [
        (lambda d: None, ["ask", "{d}/missing.png"], "missing.png': no such file"),
        (lambda d: (d / "folder").mkdir(), ["ask", "{d}/folder"], "is a directory"),
        (lambda d: (d / "empty.png").write_bytes(b""), ["ask", "{d}/empty.png"], "empty (0 bytes)"),
        (lambda d: (d / "t.png").write_text("just text"), ["ask", "{d}/t.png"], "not a PNG/JPEG"),
        (lambda d: (d / "big.png").write_bytes(bomb_png(20000, 20000)), ["ask", "{d}/big.png"], "safety cap"),
        (None, ["ask", "http://127.0.0.1:9/x.png"], "cannot fetch image"),
        (None, ["ask", "-p", "  "], "prompt is empty"),
        (None, ["ask", "--temperature", "-1"], "invalid temperature"),
        (None, ["ask", "--top-p", "1.5"], "invalid top_p"),
        (None, ["ask", "--max-new-tokens", "0"], "invalid max_new_tokens"),
        (None, ["ask", "--max-pixels", "10"], "invalid max_pixels"),
        (None, ["ocr"], "needs an image"),
    ],
    ids=["missing", "dir", "zero-bytes", "text-as-png", "over-pixel-cap", "unreachable-url", "empty-prompt",
         "temperature", "top-p", "max-new-tokens", "max-pixels", "ocr-no-image"],
)
def test_bad_input_exits_2_before_the_model(tmp_path, setup, args, message):
    if setup:
        setup(tmp_path)
    args = [a.replace("{d}", str(tmp_path)) for a in args]
    r = run_cli(args + ["--out", str(tmp_path / "html")] if args[0] == "html" else args)
    assert r.code == 2, r.err
    assert r.err.startswith("error: ") and message in r.err
    assert "Traceback" not in r.err
    assert r.backend.requests == []  # never reached generation


def test_html_bad_image_writes_nothing(tmp_path):
    (tmp_path / "t.png").write_text("nope")
    r = run_cli(["html", str(tmp_path / "t.png"), "--out", str(tmp_path / "out")])
    assert r.code == 2
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unwritable_output_folder(tmp_path, sample_png):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli(["html", str(sample_png), "--out", str(blocker / "sub")])
    assert r.code == 2 and "output folder" in r.err
    assert r.backend.requests == []


# -- the real thing: the installed console script on the tiny model ----------------------------
def glmv(*args, env=None, input=None, timeout=300):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "glmv.cli", *args], capture_output=True, text=True, env=e,
                          cwd=REPO, input=input, timeout=timeout)


@pytest.mark.slow
def test_tiny_ask_json_end_to_end(tiny_path):
    p = glmv("ask", "input/image_1.png", "--model", "tiny", "--max-new-tokens", "12", "--json", "--seed", "1")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["usage"]["completion_tokens"] == 12
    assert data["usage"]["prompt_tokens"] > 500  # the image's visual tokens are in the prompt
    assert data["timings"]["ttft_s"] > 0 and data["timings"]["tokens_per_s"] > 0
    assert data["finish_reason"] == "length"
    assert "loading tiny" in p.stderr  # progress on stderr


@pytest.mark.slow
def test_tiny_streamed_ocr_and_html(tiny_path, tmp_path):
    p = glmv_in_process("ocr", "input/image_2.png", "--model", "tiny", "--max-new-tokens", "8", "--stream")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    assert "8 tokens" in p.stderr and "tok/s" in p.stderr  # the summary line
    p = glmv_in_process("html", "input/image_3.png", "--model", "tiny", "--max-new-tokens", "8", "--no-stream",
                        "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    (page,) = tmp_path.glob("generated_*.html")
    assert str(page) == p.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_tiny_image_from_stdin_and_no_thinking(tiny_path):
    data = (REPO / "input" / "image_1.png").read_bytes()
    p = glmv_in_process("ask", "-", "--model", "tiny", "--max-new-tokens", "5", "--no-thinking", "--json", stdin=data)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["usage"]["completion_tokens"] == 5 and result["usage"]["prompt_tokens"] > 500  # the image went in


@pytest.mark.slow
def test_unreachable_hub_and_unknown_model(tmp_path):
    # No hub is reachable from the test machines: the default model must fail fast and say what to do.
    env = {"HF_HOME": str(tmp_path / "hf")}
    p = glmv("ask", "input/image_1.png", env=env, timeout=120)
    assert p.returncode == 2
    assert "cannot load model 'zai-org/GLM-4.6V-Flash'" in p.stderr and "--model tiny" in p.stderr
    assert "hf download zai-org/GLM-4.6V-Flash" in p.stderr  # the command huggingface-hub installs
    assert "Traceback" not in p.stderr
    p = glmv("ask", "input/image_1.png", "--model", "no-such-org/no-such-model", env={**env, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "no-such-org/no-such-model" in p.stderr
    p = glmv("ask", "input/image_1.png", "--model", "./not/a/folder")
    assert p.returncode == 2 and "no such folder" in p.stderr


@pytest.mark.slow
def test_int4_without_cuda_is_refused(tiny_path):
    p = glmv_in_process("ask", "input/image_1.png", "--model", "tiny", "--int4")
    assert p.returncode == 2 and p.stdout == ""
    assert "--int4" in p.stderr and "CUDA" in p.stderr and "Traceback" not in p.stderr


def test_debug_shows_traceback(tmp_path):
    p = glmv("ask", str(tmp_path / "missing.png"), "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr
