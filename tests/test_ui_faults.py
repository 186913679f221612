"""Hostile uploads to the web app: its handlers, in-process, against a scripted backend (no browser).

Each bad file must end in one clear message naming the file (a ``GlmvError``, which the page shows as an
error), never a traceback, never the file's bytes quoted back, and the backend is never asked to generate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from conftest import bomb_png, png_bytes
from glmv.errors import GlmvError
from test_ui import last, make_app

SECRET = "SECRET-TEXT-4711"


def _symlink_to_passwd(p: Path) -> None:
    p.symlink_to("/etc/passwd")


def _folder(p: Path) -> None:
    p.mkdir()


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


BAD_IMAGES: dict[str, Callable[[Path], None]] = {
    "text.png": _bytes(f"{SECRET} renamed to .png\n".encode()),
    "empty.png": _bytes(b""),
    "truncated.png": _bytes(png_bytes((300, 200))[:100]),
    "huge-header.png": _bytes(bomb_png(100_000, 100_000)),
    "junk.jpg": _bytes(os.urandom(4096)),
    "page.webp": _bytes(f"<html><body>{SECRET}</body></html>".encode()),
    "passwd.png": _symlink_to_passwd,
    "folder.png": _folder,
    "missing.png": lambda p: None,
}

BAD_ATTACHMENTS: dict[str, Callable[[Path], None]] = {
    **{k: BAD_IMAGES[k] for k in ("text.png", "empty.png", "truncated.png", "huge-header.png", "missing.png")},
    "empty.pdf": _bytes(b""),
    "text.pdf": _bytes(f"{SECRET} is not a PDF\n".encode()),
    "truncated.pdf": _bytes(b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R"),
    "junk.mp4": _bytes(os.urandom(2048)),
    "notes.txt": _bytes(f"{SECRET}\n".encode()),
    "tool.exe": _bytes(b"MZ" + os.urandom(512)),
}


def check_refused(tmp_path: Path, name: str, run: Callable) -> None:
    app, backend = make_app(tmp_path, "never")
    asked = []
    original = backend.generate
    backend.generate = lambda *a, **k: (asked.append(1), original(*a, **k))[1]
    with pytest.raises(GlmvError) as e:
        last(run(app))
    message = str(e.value)
    assert name in message and "\n" not in message and len(message) < 600, message
    assert SECRET not in message and "root:" not in message  # the file's bytes are never quoted
    assert not asked  # refused before the model


@pytest.mark.parametrize("tab", ["describe", "ocr", "html"])
@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_uploads(tmp_path, tab, name):
    path = tmp_path / name
    BAD_IMAGES[name](path)
    check_refused(tmp_path, name, lambda app: {
        "describe": lambda: app.describe(str(path), "", True, 16, "s"),
        "ocr": lambda: app.ocr(str(path), "", True, 16, "s"),
        "html": lambda: app.html(str(path), "", True, 16, "desktop", [], "s"),
    }[tab]())


@pytest.mark.parametrize("name", list(BAD_ATTACHMENTS))
def test_bad_chat_attachments(tmp_path, name):
    path = tmp_path / name
    BAD_ATTACHMENTS[name](path)
    check_refused(tmp_path, name, lambda app: app.chat({"text": "what is this?", "files": [{"path": str(path)}]},
                                                       [], [], True, False, True, 16, "s"))
