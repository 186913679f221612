"""PDFs, decks and video (files made by the tests), and the batch runner, on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import REPO, png_bytes
from glmv.documents import load_inputs, load_video, office_to_pdf, parse_pages, pdf_page_count, render_pdf
from glmv.errors import MediaError


def text_page(text: str, size=(850, 1100)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 36)
    except OSError:
        font = ImageFont.load_default(size=36)
    d.text((60, 80), text, fill="black", font=font)
    d.rectangle([60, 200, 790, 420], outline="black", width=3)
    return img


def make_pdf(path: Path, n: int) -> Path:
    pages = [text_page(f"Page {i + 1}: quarterly report") for i in range(n)]
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=100)
    return path


def make_video(path: Path, seconds: float = 3.0, fps: int = 10) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for i in range(int(seconds * fps)):
            arr = np.zeros((96, 128, 3), dtype=np.uint8)
            arr[..., 0] = (i * 8) % 256  # the colour changes over time
            arr[:, : 4 + i * 4, 1] = 255  # a bar grows
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture
def pdf(tmp_path) -> Path:
    return make_pdf(tmp_path / "report.pdf", 3)


# -- PDFs --------------------------------------------------------------------------------------------
def test_render_pdf_pages_and_resolution(pdf):
    assert pdf_page_count(pdf) == 3
    pages = render_pdf(pdf, "1,3", long_side=1200)
    assert [p.source.rsplit("=", 1)[1] for p in pages] == ["1", "3"]
    assert max(pages[0].size) == 1200
    at_72 = render_pdf(pdf, "2", dpi=72)[0]
    assert max(at_72.size) == 792  # Pillow wrote 1100 px at 100 dpi: 792 pt, so 792 px at 72 dpi


def test_render_pdf_keeps_the_text_legible(pdf):
    page = render_pdf(pdf, "2", long_side=1100)[0].image
    # dark pixels where the heading was drawn: the page is really rendered, not blank
    dark = sum(1 for x in range(60, 700, 3) for y in range(80, 120, 3) if sum(page.getpixel((x, y))) < 200)
    assert dark > 20


@pytest.mark.parametrize("spec,n,expected", [("1-3", 5, [0, 1, 2]), ("2,4-5", 5, [1, 3, 4]), (None, 2, [0, 1]), ("3-", 4, [2, 3])])
def test_page_ranges(spec, n, expected):
    assert parse_pages(spec, n) == expected


@pytest.mark.parametrize("spec,message", [("7-9", "outside"), ("x", "invalid page range"), ("3-1", "invalid page range"), ("0", "invalid")])
def test_bad_page_ranges(spec, message):
    with pytest.raises(MediaError, match=message):
        parse_pages(spec, 5, "doc.pdf")


def test_bad_pdfs(tmp_path, pdf):
    corrupt = tmp_path / "corrupt.pdf"
    corrupt.write_bytes(b"%PDF-1.7\n" + os.urandom(300))
    with pytest.raises(MediaError, match="corrupt.pdf.*corrupt"):
        render_pdf(corrupt)
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(pdf).pages:
        writer.add_page(page)
    writer.encrypt("secret")
    enc = tmp_path / "locked.pdf"
    with open(enc, "wb") as f:
        writer.write(f)
    with pytest.raises(MediaError, match="locked.pdf.*encrypted"):
        render_pdf(enc)
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        render_pdf(empty)
    with pytest.raises(MediaError, match="outside"):
        render_pdf(pdf, "4-5")
    no_pages = tmp_path / "nopages.pdf"
    with open(no_pages, "wb") as f:
        PdfWriter().write(f)
    with pytest.raises(MediaError, match="nopages.pdf.*no pages"):
        render_pdf(no_pages)


def test_deck_without_libreoffice_names_the_package(tmp_path, monkeypatch):
    deck = tmp_path / "slides.pptx"
    deck.write_bytes(b"PK\x03\x04 not really a deck")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(MediaError, match="slides.pptx.*LibreOffice.*libreoffice-impress"):
        office_to_pdf(deck)


# -- video ---------------------------------------------------------------------------------------------
def test_video_sampled_at_two_fps_with_timestamps(tmp_path):
    video = load_video(make_video(tmp_path / "clip.mp4", seconds=3.0))
    n = video.frames.shape[0]
    assert n % 2 == 0 and 6 <= n <= 8
    assert video.timestamps[:4] == [0.0, 0.5, 1.0, 1.5]
    assert video.frames[0, ..., 0].mean() < video.frames[-1, ..., 0].mean()  # the colour ramp is visible


def test_bad_videos(tmp_path):
    good = make_video(tmp_path / "clip.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good[: len(good) // 5])
    with pytest.raises(MediaError, match="cut.mp4"):
        load_video(cut)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(MediaError, match="junk.mp4"):
        load_video(junk)


def test_load_inputs_dispatches(tmp_path, pdf):
    assert len(load_inputs(pdf, pages="1-2")) == 2
    assert load_inputs(make_video(tmp_path / "v.mp4"))[0].frames.ndim == 4
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes())
    assert load_inputs(img)[0].size == (64, 48)


# -- the real path: CLI on the tiny model -----------------------------------------------------------------
def glmv(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "glmv.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


@pytest.mark.slow
def test_cli_pdf_video_and_ocr_per_page(tmp_path, pdf, tiny_path):
    p = glmv("ask", str(pdf), "--pages", "1-2", "--pdf-long-side", "560", "-p", "summarize", "--model", "tiny",
             "--max-new-tokens", "3", "--json")
    assert p.returncode == 0, p.stderr
    two = json.loads(p.stdout)["usage"]["prompt_tokens"]
    p = glmv("ask", str(pdf), "--pages", "1", "--pdf-long-side", "560", "-p", "summarize", "--model", "tiny",
             "--max-new-tokens", "3", "--json")
    one = json.loads(p.stdout)["usage"]["prompt_tokens"]
    assert two > one > 100  # both pages' visual tokens are in one prompt
    p = glmv("ocr", str(pdf), "--pdf-long-side", "560", "--model", "tiny", "--max-new-tokens", "3", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert [pg["source"].rsplit("=", 1)[1] for pg in data["pages"]] == ["1", "2", "3"]
    video = make_video(tmp_path / "clip.mp4")
    p = glmv("ask", str(video), "-p", "what happens?", "--model", "tiny", "--max-new-tokens", "3", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["usage"]["prompt_tokens"] > 20
    p = glmv("ask", str(pdf), "--pages", "5-6", "--model", "tiny")
    assert p.returncode == 2 and "outside" in p.stderr and "report.pdf" in p.stderr


# -- batch ---------------------------------------------------------------------------------------------
def batch_folder(root: Path, n_images: int = 3) -> Path:
    src = root / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(n_images):
        (src / ("sub" if i % 2 else "") / f"img{i:02d}.png").write_bytes(png_bytes((200 + 28 * i, 150), (i * 40, 90, 200)))
    make_pdf(src / "doc.pdf", 3)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)
    (src / "notes.txt").write_text("not an input")
    return src


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_batch_end_to_end_resume_and_retry(tmp_path, tiny_path):
    src = batch_folder(tmp_path)
    out = tmp_path / "out"
    args = ["batch", str(src), "--out", str(out), "--model", "tiny", "--max-new-tokens", "4", "--pdf-long-side", "560",
            "--format", "both", "--batch-size", "3"]
    p = glmv(*args)
    assert p.returncode == 1, p.stderr  # broken.jpg failed; the batch still finished
    assert "skipped" in p.stderr and "notes.txt" in p.stderr and "broken.jpg" in p.stderr
    recs = manifest(out)
    done = {r["id"] for r in recs if r["status"] == "done"}
    assert done == {"img00.png", "sub/img01.png", "img02.png", "doc.pdf#page=1", "doc.pdf#page=2", "doc.pdf#page=3"}
    assert [r["id"] for r in recs if r["status"] == "failed"] == ["broken.jpg"]
    for r in recs:
        if r["status"] == "done":
            assert r["completion_tokens"] == 4 and all((out / o).exists() for o in r["outputs"])
    joined = (out / "doc.pdf.md").read_text()
    assert joined.index("<!-- page 1 -->") < joined.index("<!-- page 2 -->") < joined.index("<!-- page 3 -->")
    assert json.loads((out / "sub" / "img01.png.json").read_text())["usage"]["completion_tokens"] == 4
    # rerun: nothing to do
    p = glmv(*args)
    assert "0 to do" in p.stderr and len(manifest(out)) == len(recs)
    # retry the failure after fixing the file
    (src / "broken.jpg").write_bytes(png_bytes())
    p = glmv(*args, "--retry-failed")
    assert p.returncode == 0, p.stderr
    assert manifest(out)[-1]["id"] == "broken.jpg" and manifest(out)[-1]["status"] == "done"


@pytest.mark.slow
def test_batch_survives_kill_9(tmp_path, tiny_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(10):
        (src / f"p{i:02d}.png").write_bytes(png_bytes((300, 200), (i * 20, 50, 100)))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "glmv.cli", "batch", str(src), "--out", str(out), "--model", "tiny",
            "--max-new-tokens", "60", "--batch-size", "1", "--format", "both"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "manifest.jsonl").exists() and sum(1 for r in manifest(out) if r["status"] == "done") >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {r["id"] for r in manifest(out) if r["status"] == "done"}
    assert 3 <= len(first) < 10
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    recs = manifest(out)
    done = [r["id"] for r in recs if r["status"] == "done"]
    assert sorted(done) == sorted(f"p{i:02d}.png" for i in range(10))  # every item done exactly once
    assert not list(out.rglob("*.tmp"))  # no partial files
    for i in range(10):
        assert json.loads((out / f"p{i:02d}.png.json").read_text())["usage"]["completion_tokens"] == 60


def test_batch_bad_output_folder_and_missing_prompt(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = glmv("batch", str(tmp_path), "--out", str(blocker / "out"), "--model", "tiny")
    assert p.returncode == 2 and "output folder" in p.stderr
    p = glmv("batch", str(tmp_path), "--out", str(tmp_path / "o"), "--task", "ask", "--model", "tiny")
    assert p.returncode == 2 and "needs a prompt" in p.stderr
