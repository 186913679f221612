"""Users' secrets and data: URLs shown without their credentials, files readable by their owner only.

A media URL can carry a password (``https://user:pass@host/x.png``) or a signed query (``?token=``, ``?sig=``,
``X-Amz-Signature=``). glmv records and echoes the URLs it is given: the history, ``glmv logs`` (text and
``--json``), ``--json`` answers, page markers and error messages. Each of those shows :func:`redact_url`'s form,
``https://***@host/x.png?sig=***``, so a log shared for a bug report, or read by someone else, leaks nothing
that opens the file. The host and path stay: they say which input it was.

What glmv keeps of users' work (the history database, the web app's saved chats, versions and uploaded
images, the resident server's record with its API key, and its log) is private to the user whatever the
umask: :func:`private_dir` makes folders 0700 and :func:`private_file` files 0600, and both tighten a folder or
file an older version left readable by others when it is opened again.
"""

from __future__ import annotations

import os
import re
import stat
import urllib.parse
from pathlib import Path

MASK = "***"
# Query (and fragment) parameters whose value is a credential: presigned S3/GCS URLs, Azure SAS, OAuth, API keys.
SECRET_PARAMS = frozenset({
    "token", "access_token", "id_token", "refresh_token", "auth", "authorization", "key", "api_key", "apikey",
    "api-key", "secret", "client_secret", "password", "passwd", "pass", "pwd", "sig", "signature", "code",
    "session", "sessionid", "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
    "x-goog-credential", "awsaccesskeyid", "googleaccessid", "policy", "credential",
})
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#]*@)")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def _redact_params(part: str) -> str:
    out = []
    for item in part.split("&"):
        name, eq, _value = item.partition("=")
        if eq and urllib.parse.unquote_plus(name).strip().lower() in SECRET_PARAMS:
            item = f"{name}={MASK}"
        out.append(item)
    return "&".join(out)


def redact_url(url: str) -> str:
    """``url`` without its userinfo and without the values of credential parameters (other text unchanged).

    Anything with a scheme counts (``ftp://u:p@h`` is echoed in an error too); ``data:`` URIs have no
    authority and are left alone (the history records those by hash only)."""
    if "://" not in url:
        return url
    url = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", url, count=1)
    base, hash_, fragment = url.partition("#")
    base, q, query = base.partition("?")
    if q:
        base += "?" + _redact_params(query)
    if hash_:
        base += "#" + _redact_params(fragment)
    return base


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URL in it redacted."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def _tighten(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` when others (or the group) could read it. A file someone else owns is left
    alone (chmod would fail, and it is not ours to change), and so is a shared sticky folder such as /tmp
    (``GLMV_CACHE=/tmp`` run as root must not lock everyone else out of it)."""
    try:
        st = os.stat(path)
        if st.st_mode & stat.S_ISVTX:
            return
        if stat.S_IMODE(st.st_mode) != mode and st.st_uid == os.getuid():
            os.chmod(path, mode)
    except OSError:
        pass


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (0700), made with its parents if missing."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # the mode applies to the last folder, minus the umask
    _tighten(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """``path`` as a file only its owner can read (0600), created empty if missing. SQLite creates its journal
    and WAL files with the database's mode, so a private database keeps those private too."""
    path = Path(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    _tighten(path, 0o600)
    return path


def private_sqlite(path: Path) -> Path:
    """A database file, its folder and any journal, WAL or shared-memory file beside it, all private."""
    private_dir(Path(path).parent)
    private_file(path)
    for suffix in ("-journal", "-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            _tighten(side, 0o600)
    return Path(path)


__all__ = ["redact_url", "redact_text", "MASK", "SECRET_PARAMS", "private_dir", "private_file", "private_sqlite"]
