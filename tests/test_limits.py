"""Work budgets: over-limit requests and commands are refused from headers and page counts, before any
decoding or rendering, within a second, naming the limit and how to raise it (CLI and a live server)."""

from __future__ import annotations

import base64
import io
import time

import httpx
import openai
import pytest
from PIL import Image

from conftest import bomb_png, png_bytes
from glmv.cli import main
from glmv.errors import ContextLengthError, LimitError, RequestError
from glmv.limits import Budget, Limits, image_tokens, video_tokens
from glmv.server.app import ServerConfig
from glmv.testing.scripted import ScriptedBackend
from test_documents import make_video, pdf_claiming
from test_server import serve_in_thread


def big_png(side: int = 2000) -> bytes:
    """A 2000x2000 PNG of one colour: 4 Mpx decoded, a few KB on the wire (the issue's attack shape)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


# -- the budget itself -------------------------------------------------------------------------------
def test_limits_are_validated():
    assert Limits().merged(max_images=3, max_prompt_tokens=None).max_images == 3
    for bad in ({"max_images": 0}, {"max_total_pixels": -1}, {"max_text_chars": 1.5}, {"max_pdf_pages": True}):
        with pytest.raises(RequestError, match="invalid --max-"):
            Limits(**bad)


def test_flags_on_every_command_that_takes_media():
    from glmv.cli import build_parser
    from glmv.limits import limits_from_args

    for command in ("ask", "ocr", "html", "serve"):
        args = build_parser().parse_args([command, "--max-images", "5", "--max-prompt-tokens", "9000"])
        assert limits_from_args(args) == Limits(max_images=5, max_prompt_tokens=9000)
    assert limits_from_args(build_parser().parse_args(["serve"])) == Limits()


def test_token_estimate_follows_the_processor():
    assert image_tokens(1288, 728) == 46 * 26  # 1196, the measured prompt's visual tokens
    assert image_tokens(2000, 2000) == 71 * 71
    # A video is capped by the processor's per-video pixel budget, however long it is.
    assert video_tokens(600, 1000, 700) < video_tokens(600, 1000, 700) * 2 <= 2 * (47_040_000 // 1568 + 600 * 8)


@pytest.mark.parametrize("limits,action,limit", [
    (Limits(max_images=2), lambda b: [b.add_image("x.png", (10, 10), (10, 10)) for _ in range(3)], "max_images"),
    (Limits(max_total_pixels=10**6), lambda b: b.add_image("x.png", (2000, 2000), (1000, 1000)), "max_total_pixels"),
    (Limits(max_pdf_pages=5), lambda b: b.add_pages("doc.pdf", [(100, 100)] * 6, [(100, 100)] * 6), "max_pdf_pages"),
    (Limits(max_video_frames=10), lambda b: b.add_video("clip.mp4", 12, (100, 100)), "max_video_frames"),
    (Limits(max_text_chars=100), lambda b: b.add_text("x" * 101), "max_text_chars"),
    (Limits(max_images=4), lambda b: b.count_images(5), "max_images"),
])
def test_each_limit_names_itself_and_its_flag(limits, action, limit):
    with pytest.raises(LimitError) as e:
        action(Budget(limits))
    assert e.value.limit == limit and e.value.status == 413
    assert f"({limit})" in str(e.value) and f"--{limit.replace('_', '-')}" in str(e.value)


def test_prompt_token_estimate_against_the_context():
    budget = Budget(Limits(max_total_pixels=10**9), context_tokens=131072)
    with pytest.raises(ContextLengthError, match="about 1[0-9,]+ tokens .* limit is 131,072"):
        for _ in range(40):  # 40 images of 4 Mpx: ~5,000 tokens each
            budget.add_image("p.png", (2000, 2000), (2000, 2000))
    assert budget.images == 27  # 26 x 5,041 tokens fit in 131,072; the 27th does not
    # OCR sends one prompt per page: the same pages fit when each is its own prompt.
    per_page = Budget(Limits(max_total_pixels=10**9), context_tokens=131072, separate_prompts=True)
    for _ in range(40):
        per_page.add_image("p.png", (2000, 2000), (2000, 2000))
    with pytest.raises(ContextLengthError, match="--max-prompt-tokens"):
        Budget(Limits(max_prompt_tokens=1000)).add_text("word " * 1000)


# -- the CLI: error and exit 2, before any model is built -------------------------------------------------
def _never(settings):
    raise AssertionError("the budget should have refused before the backend was built")


def run_cli(*argv: str, backend=_never) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    code = main(list(argv), backend_factory=backend, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - t0


def test_cli_refuses_over_limit_work_fast(tmp_path):
    hundred = tmp_path / "hundred.pdf"
    hundred.write_bytes(pdf_claiming(100, real=100))
    png = tmp_path / "big.png"
    png.write_bytes(big_png())
    cases = [
        (["ask", str(hundred), "-p", "x"], "100 PDF pages, over the limit of 64 (max_pdf_pages)"),
        (["ask", str(hundred), "--pages", "1-10", "--max-pdf-pages", "5", "-p", "x"], "(max_pdf_pages)"),
        (["ask", *[str(png)] * 30, "-p", "x"], "(max_total_pixels)"),
        (["ask", *[str(png)] * 3, "--max-images", "2", "-p", "x"], "3 images, over the limit of 2 (max_images)"),
        (["ask", str(png), "--max-prompt-tokens", "500", "-p", "x"], "--max-prompt-tokens"),
        (["ask", str(png), "-p", "x" * 2000, "--max-text-chars", "1000"], "(max_text_chars)"),
        (["ask", str(png), "--max-images", "0"], "invalid --max-images 0"),
    ]
    for argv, expected in cases:
        code, out, err, seconds = run_cli(*argv)
        assert code == 2 and err.startswith("error: ") and expected in err, (argv, err)
        assert "Traceback" not in err and out == "" and seconds < 1.5, (argv, seconds)


def test_shapes_the_model_cannot_take_are_refused_before_decoding(tmp_path):
    strip = tmp_path / "strip.png"
    strip.write_bytes(png_bytes((20_000, 50)))
    ribbon = tmp_path / "ribbon.pdf"
    ribbon.write_bytes(pdf_claiming(1, size=(14_400, 10)))
    for path, expected in ((strip, "strip.png': it is 20000x50 pixels, more than 200 times"),
                           (ribbon, "ribbon.pdf#page=1': it is 1600x1 pixels")):
        code, _, err, seconds = run_cli("ask", str(path), "-p", "x")
        assert code == 2 and expected in err and seconds < 1.5, err


def test_cli_pdf_with_a_lying_header_and_raised_limits(tmp_path):
    liar = tmp_path / "liar.pdf"
    liar.write_bytes(pdf_claiming(1_000_000, real=2))
    backend = ScriptedBackend("two pages")
    code, out, err, _ = run_cli("ask", str(liar), "--pages", "1-", "-p", "what is this?", "--json",
                                backend=lambda settings: backend)
    assert code == 0 and "two pages" in out, err
    assert len(backend.requests[0].messages[-1].images) == 2  # the real pages, not a million
    hundred = tmp_path / "hundred.pdf"
    hundred.write_bytes(pdf_claiming(100, real=100, size=(100, 100)))
    code, out, err, _ = run_cli("ask", str(hundred), "--max-pdf-pages", "100", "--max-images", "100",
                                "--pdf-long-side", "56", "-p", "x", backend=lambda settings: ScriptedBackend("ok"))
    assert code == 0, err


def test_cli_video_frames_limit(tmp_path):
    clip = make_video(tmp_path / "clip.mp4", seconds=3.0)
    code, _, err, seconds = run_cli("ask", str(clip), "--max-video-frames", "4", "-p", "x")
    assert code == 2 and "8 video frames (2 a second), over the limit of 4 (max_video_frames)" in err, err


def test_web_app_chat_upload_over_the_limits(tmp_path):
    from glmv.errors import GlmvError
    from test_ui import make_app

    app, backend = make_app(tmp_path, "never")
    hundred = tmp_path / "hundred.pdf"
    hundred.write_bytes(pdf_claiming(100, real=100))
    t0 = time.perf_counter()
    with pytest.raises(GlmvError, match="100 PDF pages, over the limit of 64 .max_pdf_pages."):
        list(app.chat({"text": "summarize", "files": [{"path": str(hundred)}]}, [], [], True, False, True, 16, "s"))
    assert time.perf_counter() - t0 < 1.5 and not backend.requests


# -- the server: 413 with an OpenAI error body, before decoding -----------------------------------------
@pytest.fixture(scope="module")
def live():
    backend = ScriptedBackend("fine")
    with serve_in_thread(backend, ServerConfig(model_name="scripted")) as url:
        yield url, backend


def post(url: str, content: list, **extra) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                   json={"model": "scripted", "messages": [{"role": "user", "content": content}], **extra})
    return r, time.perf_counter() - t0


def image_part(uri: str) -> dict:
    return {"type": "image_url", "image_url": {"url": uri}}


def test_server_refuses_200_big_pngs_before_decoding(live):
    url, backend = live
    n_before = len(backend.requests)
    parts = [{"type": "text", "text": "compare"}] + [image_part(data_uri(big_png()))] * 200
    r, seconds = post(url, parts)
    assert r.status_code == 413 and seconds < 1.5, (r.status_code, seconds)
    err = r.json()["error"]
    assert err["code"] == "limit_exceeded" and err["param"] == "max_images" and "--max-images" in err["message"]
    assert len(backend.requests) == n_before  # nothing reached the model


def test_server_refuses_a_small_pdf_with_many_pages(live):
    url, _ = live
    pdf = pdf_claiming(100, real=100)
    assert len(pdf) < 150_000
    part = {"type": "file", "file": {"filename": "many.pdf", "file_data": data_uri(pdf, "application/pdf")}}
    r, seconds = post(url, [{"type": "text", "text": "summarize"}, part])
    assert r.status_code == 413 and seconds < 1.5
    assert "100 PDF pages" in r.json()["error"]["message"] and r.json()["error"]["param"] == "max_pdf_pages"


def test_server_limits_from_config_and_the_openai_client(tmp_path):
    limits = Limits(max_images=100, max_total_pixels=30_000_000, max_video_frames=4)
    with serve_in_thread(ScriptedBackend("ok"), ServerConfig(model_name="scripted", limits=limits)) as url:
        # Under the count, over the pixels: refused from the PNG headers, within a second.
        r, seconds = post(url, [image_part(data_uri(big_png()))] * 10)
        assert r.status_code == 413 and seconds < 1.5 and r.json()["error"]["param"] == "max_total_pixels"
        clip = make_video(tmp_path / "clip.mp4", seconds=3.0)
        r, _ = post(url, [{"type": "video_url", "video_url": {"url": data_uri(clip.read_bytes(), "video/mp4")}}])
        assert r.status_code == 413 and r.json()["error"]["param"] == "max_video_frames"
        # A decompression bomb's header is refused before decoding, as a 400.
        r, _ = post(url, [image_part(data_uri(bomb_png(50_000, 50_000)))])
        assert r.status_code == 400 and "safety cap" in r.json()["error"]["message"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": [
                image_part(data_uri(big_png()))] * 8}])
        assert e.value.status_code == 413 and "max_total_pixels" in e.value.message
        ok = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, image_part(data_uri(png_bytes()))]}])
        assert ok.choices[0].message.content == "ok"


def test_server_mixed_pdf_and_images_count_together(live):
    url, _ = live
    pdf = make_pdf_bytes(40)
    part = {"type": "file", "file": {"filename": "forty.pdf", "file_data": data_uri(pdf, "application/pdf")}}
    r, _ = post(url, [part] + [image_part(data_uri(png_bytes()))] * 30)
    assert r.status_code == 413 and "65 images, over the limit of 64 (max_images)" in r.json()["error"]["message"]


def make_pdf_bytes(n: int) -> bytes:
    return pdf_claiming(n, real=n, size=(1000, 100))  # wide strips: 1600x160 pixels each at the default size
