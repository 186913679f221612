"""PDFs, decks and video (files made by the tests), and the batch runner, on the tiny model."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import REPO, glmv_in_process, png_bytes
from glmv.documents import inspect_pdf, load_inputs, load_video, office_to_pdf, parse_pages, pdf_page_count, render_pdf
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


def pdf_claiming(count: int, real: int = 1, size: tuple[int, int] = (200, 300)) -> bytes:
    """A well-formed PDF with ``real`` pages whose page tree claims ``count`` (a hostile header)."""
    kids = b" ".join(b"%d 0 R" % (3 + i) for i in range(real))
    objs = [b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[%s]/Count %d>>" % (kids, count)]
    objs += [b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 %d %d]>>" % size] * real
    return _pdf_file(objs)


def text_pdf(n_pages: int = 3, lines: int = 30) -> bytes:
    """A PDF of real text in two standard fonts: rendering it exercises PDFium's shared font caches."""
    fonts = [b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>", b"<</Type/Font/Subtype/Type1/BaseFont/Times-Roman>>"]
    objs, kids = [b"<</Type/Catalog/Pages 2 0 R>>", b"", *fonts], []
    for p in range(n_pages):
        text = b" ".join(b"(Line %d of page %d: the quick brown fox) Tj 0 -14 Td /F%d 11 Tf" % (i, p + 1, 1 + i % 2)
                         for i in range(lines))
        content = b"BT /F1 12 Tf 50 750 Td " + text + b" ET"
        objs.append(b"<</Length %d>>stream\n%s\nendstream" % (len(content), content))
        objs.append(b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Contents %d 0 R"
                    b"/Resources<</Font<</F1 3 0 R/F2 4 0 R>>>>>>" % len(objs))
        kids.append(len(objs))
    objs[1] = b"<</Type/Pages/Kids[%s]/Count %d>>" % (b" ".join(b"%d 0 R" % k for k in kids), n_pages)
    return _pdf_file(objs)


def _pdf_file(objs: list[bytes]) -> bytes:
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i + 1, obj)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)


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


@pytest.mark.parametrize("spec,message", [("7-9", "outside"), ("x", "invalid page range"), ("3-1", "invalid page range"),
                                          ("0", "invalid"), ("1-2" + ",1" * 600, "over 1000"), (",,", "selects no pages"),
                                          ("-3-", "invalid page range"), ("9" * 900 + "-", "outside")])
def test_bad_page_ranges(spec, message):
    with pytest.raises(MediaError, match=message):
        parse_pages(spec, 5, "doc.pdf")


def test_page_ranges_are_linear_and_clamped():
    # Open and overlong ends stop at the real last page; repeats are dropped; the order given is kept.
    assert parse_pages("3-999999999,1,2-", 5) == [2, 3, 4, 0, 1]
    t0 = time.perf_counter()
    assert len(parse_pages("1-", 1_000_000)) == 1_000_000
    assert len(parse_pages(",".join(["1-"] * 300), 20_000)) == 20_000  # quadratic before: 300 x 20,000 list scans
    assert time.perf_counter() - t0 < 2.0


def test_header_claiming_a_million_pages(tmp_path):
    """PDFium believes /Count; glmv counts the pages that exist, so nothing lists or renders phantom pages."""
    liar = tmp_path / "liar.pdf"
    liar.write_bytes(pdf_claiming(1_000_000, real=2))
    t0 = time.perf_counter()
    assert pdf_page_count(liar) == 2
    assert [p.source for p in render_pdf(liar, "1-")] == [f"{liar}#page=1", f"{liar}#page=2"]
    with pytest.raises(MediaError, match="outside .*liar.pdf.* 2 page"):
        render_pdf(liar, "999999")
    assert time.perf_counter() - t0 < 2.0
    zero = tmp_path / "phantom.pdf"
    zero.write_bytes(pdf_claiming(1_000_000, real=0))
    with pytest.raises(MediaError, match="phantom.pdf.*(no readable pages|no pages|corrupt)"):
        render_pdf(zero)
    info = inspect_pdf(pdf_claiming(3, real=3, size=(612, 792)), "2-")
    assert (info.n_pages, info.indices, info.sizes_pt) == (3, [1, 2], [(612.0, 792.0)] * 2)


def test_page_too_large_to_render_is_refused_before_rendering(tmp_path):
    huge = tmp_path / "poster.pdf"
    huge.write_bytes(pdf_claiming(1, size=(14400, 14400)))  # 200 x 200 inches, PDF's largest page
    with pytest.raises(MediaError, match="poster.pdf.*safety cap.*--dpi"):
        render_pdf(huge, dpi=300)
    assert render_pdf(huge, long_side=500)[0].size == (500, 500)


def test_many_threads_rendering_at_once(tmp_path):
    """The batch runner, the server and the web app call in from several threads; PDFium and PyAV must hold.

    PDFium is not thread-safe: without its lock this test dies at once (segfault, 'free(): invalid next size',
    4 runs out of 4 when it was written). Twenty rounds of eight threads rendering text PDFs (fonts are
    PDFium's shared state), counting pages of a normal and a lying PDF, and decoding a video.
    """
    text = text_pdf(n_pages=2)
    liar = tmp_path / "liar.pdf"
    liar.write_bytes(pdf_claiming(1_000_000, real=2))
    clip = make_video(tmp_path / "clip.mp4", seconds=0.5)

    def work(job: tuple[str, Any]) -> int:
        kind, source = job
        if kind == "video":
            return load_video(source, max_pixels=20_000).frames.shape[0]
        if kind == "count":
            return pdf_page_count(source)
        return len(render_pdf(source, long_side=400))

    jobs = [("render", text)] * 5 + [("render", liar), ("count", text), ("count", liar)] + [("video", clip)] * 2
    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):
            assert list(pool.map(work, jobs)) == [2] * 10


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


def _prefill_embeddings(backend, request):
    """The language model's input embeddings for a request's prompt, and the prompt's token types."""
    import torch

    from glmv.backends.base import collect

    inputs, _ = backend.prepare(request)
    seen = []
    hook = backend.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        collect(backend.generate(request))
    finally:
        hook.remove()
    return seen[0][0], inputs["mm_token_type_ids"][0], torch


def test_image_and_video_in_one_prompt(tiny_backend, tmp_path):
    """transformers' GLM-4.6V masks image and video placeholders by one token id; with both in a prompt each
    must still land in its own slots: the mixed prompt's image and video embeddings equal those of the
    image alone and the video alone."""
    from glmv.backends.base import GenerationRequest
    from glmv.media import load_image
    from glmv.prompts import user_message

    image = load_image(Image.new("RGB", (112, 84), (200, 40, 40)))
    video = load_video(make_video(tmp_path / "clip.mp4", seconds=1.0), max_pixels=20_000)
    sampling = tiny_backend.default_sampling.merged(max_new_tokens=1, temperature=0)

    def embeddings(*media):
        emb, types, torch = _prefill_embeddings(tiny_backend, GenerationRequest([user_message("compare", list(media))],
                                                                                sampling=sampling))
        return emb[types == 1], emb[types == 2], torch

    img_alone, _, torch = embeddings(image)
    _, vid_alone, _ = embeddings(video)
    for order in ((image, video), (video, image)):
        img_mixed, vid_mixed, _ = embeddings(*order)
        assert img_mixed.shape == img_alone.shape and vid_mixed.shape == vid_alone.shape
        assert torch.allclose(img_mixed, img_alone, atol=1e-5) and torch.allclose(vid_mixed, vid_alone, atol=1e-5)


def test_cli_asks_about_an_image_and_a_video_together(tmp_path, tiny_path):
    from glmv.cli import main

    img = tmp_path / "a.png"
    img.write_bytes(png_bytes((100, 80)))
    clip = make_video(tmp_path / "c.mp4", seconds=1.0)
    out, err = io.StringIO(), io.StringIO()
    code = main(["ask", str(img), str(clip), "-p", "what changes?", "--model", str(tiny_path), "--max-new-tokens", "2",
                 "--json"], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert json.loads(out.getvalue())["usage"]["completion_tokens"] == 2


def test_video_is_never_batched_with_images():
    import threading

    from glmv.backends.scheduler import Job, _batch_key
    from glmv.settings import SamplingParams

    def job(*keys):
        return Job(inputs={k: None for k in ("input_ids", *keys)}, sampling=SamplingParams(), max_new_tokens=8,
                    cancel=threading.Event(), seed=None)

    text, image, video, mixed = job(), job("pixel_values"), job("pixel_values_videos"), job("pixel_values", "pixel_values_videos")
    assert _batch_key(text) == _batch_key(image)
    assert len({_batch_key(image), _batch_key(video), _batch_key(mixed)}) == 3


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
    p = glmv_in_process("ask", str(pdf), "--pages", "1-2", "--pdf-long-side", "560", "-p", "summarize",
                        "--model", "tiny", "--max-new-tokens", "3", "--json")
    assert p.returncode == 0, p.stderr
    two = json.loads(p.stdout)["usage"]["prompt_tokens"]
    p = glmv_in_process("ask", str(pdf), "--pages", "1", "--pdf-long-side", "560", "-p", "summarize",
                        "--model", "tiny", "--max-new-tokens", "3", "--json")
    one = json.loads(p.stdout)["usage"]["prompt_tokens"]
    assert two > one > 100  # both pages' visual tokens are in one prompt
    p = glmv_in_process("ocr", str(pdf), "--pdf-long-side", "560", "--model", "tiny", "--max-new-tokens", "3", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert [pg["source"].rsplit("=", 1)[1] for pg in data["pages"]] == ["1", "2", "3"]
    video = make_video(tmp_path / "clip.mp4")
    p = glmv_in_process("ask", str(video), "-p", "what happens?", "--model", "tiny", "--max-new-tokens", "3", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["usage"]["prompt_tokens"] > 20
    p = glmv_in_process("ask", str(pdf), "--pages", "5-6", "--model", "tiny")
    assert p.returncode == 2 and "outside" in p.stderr and "report.pdf" in p.stderr


# -- batch ---------------------------------------------------------------------------------------------
def batch_folder(root: Path, n_images: int = 3) -> Path:
    src = root / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(n_images):
        (src / ("sub" if i % 2 else "") / f"img{i:02d}.png").write_bytes(png_bytes((200 + 28 * i, 150), (i * 40, 90, 200)))
    make_pdf(src / "doc.pdf", 3)
    make_video(src / "clip.mp4", seconds=1.0)  # in flight with the images: the engine must not batch them together
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
    p = glmv_in_process(*args)
    assert p.returncode == 1, p.stderr  # broken.jpg failed; the batch still finished
    assert "skipped" in p.stderr and "notes.txt" in p.stderr and "broken.jpg" in p.stderr
    recs = manifest(out)
    done = {r["id"] for r in recs if r["status"] == "done"}
    assert done == {"img00.png", "sub/img01.png", "img02.png", "clip.mp4", "doc.pdf#page=1", "doc.pdf#page=2",
                    "doc.pdf#page=3"}
    assert [r["id"] for r in recs if r["status"] == "failed"] == ["broken.jpg"]
    for r in recs:
        if r["status"] == "done":
            assert r["completion_tokens"] == 4 and all((out / o).exists() for o in r["outputs"])
    joined = (out / "doc.pdf.md").read_text()
    assert joined.index("<!-- page 1 -->") < joined.index("<!-- page 2 -->") < joined.index("<!-- page 3 -->")
    assert json.loads((out / "sub" / "img01.png.json").read_text())["usage"]["completion_tokens"] == 4
    # rerun: nothing to do
    p = glmv_in_process(*args)
    assert "0 to do" in p.stderr and len(manifest(out)) == len(recs)
    # retry the failure after fixing the file
    (src / "broken.jpg").write_bytes(png_bytes())
    p = glmv_in_process(*args, "--retry-failed")
    assert p.returncode == 0, p.stderr
    assert manifest(out)[-1]["id"] == "broken.jpg" and manifest(out)[-1]["status"] == "done"


def test_batch_bad_output_folder_and_missing_prompt(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = glmv("batch", str(tmp_path), "--out", str(blocker / "out"), "--model", "tiny")
    assert p.returncode == 2 and "output folder" in p.stderr
    p = glmv("batch", str(tmp_path), "--out", str(tmp_path / "o"), "--task", "ask", "--model", "tiny")
    assert p.returncode == 2 and "needs a prompt" in p.stderr


@pytest.mark.parametrize("flags, message", [
    (["--dpi", "nan"], "invalid --dpi nan"), (["--dpi", "inf"], "invalid --dpi inf"), (["--dpi", "-5"], "invalid --dpi -5"),
    (["--dpi", "0"], "invalid --dpi 0"), (["--dpi", "1e-300"], "invalid --dpi 1e-300"),
    (["--pdf-long-side", "-3"], "invalid --pdf-long-side -3"), (["--pdf-long-side", "0"], "invalid --pdf-long-side 0"),
])
def test_render_resolution_that_is_not_a_positive_number_is_refused(tmp_path, pdf, flags, message):
    """Before: NaN/inf gave 'unexpected ValueError', negatives PDFium's 'Crop exceeds page dimensions', and 0 or
    1e-300 were accepted (the default, or 1-pixel pages)."""
    from glmv.cli import main

    for command in (["ask", str(pdf), "-p", "x"], ["batch", str(pdf), "--out", str(tmp_path / "out")]):
        err = io.StringIO()
        assert main([*command, *flags, "--model", "tiny"], stdout=io.StringIO(), stderr=err) == 2
        assert err.getvalue().startswith(f"error: {message}") and err.getvalue().count("\n") == 1
    assert not (tmp_path / "out").exists()
