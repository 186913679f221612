"""Users' secrets and data: URLs are recorded and echoed without their credentials (history, glmv logs, --json,
error messages), and the files holding conversations are private to their owner (0700 folders, 0600 files)."""

from __future__ import annotations

import http.server
import io
import json
import threading

import pytest

from conftest import png_bytes
from glmv import history
from glmv.cli import main
from glmv.privacy import redact_text, redact_url
from test_cli import run_cli

SECRETS = ("hunter2", "tok123", "sig456", "AKIAXYZ", "amzsig789")


@pytest.mark.parametrize("url, shown", [
    ("https://user:hunter2@host/x.png", "https://***@host/x.png"),
    ("http://hunter2@host:8080/a/b.png?w=1", "http://***@host:8080/a/b.png?w=1"),
    ("https://a:b@c@host/x.png", "https://***@host/x.png"),  # the last '@' ends the userinfo
    ("https://host/x.png?token=tok123&w=2", "https://host/x.png?token=***&w=2"),
    ("https://host/x.png?X-Amz-Credential=AKIAXYZ&X-Amz-Signature=amzsig789&X-Amz-Expires=60",
     "https://host/x.png?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),
    ("https://host/x.png?sv=1&sig=sig456#access_token=tok123", "https://host/x.png?sv=1&sig=***#access_token=***"),
    ("ftp://u:hunter2@host/x", "ftp://***@host/x"),
    ("https://host/x.png", "https://host/x.png"),
    ("/home/me/user:pass@x.png", "/home/me/user:pass@x.png"),  # a path, not a URL
    ("data:image/png;base64,AAAA", "data:image/png;base64,AAAA"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_text_finds_every_url_in_a_message():
    text = "cannot fetch image 'https://u:hunter2@h/x.png?sig=sig456': refused; also see http://ok/y"
    assert redact_text(text) == "cannot fetch image 'https://***@h/x.png?sig=***': refused; also see http://ok/y"


def assert_no_secret(text: str | bytes) -> None:
    for secret in SECRETS:
        assert (secret.encode() if isinstance(text, bytes) else secret) not in text


@pytest.fixture
def fresh_history(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMV_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GLMV_HISTORY", raising=False)
    return tmp_path / "cache" / "history.sqlite"


@pytest.fixture
def png_server(monkeypatch):
    """A real HTTP server on 127.0.0.1 serving a PNG at any path; loopback is let through the address check
    (the check itself is tested in test_media)."""
    import glmv.media

    data = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(glmv.media, "address_refusal", lambda address: None)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def logs(*args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    assert main(["logs", *args], stdout=out, stderr=err) == 0, err.getvalue()
    return out.getvalue()


def test_a_url_with_credentials_is_logged_and_shown_without_them(fresh_history, png_server):
    url = f"http://user:hunter2@127.0.0.1:{png_server}/x.png?w=1&token=tok123&X-Amz-Signature=amzsig789"
    r = run_cli(["ask", url, "-p", "what colour?", "--json"])
    assert r.code == 0, r.err
    assert_no_secret(r.out + r.err)
    assert json.loads(r.out)["answer"] == "A red square."
    (entry,) = json.loads(logs("--json"))["entries"]
    assert entry["inputs"][0]["source"] == (f"http://***@127.0.0.1:{png_server}/x.png?w=1&token=***"
                                           f"&X-Amz-Signature=***")
    text = logs()
    assert "what colour?" in text
    assert_no_secret(text)
    assert_no_secret(fresh_history.read_bytes())
    # continuing cannot fetch it again without the credentials: it is left out with a warning, not an error
    r = run_cli(["ask", "-c", "-p", "and now?"])
    assert r.code == 0 and "recorded without its credentials" in r.err
    assert_no_secret(r.err)


def test_rows_written_before_redaction_are_shown_redacted(fresh_history):
    with history.History() as h:
        h.log(conversation_id="c1", command="ask", model="m", backend="local", prompt="p", system=None,
              inputs=[{"source": "https://u:hunter2@host/x.png?sig=sig456", "sha256": None}], answer="a",
              thinking=None, settings={}, usage={}, timings={}, finish_reason="stop")
    assert_no_secret(logs("--json"))
    assert_no_secret(logs())


@pytest.mark.parametrize("args", [
    ["ask", "https://user:hunter2@127.0.0.1:9/x.png?sig=sig456", "-p", "x"],  # refused: loopback
    ["ask", "ftp://user:hunter2@example.com/x.png", "-p", "x"],  # refused: scheme
    ["ocr", "https://user:hunter2@127.0.0.1:9/x.pdf", "--pages", "1"],
])
def test_error_messages_never_echo_credentials(fresh_history, args):
    r = run_cli(args)
    assert r.code == 2 and r.err.startswith("error: ") and "***@" in r.err
    assert_no_secret(r.err)


# -- files with users' data are private to their owner --------------------------------------------------
def mode(path) -> int:
    import os
    import stat

    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    """The loosest umask a user could have: every file would be world-readable and writable."""
    import os

    old = os.umask(0)
    yield
    os.umask(old)


def test_history_is_private_whatever_the_umask(fresh_history, open_umask, sample_png):
    assert run_cli(["ask", str(sample_png), "-p", "what colour?"]).code == 0
    assert mode(fresh_history) == 0o600 and mode(fresh_history.parent) == 0o700
    assert not list(fresh_history.parent.glob("history.sqlite-*"))  # no journal left readable beside it


def test_an_older_readable_history_is_tightened_when_opened(fresh_history):
    import sqlite3

    fresh_history.parent.mkdir(parents=True)
    sqlite3.connect(fresh_history).close()
    fresh_history.chmod(0o644)
    fresh_history.parent.chmod(0o755)
    history.History().close()
    assert mode(fresh_history) == 0o600 and mode(fresh_history.parent) == 0o700


def test_the_web_apps_store_is_private(tmp_path, open_umask, sample_png):
    from glmv.ui.store import Store

    folder = tmp_path / "ui"
    (folder / "media").mkdir(parents=True)
    old = folder / "media" / "old.png"
    old.write_bytes(b"x")
    old.chmod(0o644)
    store = Store(folder)
    kept = store.keep(str(sample_png))
    store.save_chat("browser", "chat", "title", [["hi", "hello"]])
    assert mode(folder) == 0o700 and mode(folder / "media") == 0o700
    assert mode(store.path) == 0o600 and mode(kept) == 0o600 and mode(old) == 0o600


def test_the_resident_record_and_its_folder_are_private(fresh_history, open_umask):
    import io
    import time

    from glmv import resident

    path = resident.new_state_path()
    resident.write_state(path, resident.Resident(pid=1, port=1, model="m", settings={}, api_key="k",
                                                 started=time.time(), log=str(path.with_suffix(".log"))))
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    path.parent.chmod(0o755)
    with resident.start_lock(io.StringIO()):
        pass
    assert mode(path.parent) == 0o700 and mode(path.parent / ".start.lock") == 0o600


def test_a_remote_servers_base_url_is_shown_without_its_password(fresh_history):
    from glmv.backends.remote import RemoteBackend
    from glmv.errors import ModelLoadError
    from glmv.settings import Settings
    from glmv.ui.manager import display_name

    backend = RemoteBackend("http://user:hunter2@127.0.0.1:9/v1?key=tok123", model="m")
    with pytest.raises(ModelLoadError) as exc:
        backend.load()
    assert "http://***@127.0.0.1:9/v1" in str(exc.value)
    assert_no_secret(str(exc.value))
    assert display_name(backend, Settings()) == "m (served by http://***@127.0.0.1:9/v1?key=***)"
    r = run_cli(["ask", "-p", "hi", "--backend", "openai", "--base-url", "http://user:hunter2@127.0.0.1:9/v1"])
    assert r.code == 2 and "***@127.0.0.1:9" in r.err
    assert_no_secret(r.err)


def test_a_shared_sticky_folder_is_never_tightened(tmp_path):
    """GLMV_CACHE=/tmp (as root, where chmod would succeed) must not lock other users out of /tmp."""
    from glmv.privacy import private_dir, private_sqlite

    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    private_sqlite(shared / "history.sqlite")
    private_dir(shared)
    assert mode(shared) == 0o1777 and mode(shared / "history.sqlite") == 0o600
