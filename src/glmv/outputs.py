"""Writing results to disk without ever leaving a half-written file.

Every file is written to a temporary name in the target folder and renamed into place, so a reader
(or a crash) sees either the whole file or nothing.
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import GlmvError


def ensure_writable_dir(folder: Path) -> Path:
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GlmvError(f"cannot create output folder '{folder}': {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise GlmvError(f"output folder '{folder}' is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GlmvError(f"output folder '{folder}' is not writable: choose another with --out")
    return folder


def json_text(obj: Any, **kwargs: Any) -> str:
    """JSON as readable UTF-8 text; where a string cannot be UTF-8 (a file name with a byte like 0xff, which
    Python holds as a lone surrogate) it is written with ``\\u`` escapes instead, which read back the same."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, **kwargs)
    return text


def write_atomic(path: Path, data: str | bytes, *, exclusive: bool = False) -> Path:
    """Write ``data`` to ``path`` via a temp file and rename. With ``exclusive`` an existing file wins."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # surrogateescape: a lone surrogate (from a file name that is not UTF-8) goes back to its own byte
        text_mode = {"encoding": "utf-8", "errors": "surrogateescape"}
        with os.fdopen(fd, mode, **({} if isinstance(data, bytes) else text_mode)) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails with FileExistsError instead of overwriting
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_html(page: str, out_dir: Path, now: _dt.datetime | None = None) -> Path:
    """Save a page as ``out_dir/generated_YYYYMMDD_HHMMSS.html`` (``_2``, ``_3``... if taken)."""
    folder = ensure_writable_dir(out_dir)
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d_%H%M%S")
    for n in range(1, 1000):
        name = f"generated_{stamp}.html" if n == 1 else f"generated_{stamp}_{n}.html"
        try:
            return write_atomic(folder / name, page, exclusive=True)
        except FileExistsError:
            continue
        except OSError as exc:  # a full disk or quota: nothing half-written is left (write_atomic cleans up)
            raise GlmvError(f"cannot save the page in '{folder}': {exc.strerror or exc}; free some space or "
                            f"choose another folder (--out)") from None
    raise GlmvError(f"cannot save HTML in '{folder}': too many files named generated_{stamp}_*.html")


def text_as_page(text: str, title: str = "glmv answer") -> str:
    """A minimal page showing plain text, for answers that contained no HTML."""
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_html.escape(title)}</title></head>\n"
        f"<body><pre style=\"white-space: pre-wrap\">{_html.escape(text)}</pre></body></html>\n"
    )
