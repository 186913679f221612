"""glmv serve: the official openai client against live servers (real HTTP on loopback)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from conftest import REPO, glmv_in_process, png_bytes
from glmv.backends.base import collect
from glmv.backends.remote import RemoteBackend
from glmv.backends.base import GenerationRequest
from glmv.errors import GlmvError
from glmv.media import load_image
from glmv.prompts import user_message
from glmv.server.app import ServerConfig, build_app
from glmv.testing.scripted import ScriptedBackend

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def wait_healthy(url: str, proc=None, timeout=120):
    deadline = time.time() + timeout
    with httpx.Client() as http:  # one client: polling must not take the CPU the starting server needs
        while time.time() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if http.get(f"{url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise TimeoutError(url)


@contextlib.contextmanager
def serve_process(*extra, tiny_path=None, info=None):
    """``glmv serve --model tiny`` in a subprocess; ``info`` (a dict) receives its ``proc`` and ``log`` file."""
    port = free_port()
    log = open(Path(os.environ["GLMV_CACHE"]) / f"serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "glmv.cli", "serve", "--model", "tiny", "--port", str(port), *extra],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if info is not None:
        info.update(proc=proc, log=log)
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def serve_in_thread(backend, config=None):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(backend, config or ServerConfig(model_name="scripted")),
                                           host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout=30)
    try:
        yield url
    finally:
        server.should_exit = True
        t.join(10)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "ok.png").write_bytes(png_bytes((56, 56)))
    return d


@pytest.fixture(scope="module")
def server(tiny_path, media_dir):
    with serve_process("--api-key", KEY, "--allowed-media-dir", str(media_dir), "--max-body-mb", "1") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def image_msg(url, text="describe this image"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


pytestmark = pytest.mark.slow


# -- the tiny model over real HTTP --------------------------------------------------------------
def test_non_streamed_with_image(client):
    r = client.chat.completions.create(model="tiny", messages=image_msg(data_uri(png_bytes((112, 84)))), max_tokens=8)
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens > 12  # 12 visual tokens for 112x84 plus the text
    assert r.choices[0].message.role == "assistant"


def test_streamed_with_usage(client):
    stream = client.chat.completions.create(model="tiny", messages=image_msg(data_uri(png_bytes())), max_tokens=6,
                                            stream=True, stream_options={"include_usage": True})
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    finishes = [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason]
    assert finishes == ["length"]
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 6


def test_thinking_off_changes_the_prompt(client):
    def prompt_tokens(**extra):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=1, **extra).usage.prompt_tokens

    on = prompt_tokens()
    off = prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off > on  # "/nothink" and the pre-filled "<think></think>" are in the prompt
    # OpenAI's reasoning_effort: GLM has one level, so "none"/"minimal" are off and the rest on
    assert prompt_tokens(reasoning_effort="none") == prompt_tokens(reasoning_effort="minimal") == off
    assert prompt_tokens(reasoning_effort="low") == prompt_tokens(reasoning_effort="high") == on
    with pytest.raises(openai.BadRequestError, match="contradicts") as e:
        prompt_tokens(reasoning_effort="high", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert e.value.body["param"] == "reasoning_effort"


def test_fields_clients_send_by_default_are_accepted_or_refused_by_name(client):
    """Was: 422 for store, presence_penalty and reasoning_effort, which the openai client and others send as a
    matter of course. Informational fields are accepted; a penalty glmv cannot apply is a 400 naming it."""
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, store=False, metadata={"run": "a"},
                                       presence_penalty=0, frequency_penalty=0.0)
    assert r.usage.completion_tokens == 2
    assert client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, store=True).choices
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(openai.BadRequestError, match=f"{name} is not supported.*repetition_penalty") as e:
            client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, **{name: 0.5})
        assert e.value.body["param"] == name and e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.UnprocessableEntityError, match="reasoning_effort"):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, reasoning_effort="extreme")


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert httpx.get(f"{server}/metrics").status_code == 401  # behind the key like /v1
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("glmv_requests_total", "glmv_completion_tokens_total", "glmv_queue_depth",
                 "glmv_time_to_first_token_seconds_bucket", "glmv_request_latency_seconds_bucket"):
        assert name in text


def test_local_media_policy(client, media_dir, tmp_path):
    r = client.chat.completions.create(model="tiny", messages=image_msg(str(media_dir / "ok.png")), max_tokens=1)
    assert r.usage.completion_tokens == 1
    r = client.chat.completions.create(model="tiny", messages=image_msg("ok.png"), max_tokens=1)  # relative to the dir
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    for url in (str(outside), f"file://{outside}", str(media_dir / ".." / outside.parent.name / "secret.png")):
        with pytest.raises(openai.BadRequestError, match="outside the allowed media folder"):
            client.chat.completions.create(model="tiny", messages=image_msg(url), max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="remote images is disabled"):
        client.chat.completions.create(model="tiny", messages=image_msg("http://127.0.0.1:9/x.png"), max_tokens=1)


# -- every error status, as an OpenAI error object --------------------------------------------
def test_error_statuses(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=image_msg("data:image/png;base64,aGVsbG8="))
    assert e.value.status_code == 400 and "messages[0].content[0]" in e.value.message
    with pytest.raises(openai.BadRequestError, match="invalid temperature"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=3)
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": " "}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"response_format_x": 1, "logprobs_y": True})
    assert "response_format_x" in e.value.message and "logprobs_y" in e.value.message
    with pytest.raises(openai.UnprocessableEntityError, match="n=1"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2)
    big = "data:image/png;base64," + "A" * (2 * 2**20)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=image_msg(big))
    assert e.value.status_code == 413
    body = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": "x"}], "bogus": 1}).json()
    assert set(body["error"]) >= {"message", "type", "code"}


def test_internal_errors_hide_internals():
    class Broken(ScriptedBackend):
        def generate(self, request, cancel=None):
            raise RuntimeError("secret internal detail /home/x")

    with serve_in_thread(Broken("")) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500
    assert "secret" not in r.text and r.json()["error"]["type"] == "server_error"


# -- queue limits and disconnects -----------------------------------------------------------------
def test_full_queue_429_and_disconnect_frees_the_slot(tiny_backend):
    with serve_in_thread(tiny_backend, ServerConfig(model_name="tiny", max_queue=1)) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        long = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}], max_tokens=100000,
                                         temperature=0, stream=True)
        it = iter(long)
        next(it), next(it)  # generation is running
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        long.close()  # the client goes away mid-stream
        t0 = time.time()
        while True:
            r = httpx.post(f"{url}/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}, timeout=30)
            if r.status_code != 429 or time.time() - t0 > 10:
                break
            time.sleep(0.05)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert time.time() - t0 < 10  # promptly: the abandoned generation was cancelled


def concurrent_streams(url: str, n: int, max_tokens: int = 12) -> list:
    """``n`` streamed requests at once through the async openai client: (text, finish_reason, usage) each."""

    async def one(client, i):
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, temperature=0)
        text, finish, usage = "", None, None
        async for ev in stream:
            if ev.choices:
                text += ev.choices[0].delta.content or ""
                finish = ev.choices[0].finish_reason or finish
            if ev.usage:
                usage = ev.usage
        return text, finish, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n))), 240)

    return asyncio.run(main())


def test_64_concurrent_streams_all_complete(server):
    results = concurrent_streams(server, 64)
    assert len(results) == 64
    for text, finish, usage in results:
        assert finish == "length" and usage.completion_tokens == 12 and text
    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "glmv_requests_in_flight 0.0" in metrics


# -- tool calls with a scripted backend ---------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "crop", "description": "zoom into a box",
                                            "parameters": {"type": "object", "properties": {"box": {"type": "array"}}}}}]


def tool_script(request):
    last = request.messages[-1]
    if last.role == "tool":
        assert len(last.images) == 1 and request.tools
        return "<think>The crop shows 42.</think>The small print says 42."
    return ("<think>Too small to read; zoom in.</think><tool_call>crop\n<arg_key>box</arg_key>\n"
            "<arg_value>[100, 200, 300, 400]</arg_value>\n</tool_call>")


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_round_trip(stream):
    backend = ScriptedBackend(tool_script)
    with serve_in_thread(backend) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        messages = image_msg(data_uri(png_bytes()), "what does the small print say?")
        if stream:
            calls, finish, reasoning = {}, None, ""
            for ev in c.chat.completions.create(model="m", messages=messages, tools=TOOLS, stream=True):
                d = ev.choices[0].delta
                reasoning += getattr(d, "reasoning_content", None) or ""
                for tc in d.tool_calls or []:  # the id and name come first, the arguments in fragments
                    if tc.index not in calls:
                        calls[tc.index] = tc
                    else:
                        calls[tc.index].function.arguments += tc.function.arguments or ""
                finish = ev.choices[0].finish_reason or finish
            assert finish == "tool_calls" and "zoom in" in reasoning
            call = calls[0]
        else:
            r = c.chat.completions.create(model="m", messages=messages, tools=TOOLS)
            assert r.choices[0].finish_reason == "tool_calls"
            assert r.choices[0].message.reasoning_content == "Too small to read; zoom in."
            call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "crop" and json.loads(call.function.arguments) == {"box": [100, 200, 300, 400]}
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": "crop", "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": [
                {"type": "image_url", "image_url": {"url": data_uri(png_bytes((64, 64)))}},
                {"type": "text", "text": "the cropped region"}]},
        ]
        r = c.chat.completions.create(model="m", messages=messages, tools=TOOLS)
        assert r.choices[0].message.content == "The small print says 42."
        assert r.choices[0].finish_reason == "stop"
    sent = backend.requests[-1]
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert sent.messages[1].tool_calls[0].arguments == {"box": [100, 200, 300, 400]}


def test_tool_choice_none_hides_tools():
    backend = ScriptedBackend("ok")
    with serve_in_thread(backend) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="none")
    assert backend.requests[-1].tools is None


# -- the remote backend: a real HTTP hop to a glmv server -------------------------------------------
def test_remote_backend_against_glmv_server(server):
    backend = RemoteBackend(f"{server}/v1", api_key=KEY).load()
    assert backend.model == "tiny"
    img = load_image(Image.new("RGB", (112, 112), "white"))
    chunks = list(backend.generate(GenerationRequest([user_message("describe", [img])],
                                                     sampling=backend.default_sampling.merged(max_new_tokens=5))))
    done = chunks[-1]
    assert done.type == "done" and done.usage.completion_tokens == 5 and done.usage.prompt_tokens > 16
    assert done.finish_reason == "length"


def test_remote_backend_maps_reasoning_and_tool_calls():
    with serve_in_thread(ScriptedBackend(tool_script)) as url:
        backend = RemoteBackend(f"{url}/v1").load()
        r = collect(backend.generate(GenerationRequest([user_message("read it", [load_image(png_bytes())])], tools=TOOLS)))
    assert r.output.thinking == "Too small to read; zoom in."
    assert [(c.name, c.arguments) for c in r.output.tool_calls] == [("crop", {"box": [100, 200, 300, 400]})]
    assert r.finish_reason == "tool_calls"


def test_remote_backend_errors():
    with pytest.raises(GlmvError, match="cannot reach the server"):
        RemoteBackend("http://127.0.0.1:9/v1").load()


def test_cli_with_remote_backend(server):
    p = glmv_in_process("ask", "input/image_1.png", "--backend", "openai", "--base-url", f"{server}/v1",
                        "--api-key", KEY, "--max-new-tokens", "4", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["usage"]["completion_tokens"] == 4 and data["usage"]["prompt_tokens"] > 500
    p = glmv_in_process("ask", "-p", "x", "--backend", "openai", "--base-url", f"{server}/v1", "--api-key", "wrong")
    assert p.returncode == 2 and "refused the API key" in p.stderr


def test_serve_warns_when_exposed_without_key():
    """The warning comes before anything else (here a busy port stops the start before the model loads)."""
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = glmv_in_process("serve", "--model", "tiny", "--host", "0.0.0.0", "--port", str(port))
    assert p.returncode == 2
    assert p.stderr.startswith("glmv: warning: listening on 0.0.0.0 without --api-key: anyone who can reach")
    assert "cannot listen on 0.0.0.0" in p.stderr and "loading" not in p.stderr


def test_pdf_file_part_and_video_url(client, tmp_path):
    from test_documents import make_pdf, make_video

    pdf = make_pdf(tmp_path / "doc.pdf", 2)
    pdf_uri = "data:application/pdf;base64," + base64.b64encode(pdf.read_bytes()).decode()
    r = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_data": pdf_uri, "filename": "doc.pdf"}}, {"type": "text", "text": "summarize"}]}])
    assert r.usage.prompt_tokens > 1000  # two rendered pages
    video = make_video(tmp_path / "clip.mp4")
    v_uri = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    r = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": v_uri}}, {"type": "text", "text": "what happens?"}]}])
    assert r.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError, match="encrypted|corrupt"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "file", "file": {"file_data": "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4 junk").decode()}},
            {"type": "text", "text": "x"}]}])


@pytest.mark.parametrize("client", ["lite", "openai"])
def test_remote_backend_reports_a_server_that_dies_mid_answer(client):
    """A resident server killed -9 mid-stream: the client used to report the partial answer as complete
    (finish_reason "stop", exit 0). Now it is an error, with both the stdlib client and the official one."""
    import http.server

    class Dying(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            event = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": "half an ans"}, "finish_reason": None}]}
            data = f"data: {json.dumps(event)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            self.close_connection = True  # and no terminating chunk: the process died

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dying)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        from glmv.backends import lite

        module = lite if client == "lite" else None
        backend = RemoteBackend(f"http://127.0.0.1:{httpd.server_address[1]}/v1", model="m", client_module=module)
        with pytest.raises(GlmvError, match="before the answer was complete|failed mid-answer"):
            list(backend.generate(GenerationRequest([user_message("hi", [])])))
    finally:
        httpd.shutdown()


def test_serve_on_a_busy_port_says_so_before_loading_the_model():
    """Was: the model loaded (minutes for the real one), then uvicorn's 'ERROR: [Errno 98] ...' and exit 3."""
    from glmv.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        loaded = []
        err = io.StringIO()
        code = main(["serve", "--model", "tiny", "--port", str(port)], backend_factory=lambda s: loaded.append(s),
                    stderr=err)
    assert code == 2 and loaded == []
    assert err.getvalue() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use (another server? " \
                             f"choose another --port)\n"
