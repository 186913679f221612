"""Users' secrets in what glmv records and echoes: URLs are shown with their credentials taken out.

A media URL can carry a password (``https://user:pass@host/x.png``) or a signed query (``?token=``, ``?sig=``,
``X-Amz-Signature=``). glmv records and echoes the URLs it is given: the history, ``glmv logs`` (text and
``--json``), ``--json`` answers, page markers and error messages. Each of those shows :func:`redact_url`'s form,
``https://***@host/x.png?sig=***``, so a log shared for a bug report, or read by someone else, leaks nothing
that opens the file. The host and path stay: they say which input it was.
"""

from __future__ import annotations

import re
import urllib.parse

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


__all__ = ["redact_url", "redact_text", "MASK", "SECRET_PARAMS"]
