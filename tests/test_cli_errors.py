"""Every command-line mistake gets one line, `error: ...`, exit 2, with a suggestion where one fits; flags a
command would ignore are refused; the tutorial's defaults; nothing heavy is imported on these paths."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest

from conftest import REPO
from test_batch import small_tmpfs  # noqa: F401  (a fixture: a real, tiny tmpfs)
from test_cli import run_cli


@pytest.mark.parametrize(
    "args,message",
    [
        (["ask", "--temperature", "abc"], "error: --temperature needs a number, not 'abc'"),
        (["ask", "--top-k", "1.5"], "error: --top-k needs a whole number, not '1.5'"),
        (["ask", "--max-tokens", "5"], "error: unknown option --max-tokens for glmv ask (did you mean --max-new-tokens?)"),
        (["ask", "--tokens-max=5"], "(did you mean --max-new-tokens?)"),
        (["ocr", "x.png", "--temprature", "1"], "unknown option --temprature for glmv ocr (did you mean --temperature?)"),
        (["aks", "-p", "hi"], "error: unknown command 'aks' (did you mean ask?"),
        (["README.md"], "error: unknown command 'README.md' (did you mean glmv ask README.md?)"),
        (["ask", "--quant", "w8"], "error: --quant 'w8' is not one of none, nf4, w4"),
        (["ask", "--temperature"], "error: --temperature needs a value"),
        (["batch", "in/"], "error: glmv batch needs --out"),
        (["batch", "in/", "--out", "o", "--batch-size", "100000"], "--batch-size 100000 is over 256"),  # was 100,000 threads
        (["ps", "extra"], "error: unexpected argument 'extra' for glmv ps"),
        (["ask", "input/image_1.png", "--pages", "1-2"], "--pages applies to PDFs and slide decks, and 'input/image_1.png' is not"),
        (["ask", "-p", "x", "--dpi", "100"], "--dpi applies to PDFs and slide decks, and there is no document"),
        (["ask", "-p", "x", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--quant", "w4"],
         "--quant has no effect with --backend openai"),
        (["ask", "-p", "x", "--base-url", "http://127.0.0.1:9/v1", "--model", "tiny"], "--model has no effect with --backend openai"),
        (["ask", "-p", "x", "--backend", "local", "--base-url", "http://127.0.0.1:9/v1"], "--base-url needs --backend openai"),
        (["ask", "-p", "x", "--remote-model", "m"], "--remote-model needs --backend openai --base-url URL"),
        # the older spelling is named as typed (it said --remote-api-key, a flag the user never wrote)
        (["ask", "-p", "x", "--api-key", "k"], "error: --api-key needs --backend openai --base-url URL"),
        (["ask", "-p", "x", "--max-steps", "2"], "--max-steps has no effect without --tools"),
        (["ask", "-p", "x", "--no-thinking", "--show-thinking"], "--show-thinking shows nothing with --no-thinking"),
        (["ask", "-p", "x", "--json", "--stream"], "--stream and --json do not mix"),
        (["batch", "in/", "--out", "o", "--system", "be brief"], "glmv batch does not use --system"),
        (["chat", "--json"], "glmv chat does not use --json"),
        (["ask", "-c"], "continuing a conversation needs a prompt"),
        (["ask", "-c", "--cid", "x", "-p", "y"], "use one of them"),
        (["start", "--idle-timeout", "soon"], "invalid idle timeout 'soon'"),
        (["html", "input/image_1.png", "--refine", "-1"], "--refine -1: give the number of rounds"),
        # a Latin-1 terminal's byte arrives as a lone surrogate: was "unexpected UnicodeEncodeError", exit 1
        (["ask", "-p", "caf\udce9"], "--prompt is not UTF-8 text (byte 0xe9 at character 4)"),
        (["ask", "-p", "x", "--system", "\udcff"], "--system is not UTF-8 text (byte 0xff"),
        (["logs", "-q", "\udce9"], "--query is not UTF-8 text"),
    ],
)
def test_one_line_errors(args, message):
    r = run_cli(args, cwd=REPO)
    assert r.code == 2, r.err
    assert message in r.err and r.err.startswith("error: ")
    assert r.err.count("\n") == 1 and "usage:" not in r.err and "Traceback" not in r.err
    assert r.backend.requests == []


def test_bare_glmv_outside_a_checkout_says_what_to_do(tmp_path):
    for args in ([], ["--prompt", "what is this?"]):
        r = run_cli(args, cwd=tmp_path)
        assert r.code == 2
        assert "the tutorial's default image input/image_1.png is not in this folder" in r.err
        assert "glmv ask photo.jpg" in r.err


def test_tutorial_prompt_keeps_the_default_image_but_ask_is_text_only():
    r = run_cli(["--prompt", "what is this?"], cwd=REPO)
    assert r.code == 0
    msg = r.backend.requests[0].messages[-1]
    assert msg.text == "what is this?" and len(msg.images) == 1 and msg.images[0].source.endswith("image_1.png")
    r = run_cli(["ask", "-p", "what is this?"], cwd=REPO)
    assert r.code == 0 and r.backend.requests[0].messages[-1].images == []


def test_pages_on_a_pdf_is_fine_and_base_url_alone_means_openai(tmp_path):
    from test_documents import make_pdf

    pdf = make_pdf(tmp_path / "doc.pdf", 2)
    r = run_cli(["ask", str(pdf), "--pages", "2", "-p", "what is on it?"])
    assert r.code == 0 and len(r.backend.requests[0].messages[-1].images) == 1
    r = run_cli(["ask", "-p", "x", "--base-url", "http://127.0.0.1:9/v1"])
    assert r.code == 2 and "cannot reach the server at http://127.0.0.1:9/v1" in r.err


def test_help_and_errors_import_nothing_heavy():
    code = (
        "import io, sys, json\nfrom glmv.cli import main\n"
        "codes = [main(a, stdout=io.StringIO(), stderr=io.StringIO()) for a in "
        "(['ask', '--temperature', 'abc'], ['ask', '--max-tokens', '3'], ['aks'], ['ask', 'missing.png'], ['logs', '-n', '1'], ['ps'])]\n"
        "try:\n    main(['--help'], stdout=io.StringIO())\nexcept SystemExit:\n    pass\n"
        "print(json.dumps([codes, sorted(m for m in ('torch', 'transformers', 'openai', 'fastapi', 'gradio') if m in sys.modules)]))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "usage: glmv" in p.stdout
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [[2, 2, 2, 2, 0, 0], []], p.stderr


def test_json_out_writes_the_object_and_bad_targets_are_refused_first(tmp_path, sample_png):
    target = tmp_path / "answer.json"
    r = run_cli(["ask", str(sample_png), "-p", "colour?", "--json-out", str(target)])
    assert r.code == 0 and r.out.strip() == "A red square."  # text on stdout, the object in the file
    assert json.loads(target.read_text())["answer"] == "A red square."
    r = run_cli(["ask", str(sample_png), "--json", "--json-out", str(target)])
    assert json.loads(r.out) == json.loads(target.read_text())
    r = run_cli(["ask", str(sample_png), "--json-out", str(tmp_path)])
    assert r.code == 2 and "is a folder" in r.err and r.backend.requests == []
    (tmp_path / "file").write_text("x")
    r = run_cli(["ask", str(sample_png), "--json-out", str(tmp_path / "file" / "a.json")])
    assert r.code == 2 and r.backend.requests == []


def test_a_full_disk_is_one_line_and_leaves_nothing(small_tmpfs, sample_png):
    """`glmv html` and --json-out on a really full tmpfs: were 'unexpected OSError', exit 1."""
    (small_tmpfs / "pages").mkdir()
    with contextlib.suppress(OSError), open(small_tmpfs / "fill", "wb", buffering=0) as f:
        while True:  # up to the last byte
            f.write(b"\0" * 512)
    r = run_cli(["html", str(sample_png), "--out", str(small_tmpfs / "pages")], script="<html>" + "x" * 9000)
    assert r.code == 2 and r.err.splitlines()[-1].startswith("error: cannot save the page in") and "space" in r.err
    r = run_cli(["ask", str(sample_png), "-p", "x", "--json-out", str(small_tmpfs / "a.json")], script="y" * 9000)
    assert r.code == 2 and r.err.splitlines()[-1].startswith("error: cannot write --json-out") and "space" in r.err
    assert sorted(p.name for p in small_tmpfs.rglob("*")) == ["fill", "pages"]  # no partial or temporary file
