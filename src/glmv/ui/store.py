"""What the web app remembers per browser: chats and Image → HTML versions, in SQLite in the cache folder.

Each browser carries a random id in its localStorage; every row is keyed by it, so two browsers never see
each other's chats. Uploaded files are copied into ``media/`` next to the database (Gradio's upload folder
is temporary) and named by their content hash, so a chat reopened after a server restart still has its
images. All access goes through one lock: SQLite connections are per call, the lock keeps writes ordered.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..privacy import private_dir, private_file, private_sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id TEXT PRIMARY KEY, browser TEXT NOT NULL, title TEXT NOT NULL, updated REAL NOT NULL,
    view TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chats_browser ON chats (browser, updated);
CREATE TABLE IF NOT EXISTS studio (
    browser TEXT PRIMARY KEY, updated REAL NOT NULL, image TEXT, versions TEXT NOT NULL);
"""


def new_id() -> str:
    return uuid.uuid4().hex


class Store:
    """Chats and studio versions per browser id."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.media = self.folder / "media"
        self.path = self.folder / "state.sqlite"
        # Chats and uploaded images are the user's own: 0700 folders, 0600 files, older ones tightened too.
        private_sqlite(self.path)
        private_dir(self.media)
        for kept in self.media.iterdir():
            if kept.is_file():
                private_file(kept)
        self._lock = threading.Lock()
        with self._db() as db:
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    # -- media ------------------------------------------------------------------------------------
    def keep(self, path: str | None) -> str | None:
        """A copy of an uploaded file that outlives Gradio's temporary folder (same path if already kept)."""
        if not path:
            return path
        src = Path(path)
        if src.parent == self.media or not src.is_file():
            return str(src)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:24]
        dest = self.media / f"{digest}{src.suffix.lower()}"
        if not dest.exists():
            tmp = dest.with_suffix(dest.suffix + ".part")
            private_file(tmp)  # created 0600 first: copyfile keeps an existing file's mode
            shutil.copyfile(src, tmp)
            tmp.replace(dest)
        return str(dest)

    # -- chats ------------------------------------------------------------------------------------
    def save_chat(self, browser: str, chat_id: str, title: str, view: list) -> None:
        """Save what the chat shows (the model-side history is rebuilt from it when the chat is reopened)."""
        with self._lock, self._db() as db:
            db.execute("INSERT INTO chats (id, browser, title, updated, view) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET title=excluded.title, updated=excluded.updated, "
                       "view=excluded.view WHERE chats.browser=excluded.browser",
                       (chat_id, browser, title[:80], time.time(), json.dumps(view)))

    def chats(self, browser: str) -> list[tuple[str, str, float]]:
        """(id, title, updated) of this browser's chats, newest first."""
        with self._lock, self._db() as db:
            rows = db.execute("SELECT id, title, updated FROM chats WHERE browser=? ORDER BY updated DESC",
                              (browser,)).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def chat(self, browser: str, chat_id: str) -> list | None:
        with self._lock, self._db() as db:
            row = db.execute("SELECT view FROM chats WHERE browser=? AND id=?", (browser, chat_id)).fetchone()
        return None if row is None else json.loads(row[0])

    def delete_chat(self, browser: str, chat_id: str) -> None:
        with self._lock, self._db() as db:
            db.execute("DELETE FROM chats WHERE browser=? AND id=?", (browser, chat_id))

    # -- Image → HTML studio --------------------------------------------------------------------------
    def save_studio(self, browser: str, image: str | None, versions: list[dict[str, Any]]) -> None:
        with self._lock, self._db() as db:
            db.execute("INSERT INTO studio (browser, updated, image, versions) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(browser) DO UPDATE SET updated=excluded.updated, image=excluded.image, "
                       "versions=excluded.versions", (browser, time.time(), image, json.dumps(versions)))

    def studio(self, browser: str) -> tuple[str | None, list[dict[str, Any]]]:
        with self._lock, self._db() as db:
            row = db.execute("SELECT image, versions FROM studio WHERE browser=?", (browser,)).fetchone()
        return (None, []) if row is None else (row[0], json.loads(row[1]))
