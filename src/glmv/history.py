"""The prompt and answer history: SQLite in the cache folder, for ``glmv logs``, ``ask -c`` and ``chat``.

Every answer the command line produces is one row: the conversation it belongs to, the command, model and
backend, the prompt and system prompt, the inputs (paths or URLs, each with a sha256 of its bytes: never the
bytes themselves, and a ``data:`` URI is recorded by its hash only; a URL without its credentials, see
``privacy.py``), the answer and reasoning, the settings, token usage, timings and finish reason. A
conversation is continued by reading its turns back and loading the inputs again from their paths. Logging is
off with ``--no-log`` for one command, ``GLMV_HISTORY=off`` for a shell, or ``glmv logs off`` for good (a
marker file beside the database). The database is private to the user (0600 in a 0700 folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ContextLengthError, GlmvError, LimitError
from .privacy import MASK, private_sqlite, redact_url
from .prompts import Message
from .settings import cache_root

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL,
    created REAL NOT NULL,
    command TEXT NOT NULL,
    model TEXT,
    backend TEXT,
    prompt TEXT NOT NULL,
    system TEXT,
    inputs TEXT NOT NULL,      -- JSON list of {"source", "sha256"}
    answer TEXT NOT NULL,
    thinking TEXT,
    settings TEXT NOT NULL,    -- JSON: sampling, thinking, pages, ...
    usage TEXT NOT NULL,       -- JSON: prompt_tokens, completion_tokens
    timings TEXT NOT NULL,     -- JSON: ttft_s, total_s, tokens_per_s, ...
    finish_reason TEXT
);
CREATE INDEX IF NOT EXISTS responses_conversation ON responses (conversation_id, id);
"""
OFF_VALUES = ("0", "off", "false", "no")


def db_path() -> Path:
    return cache_root() / "history.sqlite"


def _off_marker() -> Path:
    return cache_root() / "history-off"


def enabled() -> bool:
    """False when ``GLMV_HISTORY`` is off/0/false/no, or after ``glmv logs off``."""
    if os.environ.get("GLMV_HISTORY", "").strip().lower() in OFF_VALUES:
        return False
    return not _off_marker().exists()


def set_enabled(on: bool) -> None:
    marker = _off_marker()
    if on:
        marker.unlink(missing_ok=True)
    else:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("history logging is off; `glmv logs on` turns it back on\n", encoding="utf-8")


def new_conversation_id() -> str:
    return time.strftime("%y%m%d") + secrets.token_hex(3)


def describe_input(source: str) -> dict[str, Any]:
    """How an input is remembered: its path (absolute) or URL, and the sha256 of its bytes where readable."""
    if source.startswith("data:"):
        return {"source": "data:", "sha256": hashlib.sha256(source.encode("utf-8")).hexdigest()}
    if source == "-" or "://" in source:
        return {"source": redact_url(source), "sha256": None}
    path = Path(source).expanduser()
    digest = None
    try:
        if path.is_file():  # not a FIFO or device, which reading would block on or drain
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):  # a video may be gigabytes: never whole in memory
                    sha.update(block)
            digest = sha.hexdigest()
    except OSError:
        pass
    return {"source": str(path.resolve()), "sha256": digest}


@dataclass
class Entry:
    """One logged answer."""

    id: int
    conversation_id: str
    created: float
    command: str
    model: str | None
    backend: str | None
    prompt: str
    system: str | None
    inputs: list[dict[str, Any]]
    answer: str
    thinking: str | None
    settings: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["created"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.created))
        return d


_JSON_COLUMNS = ("inputs", "settings", "usage", "timings")


class History:
    """The history database (created on first use)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or db_path()
        try:
            private_sqlite(self.path)  # prompts and answers: for the user's eyes only (0600 in a 0700 folder)
            self.db = sqlite3.connect(self.path, timeout=10)
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise GlmvError(f"cannot open the history database {self.path}: {exc} "
                            f"(--no-log or GLMV_HISTORY=off skips it)") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "History":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def log(self, *, conversation_id: str, command: str, model: str | None, backend: str | None, prompt: str,
            system: str | None, inputs: list[dict[str, Any]], answer: str, thinking: str | None,
            settings: dict[str, Any], usage: dict[str, Any], timings: dict[str, Any], finish_reason: str | None) -> int:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO responses (conversation_id, created, command, model, backend, prompt, system, inputs,"
                " answer, thinking, settings, usage, timings, finish_reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (conversation_id, time.time(), command, model, backend, prompt, system, json.dumps(inputs), answer,
                 thinking, json.dumps(settings), json.dumps(usage), json.dumps(timings), finish_reason))
        return int(cur.lastrowid or 0)

    def _entries(self, where: str = "", params: tuple[Any, ...] = (), limit: int | None = None,
                 newest_first: bool = True) -> list[Entry]:
        sql = "SELECT * FROM responses" + (f" WHERE {where}" if where else "")
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        self.db.row_factory = sqlite3.Row
        rows = self.db.execute(sql, params).fetchall()
        out = []
        for row in rows:
            d = dict(row)
            for k in _JSON_COLUMNS:
                d[k] = json.loads(d[k]) if d[k] else ({} if k != "inputs" else [])
            for item in d["inputs"]:  # rows written before URLs were redacted on the way in
                if isinstance(item, dict) and isinstance(item.get("source"), str):
                    item["source"] = redact_url(item["source"])
            out.append(Entry(**d))
        return out

    def last_conversation_id(self) -> str | None:
        row = self.db.execute("SELECT conversation_id FROM responses ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def conversation(self, conversation_id: str) -> list[Entry]:
        """The turns of one conversation, oldest first."""
        return self._entries("conversation_id = ?", (conversation_id,), newest_first=False)

    def search(self, n: int = 10, query: str | None = None, conversation_id: str | None = None) -> list[Entry]:
        """The ``n`` latest entries (matching ``query`` in prompt or answer), returned oldest first."""
        clauses, params = [], []
        if query:
            clauses.append("(prompt LIKE ? ESCAPE '\\' OR answer LIKE ? ESCAPE '\\')")
            like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            params += [like, like]
        if conversation_id:
            clauses.append("conversation_id = ?")
            params.append(conversation_id)
        return list(reversed(self._entries(" AND ".join(clauses), tuple(params), limit=n)))

    def unused_conversation_id(self) -> str:
        """A new id no logged conversation has: a day's ids share their date, and with 16 million random
        suffixes a script asking a thousand times a day would otherwise merge two conversations every month."""
        while True:
            cid = new_conversation_id()
            if self.db.execute("SELECT 1 FROM responses WHERE conversation_id = ? LIMIT 1", (cid,)).fetchone() is None:
                return cid

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])


def record(*, conversation_id: str | None, command: str, model: str | None, backend: str | None, prompt: str,
           system: str | None, sources: list[str], payload: dict[str, Any], settings: dict[str, Any]) -> str:
    """Log one answer, given as the command's JSON payload (answer, thinking, usage, timings, finish_reason).
    ``conversation_id`` None starts a new conversation; returns the conversation's id."""
    inputs = [describe_input(s) for s in sources]
    with History() as h:
        try:
            conversation_id = conversation_id or h.unused_conversation_id()
            h.log(conversation_id=conversation_id, command=command, model=model, backend=backend, prompt=prompt,
                         system=system, inputs=inputs, answer=payload.get("answer", ""),
                         thinking=payload.get("thinking") or None, settings=settings, usage=payload.get("usage", {}),
                         timings=payload.get("timings", {}), finish_reason=payload.get("finish_reason"))
        except sqlite3.Error as exc:  # locked for longer than the timeout, disk full, ...
            raise GlmvError(f"cannot write to the history database {h.path}: {exc}") from None
    return conversation_id


def replay(entries: list[Entry], load: Callable[[str, str | None], list[Any]],
           warn: Callable[[str], None]) -> list[Message]:
    """The messages of earlier turns: each prompt with its inputs loaded again (``load(source, pages)``), then
    the answer. Inputs that cannot be read again (standard input, data: URIs, deleted files) are left out, with
    a warning; a file that changed since is used as it is now, with a warning. ``load`` raising
    :class:`LimitError` or :class:`ContextLengthError` (the conversation is over the work limits) ends it."""
    messages: list[Message] = []
    if entries and entries[0].system:
        messages.append(Message("system", [entries[0].system]))
    for e in entries:
        media: list[Any] = []
        for item in e.inputs:
            source = item.get("source", "")
            if source in ("-", "data:"):
                what = "standard input" if source == "-" else "a data: URI"
                warn(f"an input of an earlier turn ({what}) cannot be read again: left out")
                continue
            if "://" in source and MASK in source:
                warn(f"'{source}' was recorded without its credentials and cannot be fetched again: left out")
                continue
            try:
                media.extend(load(source, e.settings.get("pages")))
            except (LimitError, ContextLengthError):
                raise  # over the command's limits: refused as a fresh request would be, not quietly shortened
            except GlmvError as exc:
                warn(f"{exc}: left out of the conversation")
                continue
            if item.get("sha256") and not source.startswith(("http://", "https://")):
                if describe_input(source)["sha256"] != item["sha256"]:
                    warn(f"'{source}' changed since it was sent; the conversation goes on with it as it is now")
        messages.append(Message("user", [*media, e.prompt]))
        messages.append(Message("assistant", [e.answer]))
    return messages
