"""Fault suite for ``glmv serve``: hostile requests against one live server on the tiny model.

Every hostile input must get a clear 4xx (an OpenAI error object naming what is wrong; never a 500, and
no traceback in the server's log), the server stays alive throughout, and its memory (VmRSS of the server
process, sampled all along) stays below its idle size + 2 GB. Afterwards 64 concurrent streams still
complete; a client that leaves, streamed or not, running or still queued, frees its slot within a second;
six concurrent PDF requests do not crash it. Inputs are grouped by category (the tables below); their counts
are in docs/reliability.md.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import openai
import pytest

from conftest import bomb_png, png_bytes
from glmv.testing.scripted import ScriptedBackend
from test_server import KEY, concurrent_streams, data_uri, serve_in_thread, serve_process

pytestmark = pytest.mark.slow

BODY_MB = 2  # the fault server's --max-body-mb
LIMIT = BODY_MB * 2**20
MAX_PIXELS = 200_000  # small pages and images keep the tiny model's CPU prefill short
CONTEXT = 131072  # the tiny model's
SECRET = "SECRET-TEXT-4711"  # inside a file named .png in the media folder: must never be echoed
HTTP = httpx.Client()  # one client: a new one per call builds an SSL context (~25 ms of CPU each time)
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json", **AUTH}
HI = [{"role": "user", "content": "hi"}]


@dataclass
class Server:
    url: str
    proc: Any
    log: Any
    idle_kb: int = 0
    peak_kb: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))

    def watch_memory(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak_kb = max(self.peak_kb, self.rss_kb())
            except (OSError, AttributeError):  # the process is gone: the liveness checks report it
                return

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()


@pytest.fixture(scope="module")
def srv(tiny_path, tmp_path_factory):
    media = tmp_path_factory.mktemp("fault-media")
    (media / "ok.png").write_bytes(png_bytes((56, 56)))
    (media / "passwd.png").symlink_to("/etc/passwd")
    (media / "notes.png").write_text(f"{SECRET} is not an image\n")
    os.mkfifo(media / "fifo.png")  # reading it would block the request forever
    info: dict[str, Any] = {}
    with serve_process("--api-key", KEY, "--allowed-media-dir", str(media), "--max-body-mb", str(BODY_MB),
                       "--max-pixels", str(MAX_PIXELS), info=info) as url:
        server = Server(url, info["proc"], info["log"])
        content = [{"type": "image_url", "image_url": {"url": data_uri(png_bytes())}}, {"type": "text", "text": "hi"}]
        warm = HTTP.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                          json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})
        assert warm.status_code == 200
        server.idle_kb = server.peak_kb = server.rss_kb()
        watcher = threading.Thread(target=server.watch_memory, daemon=True)
        watcher.start()
        yield server
        server._stop.set()
        watcher.join(5)


@pytest.fixture(autouse=True)
def _alive_after_each(srv):
    yield
    assert srv.proc.poll() is None, "the server died"
    assert HTTP.get(f"{srv.url}/health", timeout=10).status_code == 200


def body(**fields: Any) -> bytes:
    return json.dumps({"messages": HI, "max_tokens": 2, **fields}).encode()


def post(srv: Server, content: bytes, headers: dict[str, str] | None = None, timeout: float = 60) -> httpx.Response:
    return HTTP.post(f"{srv.url}/v1/chat/completions", content=content,
                      headers=JSON if headers is None else headers, timeout=timeout)


def assert_clear_error(r: httpx.Response, status: int, match: str) -> dict[str, Any]:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["type"]
    assert re.search(match, err["message"]), err["message"]
    assert len(err["message"]) < 1200 and "Traceback" not in r.text and SECRET not in r.text
    return err


# -- 1. bodies that are not a JSON request (18) ----------------------------------------------------------------
PARSE = "could not parse the JSON body"
NOT_OBJECT = "must be a JSON object"
BAD_BODIES = {
    "truncated": (b'{"messages": [', JSON, 400, PARSE),
    "not-json": (b"hello", JSON, 400, PARSE),
    "empty": (b"", JSON, 400, "body is empty"),
    "array": (b"[]", JSON, 400, NOT_OBJECT),
    "string": (b'"x"', JSON, 400, NOT_OBJECT),
    "number": (b"42", JSON, 400, NOT_OBJECT),
    "null": (b"null", JSON, 400, "body is empty|" + NOT_OBJECT),
    "invalid-utf8": (b'{"messages":[{"role":"user","content":"\xff\xfe\xfa"}]}', JSON, 400, PARSE),
    "nested-100k-deep": (b"[" * 100_000 + b"]" * 100_000, JSON, 400, PARSE),
    "nan": (body()[:-1] + b', "temperature": NaN}', JSON, 400, "invalid temperature"),
    "infinity": (body()[:-1] + b', "top_p": Infinity}', JSON, 400, "invalid top_p"),
    "5000-digit-seed": (body()[:-1] + b', "seed": ' + b"9" * 5000 + b"}", JSON, 400, PARSE),
    "1e999999-max-tokens": (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999999}', JSON, 422,
                            "max_tokens"),
    "trailing-garbage": (body() + b"xyz", JSON, 400, PARSE),
    "two-objects": (body() + body(), JSON, 400, PARSE),
    "no-content-type": (body(), AUTH, 400, NOT_OBJECT),
    "text-plain": (body(), {**AUTH, "Content-Type": "text/plain"}, 400, NOT_OBJECT),
    "form-urlencoded": (b"messages=hi", {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}, 400,
                        NOT_OBJECT),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bodies_that_are_not_json_requests(srv, name):
    content, headers, status, match = BAD_BODIES[name]
    assert_clear_error(post(srv, content, headers), status, match)


# -- 2. wrong shapes and types (32) ---------------------------------------------------------------------------
def deep(n: int) -> Any:
    value: Any = {}
    for _ in range(n):
        value = {"a": value}
    return value


TOOL = {"type": "function", "function": {"name": "crop", "parameters": {"type": "object"}}}
BAD_SHAPES: dict[str, tuple[dict[str, Any], int, str]] = {
    "no-messages": ({"max_tokens": 2}, 422, r"messages: Field required"),
    "empty-messages": ({"messages": []}, 422, r"messages: List should have at least 1 item"),
    "messages-a-string": ({"messages": "hi"}, 422, r"messages: Input should be a valid list"),
    "message-without-role": ({"messages": [{"content": "hi"}]}, 422, r"messages\.0\.role: Field required"),
    "unknown-role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, r"messages\.0\.role"),
    "content-a-number": ({"messages": [{"role": "user", "content": 5}]}, 422, r"messages\.0\.content"),
    "part-type-audio": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
                        422, r"messages\.0\.content"),
    "text-part-without-text": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 422,
                               r"messages\.0\.content.*text: Field required"),
    "text-a-number": ({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}, 422,
                      r"\.text: Input should be a valid string"),
    "image-url-a-string": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
                           422, r"image_url"),
    "image-detail-ultra": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,", "detail": "ultra"}}]}]}, 422, r"detail"),
    "stream-yes": ({"messages": HI, "stream": "yes"}, 422, r"stream: Input should be a valid boolean"),
    "temperature-a-string": ({"messages": HI, "temperature": "0.5"}, 422,
                             r"temperature: Input should be a valid number"),
    "max-tokens-1.5": ({"messages": HI, "max_tokens": 1.5}, 422, r"max_tokens: Input should be a valid integer"),
    "max-tokens-true": ({"messages": HI, "max_tokens": True}, 422, r"max_tokens: Input should be a valid integer"),
    "seed-a-string": ({"messages": HI, "seed": "1"}, 422, r"seed: Input should be a valid integer"),
    "stop-a-number": ({"messages": HI, "stop": 5}, 422, r"stop"),
    "tools-an-object": ({"messages": HI, "tools": {"a": 1}}, 422, r"tools: Input should be a valid list"),
    "tool-choice-sometimes": ({"messages": HI, "tool_choice": "sometimes"}, 422, r"tool_choice"),
    "tool-choice-required": ({"messages": HI, "tools": [TOOL], "tool_choice": "required"}, 422, r"required"),
    "tool-choice-unknown-function": ({"messages": HI, "tools": [TOOL], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, 400, r"'nope', which is not among the tools"),
    "tool-schema-100-deep": ({"messages": HI, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": deep(100)}}]}, 422, r"nested more than 64 levels"),
    "tool-arguments-not-json": ({"messages": HI + [{"role": "assistant", "tool_calls": [
        {"function": {"name": "crop", "arguments": "{nope"}}]}]}, 400, r"arguments is not valid JSON"),
    "tool-arguments-a-list": ({"messages": HI + [{"role": "assistant", "tool_calls": [
        {"function": {"name": "crop", "arguments": "[1]"}}]}]}, 400, r"arguments must be a JSON object"),
    "tool-arguments-5000-deep": ({"messages": HI + [{"role": "assistant", "tool_calls": [
        {"function": {"name": "crop", "arguments": "[" * 5000 + "]" * 5000}}]}]}, 400, r"arguments"),
    "n-2": ({"messages": HI, "n": 2}, 422, r"only n=1"),
    "unknown-top-level": ({"messages": HI, "response_format": {"type": "json_object"}, "logprobs": True}, 422,
                          r"unknown or unsupported field\(s\): response_format, logprobs"),
    "unknown-in-message": ({"messages": [{"role": "user", "content": "hi", "audio": 1}]}, 422, r"messages\.0\.audio"),
    "unknown-in-part": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}]}]},
                        422, r"cache"),
    "model-a-number": ({"messages": HI, "model": 3}, 422, r"model: Input should be a valid string"),
    "3000-messages": ({"messages": HI * 3000}, 422, r"messages: List should have at most 2048 items"),
    "10000-messages": ({"messages": HI * 10_000}, 422, r"messages: List should have at most 2048 items"),
}


@pytest.mark.parametrize("name", list(BAD_SHAPES))
def test_wrong_shapes_and_types(srv, name):
    fields, status, match = BAD_SHAPES[name]
    assert_clear_error(post(srv, json.dumps(fields).encode()), status, match)


# -- 3. values out of bounds (22) --------------------------------------------------------------------------------
BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "seed-2^70": ({"seed": 2**70}, r"invalid seed .*0 to 2\^63-1"),
    "seed-2^63": ({"seed": 2**63}, r"invalid seed"),
    "seed-negative": ({"seed": -1}, r"invalid seed"),
    "temperature-negative": ({"temperature": -0.1}, r"invalid temperature"),
    "temperature-2.5": ({"temperature": 2.5}, r"invalid temperature"),
    "temperature-1e308": ({"temperature": 1e308}, r"invalid temperature"),
    "top-p-0": ({"top_p": 0}, r"invalid top_p"),
    "top-p-1.5": ({"top_p": 1.5}, r"invalid top_p"),
    "top-k-negative": ({"top_k": -1}, r"invalid top_k"),
    "top-k-2^40": ({"top_k": 2**40}, r"invalid top_k"),
    "repetition-penalty-0": ({"repetition_penalty": 0}, r"invalid repetition_penalty"),
    "repetition-penalty-11": ({"repetition_penalty": 11}, r"invalid repetition_penalty"),
    "max-tokens-0": ({"max_tokens": 0}, r"invalid max_new_tokens"),
    "max-tokens-negative": ({"max_tokens": -5}, r"invalid max_new_tokens"),
    "max-tokens-1e9": ({"max_tokens": 10**9}, r"max_tokens is too large: 1000000000"),
    "max-tokens-2^70": ({"max_tokens": 2**70}, r"max_tokens is too large"),
    "max-completion-tokens-1e9": ({"max_completion_tokens": 10**9}, r"max_completion_tokens is too large"),
    "max-tokens-the-context": ({"max_tokens": CONTEXT}, r"max_tokens is too large"),
    "max-tokens-past-the-prompt": ({"max_tokens": CONTEXT - 3}, r"max_tokens is too large: the prompt is \d+ tokens"),
    "nine-stops": ({"stop": [str(i) for i in range(9)]}, r"invalid stop"),
    "empty-stop": ({"stop": ""}, r"invalid stop|prompt"),
    "blank-prompt": ({"messages": [{"role": "user", "content": "   "}]}, r"prompt is empty"),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_values_out_of_bounds(srv, name):
    fields, match = BAD_VALUES[name]
    t0 = time.perf_counter()
    assert_clear_error(post(srv, body(**fields)), 400, match)
    assert time.perf_counter() - t0 < 10  # refused before any generation (10^9 tokens is never started)


def test_bounds_accept_their_edges(srv):
    edges = ({"seed": 2**63 - 1}, {"seed": 0}, {"temperature": 2, "top_k": 2**31 - 1}, {"max_completion_tokens": 1})
    for fields in edges:
        r = post(srv, body(**fields))
        assert r.status_code == 200, (fields, r.text)


# -- 4. media parts that cannot be used (22) ---------------------------------------------------------------------
def b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def pdf_part(data_uri_or_id: str, key: str = "file_data") -> dict[str, Any]:
    return {"type": "file", "file": {key: data_uri_or_id}}


BAD_MEDIA: dict[str, tuple[dict[str, Any], int]] = {
    "not-base64": (image("data:image/png;base64,@@@not base64@@@"), 400),
    "text-as-png": (image(b64(b"hello, not an image", "image/png")), 400),
    "empty-data-uri": (image("data:image/png;base64,"), 400),
    "truncated-png": (image(b64(png_bytes((300, 200))[:120], "image/png")), 400),
    "bomb-png-header": (image(b64(bomb_png(100_000, 100_000), "image/png")), 400),
    "javascript-url": (image("javascript:alert(1)"), 400),
    "ftp-url": (image("ftp://example.com/x.png"), 400),
    "empty-url": (image(""), 400),
    "etc-passwd": (image("/etc/passwd"), 400),
    "file-url-outside": (image("file:///etc/hostname"), 400),
    "dotdot-escape": (image("../../../../etc/passwd"), 400),
    "symlink-to-passwd": (image("passwd.png"), 400),
    "text-file-named-png": (image("notes.png"), 400),
    "missing-local-file": (image("nope.png"), 400),
    "nul-byte-in-path": (image("ok\x00.png"), 400),
    "name-too-long": (image("a" * 5000 + ".png"), 400),
    "fifo-in-media-folder": (image("fifo.png"), 400),
    "remote-loopback": (image("http://127.0.0.1:9/x.png"), 400),
    "remote-metadata": (image("http://169.254.169.254/latest/meta-data/"), 400),
    "video-garbage": ({"type": "video_url", "video_url": {"url": b64(b"\x00" * 512, "video/mp4")}}, 400),
    "video-remote": ({"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/v.mp4"}}, 400),
    "file-id": (pdf_part("file-abc123", "file_id"), 422),
    "file-not-data-uri": (pdf_part("http://127.0.0.1:9/x.pdf"), 400),
    "file-png-as-pdf": (pdf_part(b64(png_bytes(), "application/pdf")), 400),
    "file-truncated-pdf": (pdf_part(b64(b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog", "application/pdf")), 400),
}


@pytest.mark.parametrize("name", list(BAD_MEDIA))
def test_media_parts_that_cannot_be_used(srv, name):
    part, status = BAD_MEDIA[name]
    r = post(srv, body(messages=[{"role": "user", "content": [part, {"type": "text", "text": "describe"}]}]))
    err = assert_clear_error(r, status, r"messages\[0\]\.content\[0\]")
    assert "root:" not in err["message"]  # nothing read from a file is echoed


# -- 5. too much, and broken HTTP (17) ------------------------------------------------------------------------
def test_too_much_text_is_refused_before_tokenizing(srv):
    t0 = time.perf_counter()
    assert_clear_error(post(srv, body(messages=[{"role": "user", "content": "x" * 1_500_000}])), 400,
                       r"1,500,000 characters of text; this server accepts at most 1,000,000")
    assert time.perf_counter() - t0 < 2


def test_text_past_the_context_is_refused(srv):
    assert_clear_error(post(srv, body(messages=[{"role": "user", "content": "word " * 180_000}])), 400,
                       r"the prompt (is|would be about) [\d,]+ tokens")


def test_a_body_over_the_limit_through_the_openai_client(srv):
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
    big = "data:image/png;base64," + "A" * (LIMIT + 10)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [image(big)]}])
    assert e.value.status_code == 413 and "--max-body-mb" in e.value.message


def test_many_large_images_in_one_request(srv):
    """60 images of 2000x2000 in a 0.7 MB body (240 million pixels): refused from their headers, undecoded."""
    png = png_bytes((2000, 2000), color=(255, 255, 255))
    t0 = time.perf_counter()
    r = post(srv, body(messages=[{"role": "user", "content": [image(b64(png, "image/png"))] * 60 + [
        {"type": "text", "text": "x"}]}]))
    assert_clear_error(r, 413, r"--max-total-pixels")
    assert time.perf_counter() - t0 < 5


def test_50_mb_of_text_at_the_default_limits_is_refused_at_once():
    """Default --max-body-mb (64): the text is counted, not tokenized (it once took minutes and 8 GB)."""
    with serve_in_thread(ScriptedBackend("never")) as url:
        t0 = time.perf_counter()
        r = HTTP.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "word " * 10_000_000}]})
        assert_clear_error(r, 400, r"50,000,000 characters of text; this server accepts at most 1,000,000")
        assert time.perf_counter() - t0 < 5


def raw_request(srv: Server, data: str, payload: bytes = b"", eof: bool = False, timeout: float = 10) -> bytes:
    """Send raw bytes (``eof``: then half-close, the client has nothing more), return what the server answers
    before it closes the connection or ``timeout`` passes."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(data.encode() + payload)
        if eof:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def head(extra: str, path: str = "/v1/chat/completions") -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nConnection: close\r\n{extra}\r\n")


def test_a_declared_length_over_the_limit_is_refused_before_reading(srv):
    t0 = time.perf_counter()
    answer = raw_request(srv, head(f"Content-Length: {10 * 2**30}\r\nExpect: 100-continue\r\n"))
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
    assert b"100 Continue" not in answer and time.perf_counter() - t0 < 2


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(srv):
    """64 KB chunks, up to 50 MB: the 413 arrives before the client has sent much past the limit."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        s.sendall(head("Transfer-Encoding: chunked\r\n").encode())
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        sent = 0
        try:
            while sent < 50 * 2**20 and not select.select([s], [], [], 0.005)[0]:
                s.sendall(chunk)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):  # closed on us: the answer is waiting
            pass
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while part := s.recv(65536):
                answer += part
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
    assert sent < LIMIT + 8 * 2**20  # refused as the limit passed, not after the whole 50 MB


def test_a_content_length_smaller_than_the_body(srv):
    answer = raw_request(srv, head("Content-Length: 20\r\n"), body(messages=[{"role": "user", "content": "x" * 3000}]))
    assert answer.startswith(b"HTTP/1.1 400")  # the first 20 bytes are not JSON; the rest is not HTTP


def test_a_content_length_larger_than_the_body_then_eof(srv):
    answer = raw_request(srv, head("Content-Length: 100000\r\n"), body(), eof=True)
    assert answer == b""  # the client left mid-body: nothing to answer, nothing broken (checked after each test)


def test_malformed_http(srv):
    for raw in (head("Content-Length: abc\r\n"),  # not a number
                head("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + "0\r\n\r\n",  # both: chunked wins
                "GARBAGE\r\n\r\n",
                f"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 200_000}\r\n\r\n"):
        answer = raw_request(srv, raw)
        assert re.match(rb"HTTP/1\.1 4\d\d", answer), (raw[:60], answer[:200])


def test_wrong_routes_and_keys(srv):
    assert_clear_error(HTTP.get(f"{srv.url}/v1/chat/completions", headers=AUTH), 405, "Method Not Allowed")
    assert_clear_error(HTTP.post(f"{srv.url}/v2/nothing", headers=AUTH, json={}), 404, "Not Found")
    assert_clear_error(post(srv, body(), {"Content-Type": "application/json"}), 401, "API key")
    assert_clear_error(post(srv, body(), {"Content-Type": "application/json", "Authorization": "Bearer x" * 5000}),
                       401, "API key")


def test_memory_stayed_under_idle_plus_2gb(srv):
    grown = (srv.peak_kb - srv.idle_kb) / 2**20
    print(f"server RSS: idle {srv.idle_kb / 2**20:.2f} GB, peak {srv.peak_kb / 2**20:.2f} GB (+{grown:.2f} GB)")
    assert grown < 2.0


# -- after the hostile set: still serving, and clients that leave free their slots --------------------------------
def test_64_concurrent_streams_complete_afterwards(srv):
    results = concurrent_streams(srv.url, 64)
    assert [(finish, usage.completion_tokens) for _, finish, usage in results] == [("length", 12)] * 64


def state(srv: Server) -> tuple[int, int]:
    """(requests waiting for or running on the model, requests admitted)."""
    depth = HTTP.get(f"{srv.url}/health", timeout=10).json()["queue_depth"]
    metrics = HTTP.get(f"{srv.url}/metrics", headers=AUTH, timeout=10).text
    admitted = float(re.search(r"^glmv_requests_in_flight (\S+)$", metrics, re.M).group(1))
    return depth, int(admitted)


def wait_for(srv: Server, want: Callable[[tuple[int, int]], bool], timeout: float) -> float:
    t0 = time.perf_counter()
    while not want(state(srv)):
        assert time.perf_counter() - t0 < timeout, f"state stayed {state(srv)}"
        time.sleep(0.02)
    return time.perf_counter() - t0


def open_request(srv: Server, fields: dict[str, Any]) -> socket.socket:
    """A request sent on a raw socket whose answer is never read (closing the socket = the client leaves)."""
    payload = body(**fields)
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(head(f"Content-Length: {len(payload)}\r\n").encode() + payload)
    return s


LONG = {"max_tokens": 100_000, "temperature": 0}  # minutes on the tiny model: only cancelling ends it


def test_a_non_streamed_client_that_leaves_frees_its_slot_within_a_second(srv):
    s = open_request(srv, LONG)
    wait_for(srv, lambda st: st == (1, 1), 30)
    time.sleep(0.3)  # generating
    s.close()
    freed = wait_for(srv, lambda st: st == (0, 0), 5)
    assert freed < 1.0
    t0 = time.perf_counter()
    r = post(srv, body(max_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert time.perf_counter() - t0 < 5  # the model was free at once


def test_queued_clients_that_leave_leave_the_queue(srv):
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
    running = client.chat.completions.create(model="tiny", messages=HI, stream=True, **LONG)
    events = iter(running)
    next(events), next(events)
    waiting = [open_request(srv, {**LONG, "seed": i}) for i in range(2)] + [open_request(srv, {**LONG, "stream": True})]
    wait_for(srv, lambda st: st == (4, 4), 30)
    for s in waiting:
        s.close()
    freed = wait_for(srv, lambda st: st == (1, 1), 5)
    assert freed < 1.0
    assert next(events).choices  # the running stream goes on
    running.close()  # and the streamed client that was generating leaves too
    assert wait_for(srv, lambda st: st == (0, 0), 5) < 1.0


def test_six_concurrent_pdf_requests(srv, tmp_path):
    from test_documents import make_pdf

    pdf = b64(make_pdf(tmp_path / "two.pdf", 2).read_bytes(), "application/pdf")
    payload = body(messages=[{"role": "user", "content": [pdf_part(pdf), {"type": "text", "text": "summarize"}]}])
    results: list[int] = []

    def one() -> None:
        results.append(post(srv, payload, timeout=300).status_code)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == [200] * 6


def test_no_traceback_in_the_server_log(srv):
    log = srv.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
