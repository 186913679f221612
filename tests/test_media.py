from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time
import urllib.parse

import pytest
from PIL import Image

from conftest import bomb_png, png_bytes
from glmv.errors import MediaError
from glmv.media import RemotePolicy, address_refusal, fit_to_pixels, load_image, sniff_format


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



def test_full_image_gives_back_the_original_pixels(tmp_path):
    """Outputs in the input's own pixels (grounding) need the original: decoded again from the kept bytes, the
    caller's PIL image, or (nothing kept) the scaled image enlarged back; an unscaled image is kept as is."""
    from glmv.media import LoadedImage

    src = Image.effect_noise((300, 200), 64).convert("RGB")
    p = tmp_path / "noise.png"
    src.save(p)
    scaled = load_image(p, max_pixels=6_000)
    assert scaled.size == (94, 63) and scaled.full_image().tobytes() == src.tobytes()
    assert load_image(src, max_pixels=6_000).full_image().tobytes() == src.tobytes()
    assert LoadedImage(scaled.image, "page", (300, 200)).full_image().size == (300, 200)
    whole = load_image(p)
    assert whole.origin is None and whole.full_image() is whole.image

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
        (lambda d: d.symlink_to("/dev/zero"), "not a regular file"),  # was read until memory ran out
    ],
    ids=["missing", "directory", "zero-bytes", "text-named-png", "truncated-png", "pdf", "device"],
)
def test_bad_files_name_the_input(tmp_path, make, expected):
    p = tmp_path / "input.png"
    make(p)
    with pytest.raises(MediaError) as e:
        load_image(p)
    assert str(p) in str(e.value) and expected in str(e.value)


def test_unreadable_names_and_oversized_inputs_are_clear_errors(tmp_path, monkeypatch, sample_png):
    """A name too long or with a NUL byte was an unexpected OSError/ValueError; a file, a pipe or standard
    input larger than glmv reads into memory is refused while reading, not after filling memory."""
    from glmv import media

    for name in ("a" * 5000 + ".png", "ok\x00.png"):
        with pytest.raises(MediaError, match="cannot read image"):
            load_image(str(tmp_path / name))
    monkeypatch.setattr(media, "MAX_FILE_BYTES", 50)
    with pytest.raises(MediaError, match="over the 0 GiB"):
        load_image(sample_png)
    with pytest.raises(MediaError, match="standard input: more than"):
        load_image("-", stdin=io.BytesIO(b"x" * 5000))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)

    def feed(data: bytes) -> threading.Thread:
        def write() -> None:
            with open(fifo, "wb") as f:
                f.write(data)
        t = threading.Thread(target=write)
        t.start()
        return t

    t = feed(b"y" * 5000)
    with pytest.raises(MediaError, match="pipe.png': more than"):
        load_image(fifo)
    t.join(5)
    monkeypatch.setattr(media, "MAX_FILE_BYTES", 2**30)
    t = feed(sample_png.read_bytes())  # glmv ask <(cmd): a pipe still works
    assert load_image(fifo).image.size == (64, 48)
    t.join(5)


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


PASSWD = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    """A media host that also plays the hostile parts: redirects inward, loops, lies about sizes, stalls."""

    secret_hits = 0

    def do_GET(self):  # noqa: N802
        port = self.server.server_address[1]
        path = self.path
        if path == "/ok.png":
            self._send(png_bytes((12, 34)))
        elif path == "/passwd.png":  # an internal service's answer must never be echoed
            self._send(PASSWD, "text/plain")
        elif path == "/secret":
            type(self).secret_hits += 1
            self._send(PASSWD, "text/plain")
        elif path.startswith("/to/"):  # /to/<url-encoded target>: a redirect anywhere
            self._redirect(urllib.parse.unquote(path[len("/to/"):]).replace("PORT", str(port)))
        elif path.startswith("/hops/"):  # /hops/N: N more redirects, then the image
            n = int(path.rsplit("/", 1)[1])
            self._redirect(f"/hops/{n - 1}" if n > 1 else "/ok.png")
        elif path == "/huge-header":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif path == "/endless":  # no length, no end: the size limit must stop it
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif path == "/stall":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(3)
        else:
            self.send_error(404)

    def _send(self, body: bytes, ctype: str = "image/png") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    _Handler.secret_hits = 0
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def media_host(**kw) -> RemotePolicy:
    """The policy a test needs to reach its own server: 'media.test' is a trusted host that resolves to
    127.0.0.1. Every other host goes through the real resolver and the real address check."""
    real = RemotePolicy().resolve
    return RemotePolicy(trusted_hosts=frozenset({"media.test"}),
                        resolve=lambda host, port: ["127.0.0.1"] if host == "media.test" else real(host, port), **kw)


def test_url_fetch_and_errors(http_server):
    base = f"http://media.test:{http_server}"
    assert load_image(f"{base}/ok.png", remote=media_host()).size == (12, 34)
    with pytest.raises(MediaError, match="HTTP 404 Not Found"):
        load_image(f"{base}/missing.png", remote=media_host())
    with pytest.raises(MediaError, match="disabled"):
        load_image(f"{base}/ok.png", allow_remote=False)
    assert load_image(f"{base}/hops/3", remote=media_host()).size == (12, 34)  # three redirects are fine
    with pytest.raises(MediaError, match="more than 3 redirects"):
        load_image(f"{base}/hops/4", remote=media_host())


def test_unreachable_url():
    # Port 9 on the test host (loopback): nothing listens, the connection is refused at once.
    with pytest.raises(MediaError, match="cannot fetch image 'http://media.test:9/x.png'.*refused"):
        load_image("http://media.test:9/x.png", remote=media_host())
    with pytest.raises(MediaError, match="cannot resolve 'no-such-host.invalid'"):
        load_image("http://no-such-host.invalid/x.png")


# Each of these reaches this machine or its network; the default policy must refuse them before connecting.
INWARD_HOSTS = [
    "127.0.0.1", "localhost", "0x7f000001", "2130706433", "0177.0.0.1", "127.1", "0.0.0.0", "0",
    "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]",
    "169.254.169.254", "[fe80::1]", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "[fc00::1]",
    "224.0.0.1", "[ff02::1]", "240.0.0.1", "255.255.255.255", "198.18.0.1",
    "user:pw@127.0.0.1", "evil.example\\@127.0.0.1", "[::ffff:169.254.169.254]", "LOCALHOST",
]


@pytest.mark.parametrize("host", INWARD_HOSTS)
def test_inward_addresses_are_refused_before_connecting(http_server, host):
    url = f"http://{host}:{http_server}/secret"
    with pytest.raises(MediaError) as e:
        load_image(url)
    msg = str(e.value)
    assert "refused" in msg and "public" in msg and "root:x" not in msg, msg
    assert _Handler.secret_hits == 0


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "[2001:4860:4860::8888]"[1:-1]])
def test_public_addresses_pass_the_check(address):
    assert address_refusal(address) is None


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:PORT/secret", "http://0x7f000001:PORT/secret", "http://2130706433:PORT/secret",
    "http://[::ffff:127.0.0.1]:PORT/secret", "http://localhost:PORT/secret", "http://169.254.169.254/latest/meta-data/",
    "file:///etc/passwd", "gopher://127.0.0.1:PORT/_x",
])
def test_redirect_into_the_local_network_is_refused_at_the_redirect(http_server, target):
    """An allowed host answers with a redirect inward: the redirect is checked like the first URL."""
    url = f"http://media.test:{http_server}/to/" + urllib.parse.quote(target, safe="")
    with pytest.raises(MediaError) as e:
        load_image(url, remote=media_host())
    msg = str(e.value)
    assert "redirect" in msg and ("refused" in msg or "only http and https" in msg), msg
    assert "root:x" not in msg and _Handler.secret_hits == 0


def test_fetched_bytes_are_never_echoed(http_server):
    with pytest.raises(MediaError) as e:
        load_image(f"http://media.test:{http_server}/passwd.png", remote=media_host())
    assert "root:x" not in str(e.value) and "not a PNG" in str(e.value) and f"{len(PASSWD)} bytes" in str(e.value)


def test_symlink_to_a_system_file_is_not_echoed(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_bytes(PASSWD)
    link = tmp_path / "x.png"
    link.symlink_to(secret)
    with pytest.raises(MediaError) as e:
        load_image(link)
    assert "root:x" not in str(e.value) and "x.png" in str(e.value) and "not a PNG" in str(e.value)
    raw = tmp_path / "raw.png"
    raw.write_bytes(b"\x01\x02secret\xff" * 4)
    with pytest.raises(MediaError) as e:
        load_image(raw)
    assert "secret" not in str(e.value) and "01 02" not in str(e.value) and "36 bytes" in str(e.value)


def test_size_and_time_limits(http_server):
    base = f"http://media.test:{http_server}"
    small = media_host(max_bytes=100_000)
    with pytest.raises(MediaError, match="larger than the 100,000 bytes download limit"):
        load_image(f"{base}/huge-header", remote=small)
    t0 = time.perf_counter()
    with pytest.raises(MediaError, match="download limit"):
        load_image(f"{base}/endless", remote=small)
    with pytest.raises(MediaError, match="within 1 s"):
        load_image(f"{base}/stall", remote=media_host(timeout_s=1.0))
    assert time.perf_counter() - t0 < 3.0


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "gopher://127.0.0.1:70/", "dict://127.0.0.1:11211/"])
def test_other_url_schemes_are_refused(url):
    with pytest.raises(MediaError, match="unsupported URL scheme"):
        load_image(url)


@pytest.fixture
def https_server(tmp_path):
    """An HTTPS media host with a self-signed certificate for 'media.test' (made by the openssl CLI)."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=media.test",
                    "-addext", "subjectAltName=DNS:media.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv.server_address[1], cert
    srv.shutdown()
    srv.server_close()


def test_https_is_verified_for_the_host_name_while_connecting_to_the_checked_address(https_server):
    import ssl

    port, cert = https_server
    trusting = ssl.create_default_context(cafile=str(cert))
    # The certificate names media.test; the connection goes to the address checked for it (127.0.0.1).
    assert load_image(f"https://media.test:{port}/ok.png", remote=media_host(ssl_context=trusting)).size == (12, 34)
    with pytest.raises(MediaError, match="TLS failed.*certificate"):  # self-signed: not trusted by default
        load_image(f"https://media.test:{port}/ok.png", remote=media_host())
    other = RemotePolicy(trusted_hosts=frozenset({"other.test"}), resolve=lambda host, p: ["127.0.0.1"], ssl_context=trusting)
    with pytest.raises(MediaError, match="TLS failed.*(hostname|match)"):  # right address, wrong name
        load_image(f"https://other.test:{port}/ok.png", remote=other)


def test_server_with_remote_media_allowed_still_refuses_inward_urls(http_server):
    """glmv serve --allow-remote-media: images and videos from inward addresses get a 400, nothing is fetched."""
    import httpx

    from glmv.server.app import ServerConfig
    from glmv.testing.scripted import ScriptedBackend
    from test_server import serve_in_thread

    parts = [{"type": "image_url", "image_url": {"url": f"http://{host}:{http_server}/secret"}}
             for host in ("127.0.0.1", "0x7f000001", "[::ffff:127.0.0.1]", "localhost")]
    parts += [{"type": "video_url", "video_url": {"url": f"http://2130706433:{http_server}/secret"}},
              {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}]
    with serve_in_thread(ScriptedBackend("never"), ServerConfig(model_name="s", allow_remote_media=True)) as url:
        for part in parts:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                           json={"messages": [{"role": "user", "content": [part, {"type": "text", "text": "x"}]}]})
            err = r.json()["error"]
            assert r.status_code == 400 and "messages[0].content[0]" in err["message"] and "refused" in err["message"]
            assert "root:x" not in err["message"]
    assert _Handler.secret_hits == 0
