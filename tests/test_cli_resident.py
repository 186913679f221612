"""The resident model (glmv start / ps / stop, found and used by ask, chat and batch), the chat REPL through a
real pty, and conversations continued with -c / --cid: all against one real background `glmv serve` on the
tiny model, started once for the module with `glmv start` and stopped at the end with `glmv stop`."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import REPO
from glmv import resident
from glmv.cli import main

IMAGE = str(REPO / "input" / "image_1.png")


def glmv(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "glmv.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, **kw)


def run(args):
    """main() in this process, with no backend injected: it picks its backend as a user's command would."""
    out, err = io.StringIO(), io.StringIO()
    code = main(args, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


STARTS: list[subprocess.CompletedProcess] = []  # the module server's two `glmv start` processes


@pytest.fixture(scope="module")
def server(tiny_path):
    """One resident tiny server for the module, started by two `glmv start` processes at once (one of them must
    find the other's server: test_two_starts_at_once_load_the_model_once checks how they ended)."""
    cmd = [sys.executable, "-m", "glmv.cli", "start", "--model", "tiny", "--idle-timeout", "10m", "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
        STARTS[:] = [subprocess.CompletedProcess(cmd, p.returncode, *out) for p, out in zip(procs, outputs)]
        assert STARTS[0].returncode == 0, STARTS[0].stderr
        yield json.loads(STARTS[0].stdout)
    finally:
        for r in resident.list_residents():  # a failed test left it (or a second one) running
            resident.stop(r)


def test_start_records_the_server_and_ps_lists_it(server):
    assert "api_key" not in server and server["model"] == "tiny"
    state = Path(server["path"])
    assert state.stat().st_mode & 0o777 == 0o600  # holds the server's key
    assert json.loads(state.read_text())["api_key"]
    p = glmv("ps", "--json")
    assert [s["pid"] for s in json.loads(p.stdout)["servers"]] == [server["pid"]]
    p = glmv("ps")
    assert "tiny" in p.stdout and str(server["port"]) in p.stdout
    again = glmv("start", "--model", "tiny")  # a second start finds the first
    assert again.returncode == 0 and "already loaded" in again.stderr
    # the key is required: a stranger on this machine cannot use the model
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{server['base_url']}/models", timeout=10)
    assert exc.value.code == 401


def test_ask_uses_the_resident_model_without_torch(server):
    code = ("import sys, json\nfrom glmv.cli import main\n"
            f"rc = main(['ask', '--model', 'tiny', {IMAGE!r}, '-p', 'what is it?', '--max-new-tokens', '6', '--json'])\n"
            "print(json.dumps({'rc': rc, 'heavy': sorted(m for m in ('torch', 'transformers', 'openai', 'pydantic') "
            "if m in sys.modules)}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    answer, report = (json.loads(line) for line in p.stdout.strip().splitlines())
    assert report == {"rc": 0, "heavy": []}, p.stderr
    assert answer["usage"]["completion_tokens"] == 6 and answer["usage"]["prompt_tokens"] > 500  # the image went too
    assert answer["model"] == "tiny"
    assert f"using the resident tiny (pid {server['pid']}" in p.stderr
    assert "loading" not in p.stderr


def test_resident_not_used_when_the_model_or_a_setting_differs(server, tmp_path):
    code, _, err = run(["ask", "-p", "hi", "--model", str(tmp_path / "other-model")])
    assert code == 2 and f"the resident server on port {server['port']} is not used: it runs tiny" in err
    assert "no such folder" in err
    code, _, err = run(["ask", "-p", "hi", "--model", "tiny", "--device", "cuda"])
    assert "not used: it runs with device auto, not cuda" in err and code == 2
    code, _, err = run(["ask", "-p", "hi", "--model", "tiny", "--max-new-tokens", "2", "--no-server"])
    assert code == 0 and "using the resident" not in err and "loading tiny" in err


def test_resident_matches_explicit_settings_it_resolved(server):
    code, out, err = run(["ask", "-p", "hi", "--model", "tiny", "--device", "cpu", "--dtype", "float32",
                          "--max-pixels", "100000", "--max-new-tokens", "2"])
    assert code == 0 and "using the resident tiny" in err, err
    code, _, err = run(["ask", "-p", "hi", "--model", "tiny", "--max-pixels", "9000000", "--device", "cuda"])
    assert "it scales images to at most 4000000 pixels, fewer than 9000000" in err


def test_continue_the_last_conversation_and_a_given_one(server):
    code, out, err = run(["ask", "--model", "tiny", IMAGE, "-p", "first question", "--max-new-tokens", "3", "--json"])
    assert code == 0, err
    first = json.loads(out)
    code, out, err = run(["ask", "--model", "tiny", "-c", "-p", "second question", "--max-new-tokens", "3", "--json"])
    second = json.loads(out)
    assert second["conversation_id"] == first["conversation_id"]
    # the earlier turn, its image (read again from its path) and its answer are in the prompt
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 3
    run(["ask", "--model", "tiny", "-p", "unrelated", "--max-new-tokens", "2"])  # a new conversation
    code, out, err = run(["ask", "--model", "tiny", "--cid", first["conversation_id"], "-p", "third", "--max-new-tokens", "2",
                          "--json"])
    third = json.loads(out)
    assert third["conversation_id"] == first["conversation_id"]
    assert third["usage"]["prompt_tokens"] > second["usage"]["prompt_tokens"]
    code, out, _ = run(["logs", "--cid", first["conversation_id"], "--json", "-n", "0"])
    entries = json.loads(out)["entries"]
    assert [e["prompt"] for e in entries] == ["first question", "second question", "third"]
    assert entries[0]["inputs"][0]["source"] == IMAGE and len(entries[0]["inputs"][0]["sha256"]) == 64
    assert entries[0]["backend"] == "resident" and entries[0]["usage"]["completion_tokens"] == 3
    code, _, err = run(["ask", "--cid", "nope", "-p", "x"])
    assert code == 2 and "no conversation nope" in err


def test_backend_openai_names_the_served_model(server):
    key = json.loads(Path(server["path"]).read_text())["api_key"]
    code, out, err = run(["ask", "-p", "hi", "--backend", "openai", "--base-url", server["base_url"], "--api-key", key,
                          "--max-new-tokens", "2", "--json"])
    assert code == 0, err
    assert f"glmv: using tiny at {server['base_url']}" in err and json.loads(out)["model"] == "tiny"


# -- the chat REPL in a real terminal --------------------------------------------------------------
def _own_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty, so Ctrl-C there sends SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    def __init__(self, args):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "glmv.cli", *args], stdin=slave, stdout=slave, stderr=slave,
                                     cwd=REPO, preexec_fn=_own_terminal)
        os.close(slave)
        self.buf = bytearray()

    def expect(self, text, timeout=60):
        """Read until ``text`` appears after what earlier calls consumed; returns what came before it."""
        end = time.monotonic() + timeout
        while (i := self.buf.find(text.encode())) < 0:
            ready, _, _ = select.select([self.master], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise TimeoutError(f"{text!r} not seen; got {bytes(self.buf)[-1500:]!r}")
            try:
                self.buf += os.read(self.master, 65536)
            except OSError:
                raise EOFError(bytes(self.buf)) from None
        before = bytes(self.buf[:i]).decode(errors="replace")
        del self.buf[: i + len(text)]
        return before

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def test_chat_streams_stops_on_ctrl_c_and_takes_images(server, tmp_path):
    # seed 2 makes the tiny model write 2000 tokens (about 7 s): long enough to interrupt
    term = Terminal(["chat", "--model", "tiny", IMAGE, "--seed", "2", "--max-new-tokens", "2000"])
    try:
        banner = term.expect("you> ")
        assert "using the resident tiny" in banner and "image_1.png goes with your next message" in banner
        term.send(b"describe it\r")
        term.expect("describe it\r\n")
        t0 = time.monotonic()
        while len(term.buf) < 40:  # the answer streams: text arrives long before it is finished
            term.buf += os.read(term.master, 4096)
        assert "you> " not in term.buf.decode(errors="replace") and time.monotonic() - t0 < 5
        term.send(b"\x03")  # Ctrl-C stops the answer, not the program
        stopped = term.expect("you> ", timeout=30)
        assert "glmv: stopped" in stopped and "finish: cancelled" in stopped
        term.send(b"/image input/image_2.png\r")
        assert "input/image_2.png goes with your next message" in term.expect("you> ")
        term.send(b"/thinking off\r")
        assert "thinking off" in term.expect("you> ")
        term.send(b"/thinkng on\r")
        assert "did you mean /thinking?" in term.expect("you> ")
        term.send(b"/set max-new-tokens lots\r")
        assert "error: /set max-new-tokens needs a whole number, not 'lots'" in term.expect("you> ")
        term.send(b"/set max-new-tokens 4\r")
        term.expect("you> ")
        term.send(b"and this one?\r")
        reply = term.expect("you> ", timeout=60)
        assert "glmv: 4 tokens, prompt " in reply
        prompt_tokens = int(reply.split(" tokens, prompt ")[1].split(",")[0])
        assert prompt_tokens > 1500  # both images, the first turn and its partial answer
        transcript = tmp_path / "chat.md"
        term.send(f"/save {transcript}\r".encode())
        term.expect("you> ")
        text = transcript.read_text()
        assert "**You:** describe it" in text and "**You:** and this one?" in text and "image_2.png" in text
        term.send(b"\x04")  # Ctrl-D quits
        assert term.proc.wait(20) == 0
    finally:
        term.close()
    _, out, _ = run(["logs", "-n", "1", "--json"])
    (last,) = json.loads(out)["entries"]
    assert last["command"] == "chat" and last["prompt"] == "and this one?" and last["settings"]["thinking"] is False
    assert last["inputs"][0]["source"].endswith("input/image_2.png")


def test_batch_uses_the_resident_model(server, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):
        (src / name).write_bytes((REPO / "input" / "image_1.png").read_bytes())
    code, out, err = run(["batch", str(src), "--out", str(tmp_path / "out"), "--task", "describe", "--model", "tiny",
                          "--max-new-tokens", "3", "--json"])
    assert code == 0, err
    assert "using the resident tiny" in err
    summary = json.loads(out)
    assert (summary["items"], summary["done"], summary["failed"], summary["completion_tokens"]) == (2, 2, 0, 6)


def test_start_reports_why_a_model_cannot_load(server, tmp_path):
    code, _, err = run(["start", "--model", str(tmp_path / "no-such-model")])
    assert code == 2 and "no such folder" in err  # found before anything starts
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    p = glmv("start", "--model", str(broken), timeout=300)
    assert p.returncode == 2 and "exited while starting" in p.stderr and str(broken) in p.stderr
    assert p.stderr.startswith("glmv: starting ") and "Traceback" not in p.stderr
    assert [s["pid"] for s in json.loads(glmv("ps", "--json").stdout)["servers"]] == [server["pid"]]


def test_stop(server):
    p = glmv("stop", "--json")
    assert p.returncode == 0 and [s["pid"] for s in json.loads(p.stdout)["stopped"]] == [server["pid"]]
    assert not resident._is_server(server["pid"], server["path"]) and not Path(server["path"]).exists() and not Path(server["log"]).exists()
    assert "no background model" in glmv("ps").stdout
    code, _, err = run(["ask", "-p", "hi", "--model", "tiny", "--max-new-tokens", "1"])
    assert code == 0 and "using the resident" not in err


def test_a_stale_record_whose_pid_now_belongs_to_another_process_is_dropped_never_signalled(tmp_path):
    """A server killed -9 leaves its record; its pid may be reused by any process, which stop must not kill."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        record = resident.Resident(pid=other.pid, port=1, model="tiny", settings={}, api_key="k", started=time.time(),
                                   log=str(tmp_path / "x.log"))
        path = resident.state_dir() / "20200101-000000-dead00.json"
        resident.write_state(path, record)
        code, out, _ = run(["ps", "--json"])
        assert code == 0 and other.pid not in [s["pid"] for s in json.loads(out)["servers"]]
        assert not path.exists()  # dropped as stale
        resident.write_state(path, record)
        code, out, err = run(["stop", "--model", "tiny", "--json"])
        assert code == 0 and other.pid not in [s["pid"] for s in json.loads(out)["stopped"]]
        assert other.poll() is None  # still running: never signalled
    finally:
        other.kill()
        other.wait()


def test_two_starts_at_once_load_the_model_once(server):
    assert [p.returncode for p in STARTS] == [0, 0], [p.stderr for p in STARTS]
    assert {json.loads(p.stdout)["pid"] for p in STARTS} == {server["pid"]}  # one server, found by both
    assert sum("already loaded" in p.stderr for p in STARTS) == 1
