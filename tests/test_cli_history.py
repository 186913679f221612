"""The history (SQLite in the cache folder): what is logged and what never is, glmv logs (-n, -q, --json,
off/on), --no-log and GLMV_HISTORY, -c continuation as the backend sees it; glmv chat in-process; and the
resident server's idle timeout on a real uvicorn."""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import threading
import time

import pytest

from conftest import png_bytes
from glmv import history
from glmv.cli import main
from glmv.testing.scripted import ScriptedBackend
from test_cli import run_cli


@pytest.fixture
def fresh_history(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMV_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GLMV_HISTORY", raising=False)
    return tmp_path / "cache" / "history.sqlite"


def logs(*args):
    out, err = io.StringIO(), io.StringIO()
    code = main(["logs", *args], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    return out.getvalue()


def test_answers_are_logged_with_input_hashes_never_bytes(fresh_history, sample_png):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(color=(1, 2, 3))).decode()
    assert run_cli(["ask", str(sample_png), uri, "-p", "compare these", "--temperature", "0.3"]).code == 0
    (entry,) = json.loads(logs("--json"))["entries"]
    assert entry["prompt"] == "compare these" and entry["answer"] == "A red square." and entry["thinking"] == "looking"
    assert entry["inputs"][0] == {"source": str(sample_png), "sha256": __import__("hashlib").sha256(sample_png.read_bytes()).hexdigest()}
    assert entry["inputs"][1]["source"] == "data:" and len(entry["inputs"][1]["sha256"]) == 64
    assert entry["settings"]["sampling"]["temperature"] == 0.3 and entry["usage"]["completion_tokens"] > 0
    assert "total_s" in entry["timings"] and entry["finish_reason"] == "stop"
    raw = fresh_history.read_bytes()
    assert sample_png.read_bytes()[:64] not in raw and uri[22:80].encode() not in raw and b"\x89PNG" not in raw


def test_logs_latest_search_and_json(fresh_history):
    for i, script in enumerate(["alpha answer", "beta answer", "gamma answer"]):
        assert run_cli(["ask", "-p", f"question {i}"], script=script).code == 0
    text = logs("-n", "2")
    assert "question 0" not in text and text.index("question 1") < text.index("question 2")  # oldest first
    assert "beta answer" in text and "glmv ask" in text
    assert [e["answer"] for e in json.loads(logs("-q", "BETA", "--json"))["entries"]] == ["beta answer"]
    assert json.loads(logs("-q", "100%", "--json"))["entries"] == []  # LIKE wildcards are literal
    assert len(json.loads(logs("-n", "0", "--json"))["entries"]) == 3
    status = json.loads(logs("status", "--json"))
    assert status == {"logging": "on", "path": str(fresh_history), "entries": 3}


def test_no_log_env_and_off_switch(fresh_history, monkeypatch):
    assert run_cli(["ask", "-p", "secret one", "--no-log"]).code == 0
    monkeypatch.setenv("GLMV_HISTORY", "off")
    assert run_cli(["ask", "-p", "secret two"]).code == 0
    monkeypatch.delenv("GLMV_HISTORY")
    logs("off")
    assert run_cli(["ask", "-p", "secret three"]).code == 0
    assert "logging is off" in logs("status")
    r = run_cli(["ask", "-c", "-p", "more"])
    assert r.code == 2 and "history, which is off" in r.err
    logs("on")
    assert run_cli(["ask", "-p", "kept"]).code == 0
    assert [e["prompt"] for e in json.loads(logs("--json"))["entries"]] == ["kept"]


def test_continue_sends_the_earlier_turns(fresh_history, sample_png):
    first = run_cli(["ask", str(sample_png), "-p", "what colour?", "--system", "be brief", "--json"], script="Red.")
    cid = json.loads(first.out)["conversation_id"]
    r = run_cli(["ask", "-c", "-p", "and the shape?", "--json"], script="Square.")
    assert json.loads(r.out)["conversation_id"] == cid
    messages = r.backend.requests[0].messages
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0].text == "be brief" and messages[1].text == "what colour?" and len(messages[1].images) == 1
    assert messages[2].text == "Red." and messages[3].text == "and the shape?"
    sample_png.write_bytes(png_bytes(color=(0, 0, 255)))  # the file changed since: used as it is now, with a warning
    r = run_cli(["ask", "--cid", cid, "-p", "now?"])
    assert "changed since it was sent" in r.err and len(r.backend.requests[0].messages) == 6
    sample_png.unlink()
    r = run_cli(["ask", "-c", "-p", "and now?"])
    assert r.code == 0 and "no such file" in r.err and r.backend.requests[0].messages[1].images == []
    with sqlite3.connect(fresh_history) as db:
        assert db.execute("SELECT COUNT(DISTINCT conversation_id) FROM responses").fetchone()[0] == 1


def test_a_continued_conversation_is_held_to_the_same_limits_as_a_fresh_one(fresh_history, sample_png):
    blue = sample_png.with_name("blue.png")
    blue.write_bytes(png_bytes(color=(0, 0, 255)))
    assert run_cli(["ask", str(sample_png), str(blue), "-p", "compare"], script="x" * 600).code == 0
    fresh = run_cli(["ask", str(sample_png), str(blue), str(sample_png), str(blue), "-p", "again", "--max-images", "3"])
    r = run_cli(["ask", "-c", str(sample_png), str(blue), "-p", "again", "--max-images", "3"])
    assert r.code == fresh.code == 2 and r.err == fresh.err and r.out == ""
    assert r.err.startswith("error: too much work in one request: 4 images") and "--max-images" in r.err
    assert r.settings is None and r.backend.requests == []  # refused before the model was built
    r = run_cli(["ask", "--cid", history.History().last_conversation_id(), "-p", "more", "--max-text-chars", "500"])
    assert r.code == 2 and "characters of text" in r.err and "--max-text-chars" in r.err and not r.backend.requests
    made = []
    code = main(["chat", "-c", "--max-images", "1"], backend_factory=lambda s: made.append(s), stdin=io.StringIO("hi\n"),
                stdout=io.StringIO(), stderr=(err := io.StringIO()))
    assert code == 2 and "--max-images" in err.getvalue() and made == []
    assert history.History().count() == 1  # the refused turns were not logged


def test_chat_in_process(fresh_history, sample_png, tmp_path):
    backend = ScriptedBackend("<think>hmm</think>An answer.")
    lines = ["hello", f"/image {sample_png}", "what is this?", "/thinking off", "/set temperature 0",
             "/set colour red", "/bogus", f"/save {tmp_path / 't.md'}", "thanks", "/exit", "never sent"]
    out, err = io.StringIO(), io.StringIO()
    code = main(["chat", "--show-thinking"], backend_factory=lambda s: backend, stdin=io.StringIO("\n".join(lines) + "\n"),
                stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    first, second, third = backend.requests
    assert [len(m.images) for m in second.messages] == [0, 0, 1] and second.messages[1].text == "An answer."
    assert first.thinking and second.thinking and not third.thinking and third.sampling.temperature == 0
    assert len(third.messages) == 5 and third.messages[-1].text == "thanks"
    e = err.getvalue()
    assert "error: /set takes one of" in e and "error: unknown command /bogus" in e
    assert "── thinking ──" in out.getvalue() and out.getvalue().count("An answer.") == 3
    saved = (tmp_path / "t.md").read_text()
    assert "**You:** hello" in saved and "**GLM:** An answer." in saved and "red.png" in saved
    entries = json.loads(logs("--json", "-n", "0"))["entries"]
    assert [e["prompt"] for e in entries] == ["hello", "what is this?", "thanks"]
    assert len({e["conversation_id"] for e in entries}) == 1 and entries[1]["inputs"][0]["source"] == str(sample_png)
    # glmv ask -c continues the chat
    r = run_cli(["ask", "-c", "-p", "one more"])
    assert len(r.backend.requests[0].messages) == 7
    # and glmv chat -c picks it up again in the REPL
    backend = ScriptedBackend("Sure.")
    code = main(["chat", "-c"], backend_factory=lambda s: backend, stdin=io.StringIO("last one\n"),
                stdout=io.StringIO(), stderr=err)
    assert code == 0 and len(backend.requests[0].messages) == 9 and "(continuing " in err.getvalue()


def watched_server(app, idle_after_s: float, **config):
    """A real uvicorn serving ``app`` under the resident model's idle watch. Returns the server, its thread, the
    port once it listens (``ready[0]``) and the moments the watch found it idle."""
    import uvicorn

    from glmv.resident import ActivityTracker, watch_server

    tracker = ActivityTracker(app)
    server = uvicorn.Server(uvicorn.Config(tracker, host="127.0.0.1", port=0, log_level="warning", **config))
    ready, idle = [], []
    threading.Thread(target=watch_server, args=(server, tracker, idle_after_s, ready.append,
                                                lambda: idle.append(time.monotonic())), daemon=True).start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not ready:
        assert time.monotonic() - t0 < 20
        time.sleep(0.05)
    return server, thread, tracker, ready, idle


def test_idle_timeout_stops_a_real_server_but_not_mid_request():
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        import asyncio

        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(8):  # a slow stream: 1 s, twice the idle timeout
            await asyncio.sleep(0.125)
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    server, thread, _, ready, idle = watched_server(app, 0.5)
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{ready[0]}/v1/slow", timeout=10).read()
    served = time.monotonic()
    assert body == b"x" * 8 and not idle  # 1 s of streaming did not count as idle
    thread.join(10)
    assert not thread.is_alive() and idle and 0.45 < idle[0] - served < 3.0


def test_a_client_that_sends_headers_and_no_body_cannot_keep_a_resident_server_awake():
    """Raw sockets against the real app on a real uvicorn: one sends a POST's headers and never its body, another
    never finishes its headers. The first gets 408 and is closed; neither counts as activity: the server idles out."""
    import socket

    from glmv.server.app import ServerConfig, build_app

    server, thread, tracker, ready, idle = watched_server(
        build_app(ScriptedBackend("ok"), ServerConfig(body_timeout_s=0.5)), 1.0, timeout_graceful_shutdown=2)
    stalled, partial = (socket.create_connection(("127.0.0.1", ready[0]), timeout=5) for _ in range(2))
    try:
        started = time.monotonic()
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n")
        partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        assert tracker.in_flight == 0  # headers alone are not a request in flight
        answer = b""
        while chunk := stalled.recv(65536):  # until the server closes the connection
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        assert 0.4 < time.monotonic() - started < 3.0
        thread.join(10)
        assert not thread.is_alive() and idle and idle[0] - started < 4.0
    finally:
        stalled.close()
        partial.close()
        server.should_exit = True


def test_chat_ctrl_c_stops_the_answer_not_the_program(fresh_history):
    """SIGINT (what Ctrl-C sends) while an answer streams, sent once the first piece is on its way."""
    import signal

    class Interrupted(ScriptedBackend):
        def generate(self, request, cancel=None):
            for i, chunk in enumerate(super().generate(request, cancel)):
                if i == 0 and len(self.requests) == 1:
                    os.kill(os.getpid(), signal.SIGINT)
                yield chunk

    backend = Interrupted(lambda request: "word " * 200 if len(request.messages) == 1 else "ok", delay_s=0.01)
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["chat", "--no-log"], backend_factory=lambda s: backend, stdin=io.StringIO("go on\nnext\n"),
                    stdout=out, stderr=err)
    finally:
        signal.signal(signal.SIGINT, old)
    assert code == 0 and "glmv: stopped" in err.getvalue() and "finish: cancelled" in err.getvalue()
    first, second = backend.requests
    partial = second.messages[1].text  # the answer as far as it went stays in the conversation
    assert 0 < len(partial) < len("word " * 200) and second.messages[2].text == "next"


def test_chat_refuses_a_bad_image_before_loading_the_model(fresh_history, tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    made = []
    r = main(["chat", str(tmp_path / "bad.png")], backend_factory=lambda s: made.append(s), stdin=io.StringIO(""),
             stdout=io.StringIO(), stderr=(err := io.StringIO()))
    assert r == 2 and "bad.png" in err.getvalue() and err.getvalue().startswith("error: ") and made == []


def test_a_broken_history_never_costs_the_answer(fresh_history):
    """A corrupt (or locked, or full) database: the answer and its JSON still come out, exit 0, with a warning."""
    fresh_history.parent.mkdir(parents=True)
    fresh_history.write_bytes(b"this is not a SQLite database" * 10)
    r = run_cli(["ask", "-p", "hi", "--json"], script="fine")
    assert r.code == 0, r.err
    assert json.loads(r.out)["answer"] == "fine" and "conversation_id" not in json.loads(r.out)
    assert "warning: this answer was not logged" in r.err and "error:" not in r.err
    out, err = io.StringIO(), io.StringIO()
    assert main(["logs"], stdout=out, stderr=err) == 2 and "cannot open the history database" in err.getvalue()


def test_logs_n_beyond_sqlite_integers(fresh_history):
    assert run_cli(["ask", "-p", "one"]).code == 0
    assert len(json.loads(logs("-n", "99999999999999999999", "--json"))["entries"]) == 1


def test_input_hash_streams_the_file_and_skips_fifos(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (3 << 20))
    assert history.describe_input(str(big))["sha256"] == __import__("hashlib").sha256(big.read_bytes()).hexdigest()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert history.describe_input(str(fifo)) == {"source": str(fifo), "sha256": None}  # would block if read


def test_chat_survives_a_message_that_is_not_utf8(fresh_history):
    """A Latin-1 terminal's byte reaches the REPL as a lone surrogate: it used to end the whole chat with an
    unexpected UnicodeEncodeError (the resident path's JSON body); now that message is refused and the chat goes on."""
    backend = ScriptedBackend("Fine.")
    out, err = io.StringIO(), io.StringIO()
    code = main(["chat"], backend_factory=lambda s: backend, stdin=io.StringIO("caf\udce9\nhello\n"), stdout=out,
                stderr=err)
    assert code == 0, err.getvalue()
    assert "error: your message is not UTF-8 text (byte 0xe9 at character 4)" in err.getvalue()
    assert [r.messages[-1].text for r in backend.requests] == ["hello"] and "unexpected" not in err.getvalue()


def test_logs_show_control_characters_as_escapes(fresh_history):
    """An answer (the model read it off an image) or a prompt with ESC sequences must not drive the terminal
    when glmv logs prints it; --json keeps the text exact."""
    assert run_cli(["ask", "-p", "title\x1b]0;pwned\x07 here"], script="\x1b[2Jred\x9b1m\ttab\nline").code == 0
    text = logs()
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
    assert "title\\x1b]0;pwned\\x07 here" in text and "\\x1b[2Jred\\x9b1m\ttab\nline" in text
    (entry,) = json.loads(logs("--json"))["entries"]
    assert entry["answer"] == "\x1b[2Jred\x9b1m\ttab\nline"


def test_a_new_conversation_never_reuses_a_logged_id(fresh_history, monkeypatch):
    """Ids are the date plus 6 random hex digits: a drawn id already in the history is drawn again, or the
    next `ask -c` would continue two conversations mixed together."""
    assert run_cli(["ask", "-p", "first"]).code == 0
    (first,) = json.loads(logs("--json"))["entries"]
    draws = iter([first["conversation_id"], first["conversation_id"], "261129abcdef"])
    monkeypatch.setattr(history, "new_conversation_id", lambda: next(draws))
    r = run_cli(["ask", "-p", "second", "--json"])
    assert r.code == 0 and json.loads(r.out)["conversation_id"] == "261129abcdef"
    assert [e.prompt for e in history.History().conversation(first["conversation_id"])] == ["first"]


def test_logs_into_a_pipe_that_closes_early_ends_quietly(fresh_history):
    """`glmv logs | head -1`: was 'error: unexpected BrokenPipeError', exit 1; now silent, exit 141 like git."""
    import subprocess
    import sys

    assert run_cli(["ask", "-p", "long one"], script="word " * 100_000).code == 0  # far more than a pipe holds
    p = subprocess.Popen([sys.executable, "-m", "glmv.cli", "logs"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "GLMV_CACHE": str(fresh_history.parent)})
    assert p.stdout.read(10)
    p.stdout.close()  # the reader leaves, as head does
    err = p.stderr.read().decode()
    assert p.wait(60) == 141 and err == ""
