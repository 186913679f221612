from __future__ import annotations

import base64
import http.server
import io
import threading

import pytest
from PIL import Image

from conftest import bomb_png, png_bytes
from glmv.errors import MediaError
from glmv.media import fit_to_pixels, load_image, sniff_format


def test_png_path(sample_png):
    img = load_image(sample_png)
    assert img.size == (64, 48) and img.image.mode == "RGB"


def test_data_uri_and_bytes_and_stdin():
    data = png_bytes((10, 20))
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert load_image(uri).size == (10, 20)
    assert load_image(data).size == (10, 20)
    assert load_image("-", stdin=io.BytesIO(data)).size == (10, 20)


def test_jpeg_webp_and_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 128, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    p = tmp_path / "rot.jpg"
    img.save(p, format="JPEG", exif=exif)
    assert load_image(p).size == (20, 40)
    w = tmp_path / "x.webp"
    img.save(w, format="WEBP")
    assert load_image(w).size == (40, 20)


def test_transparency_becomes_white(tmp_path):
    p = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(p)
    assert load_image(p).image.getpixel((0, 0)) == (255, 255, 255)


def test_downscaled_to_pixel_budget(tmp_path):
    p = tmp_path / "big.png"
    Image.new("RGB", (4000, 3000), "white").save(p)
    img = load_image(p, max_pixels=1_000_000)
    w, h = img.size
    assert w * h <= 1_000_000 and abs(w / h - 4 / 3) < 0.01
    assert img.original_size == (4000, 3000)


def test_fit_to_pixels_keeps_small_images():
    assert fit_to_pixels(100, 50, 10_000) == (100, 50)


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda d: None, "no such file"),
        (lambda d: d.mkdir(), "directory"),
        (lambda d: d.write_bytes(b""), "empty (0 bytes)"),
        (lambda d: d.write_text("hello, I am text\n"), "not a PNG/JPEG"),
        (lambda d: d.write_bytes(png_bytes((200, 200))[:60]), "truncated or corrupt"),
        (lambda d: d.write_bytes(b"%PDF-1.7\n..."), "a PDF document"),
    ],
    ids=["missing", "directory", "zero-bytes", "text-named-png", "truncated-png", "pdf"],
)
def test_bad_files_name_the_input(tmp_path, make, expected):
    p = tmp_path / "input.png"
    make(p)
    with pytest.raises(MediaError) as e:
        load_image(p)
    assert str(p) in str(e.value) and expected in str(e.value)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((300, 300), 50).convert("RGB").save(buf, format="JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(MediaError, match="truncated or corrupt"):
        load_image(p)


@pytest.mark.parametrize("side", [10_000, 50_000])
def test_decompression_bomb_refused_before_decoding(tmp_path, side):
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png(side, side))
    with pytest.raises(MediaError, match="safety cap"):
        load_image(p)


def test_sniff_ignores_file_name():
    assert sniff_format(png_bytes()) == "PNG"
    assert sniff_format(b"GIF89a....") == "GIF"
    assert sniff_format(b"hello") is None


def test_bad_data_uri():
    with pytest.raises(MediaError, match="malformed data URI"):
        load_image("data:image/png;base64")
    with pytest.raises(MediaError, match="not a PNG"):
        load_image("data:image/png;base64,aGVsbG8=")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/ok.png":
            body = png_bytes((12, 34))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *a):
        pass


@pytest.fixture
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_url_fetch_and_errors(http_server):
    assert load_image(f"{http_server}/ok.png").size == (12, 34)
    with pytest.raises(MediaError, match="HTTP 404"):
        load_image(f"{http_server}/missing.png")
    with pytest.raises(MediaError, match="disabled"):
        load_image(f"{http_server}/ok.png", allow_remote=False)


def test_unreachable_url():
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(MediaError, match="cannot fetch image 'http://127.0.0.1:9/x.png'"):
        load_image("http://127.0.0.1:9/x.png")
