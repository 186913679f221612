"""Loading and validating images: the one place that turns user input into pixels.

Accepts a path, an http(s) URL, a ``data:`` URI, raw bytes, ``-`` (standard input) or a PIL image.
It sniffs the format from the bytes (not the file name), applies EXIF orientation, converts to RGB,
refuses decompression bombs before decoding, and scales large images down to the pixel budget (the
main lever on visual tokens, prefill time and memory). Every failure is a :class:`MediaError` that
names the input and says what to do.
"""

from __future__ import annotations

import base64
import binascii
import http
import http.client
import io
import ipaddress
import math
import re
import socket
import ssl
import stat
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

from .errors import MediaError
from .privacy import redact_url
from .settings import DEFAULT_MAX_PIXELS, MAX_DECODE_PIXELS

MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
# A local file or standard input is read into memory whole: cap it, so that `glmv ask /dev/zero` or a stray
# 50 GB file is refused rather than filling memory. Generous: a 300 s 4K video stays under it.
MAX_FILE_BYTES = 2 * 1024**3
URL_TIMEOUT_S = 20.0

# Magic numbers of the formats we decode.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


@dataclass
class LoadedImage:
    """A decoded RGB image and where it came from (for messages)."""

    image: Any  # PIL.Image.Image
    source: str
    original_size: tuple[int, int]
    # What a scaled-down image was made from (the file's bytes, or the caller's PIL image), kept so that
    # outputs in the input file's own pixels (grounding's annotated PNG) can be drawn at full size; the bytes
    # are compressed, so this costs far less memory than keeping the decoded original.
    origin: bytes | Any | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def full_image(self) -> Any:
        """The image at its original size (the input file's pixels): decoded again from the kept bytes when it was
        scaled down, else (nothing kept, e.g. a rendered PDF page) the scaled image enlarged back to that size."""
        from PIL import Image

        if self.image.size == self.original_size:
            return self.image
        if isinstance(self.origin, (bytes, bytearray)):
            w, h = self.original_size
            return decode_image(bytes(self.origin), self.source, max_pixels=w * h, max_decode_pixels=w * h).image
        if isinstance(self.origin, Image.Image) and self.origin.size == self.original_size:
            return self.origin.convert("RGB")
        return self.image.resize(self.original_size, Image.Resampling.BICUBIC)


def describe_source(source: Any) -> str:
    if isinstance(source, (str, Path)):
        s = str(source)
        if s.startswith("data:"):
            return s[:40] + ("..." if len(s) > 40 else "")
        return redact_url(s)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes, or None."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _not_image_message(name: str, data: bytes) -> str:
    # Never quote the bytes: a symlink to /etc/passwd, or a URL answered by an internal service, would
    # otherwise be read back to whoever sent the request. Name the kind and the size only.
    if not data:
        return f"cannot read image '{name}': the file is empty (0 bytes)"
    head = data[:16]
    if head.startswith(b"%PDF"):
        kind = "a PDF document"
    elif all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        kind = "text"
    else:
        kind = "data of an unknown kind"
    return f"cannot read image '{name}': not a PNG/JPEG/WebP/GIF/BMP/TIFF file (got {kind}, {len(data):,} bytes)"


def read_source_bytes(source: Any, *, allow_remote: bool = True, stdin: IO[bytes] | None = None,
                      remote: RemotePolicy | None = None, what: str = "image") -> bytes:
    """The raw bytes behind a path, URL, data URI, ``-`` or bytes.

    URLs are fetched only when ``allow_remote``, and then only under ``remote`` (see :class:`RemotePolicy`).
    """
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if not isinstance(source, (str, Path)):
        raise MediaError(f"cannot read {what} {describe_source(source)}: expected a path, URL or data URI")
    s = str(source)
    name = describe_source(s)
    if s == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return _read_capped(stream, f"cannot read {what} from standard input")
    if s.startswith("data:"):
        header, sep, payload = s.partition(",")
        if not sep:
            raise MediaError(f"cannot read {what} '{name}': malformed data URI (no ',' before the data)")
        try:
            if header.endswith(";base64"):
                return base64.b64decode(payload, validate=False)
            return urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"cannot read {what} '{name}': invalid base64 data ({exc})") from None
    scheme = urllib.parse.urlsplit(s).scheme.lower()
    if scheme in ("http", "https"):
        if not allow_remote:
            raise MediaError(f"cannot read {what} '{name}': fetching URLs is disabled here (the operator must allow remote media)")
        return download(s, remote or RemotePolicy(), what)
    if scheme == "file":
        s = urllib.parse.unquote(urllib.parse.urlsplit(s).path)
    elif len(scheme) > 1 and "://" in s:
        raise MediaError(f"cannot read {what} '{name}': unsupported URL scheme '{scheme}' (use http, https, a file or a data: URI)")
    try:
        path = Path(s).expanduser()
        st = path.stat()
    except FileNotFoundError:
        raise MediaError(f"cannot read {what} '{s}': no such file") from None
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a loop of symlinks, no permission
        raise MediaError(f"cannot read {what} '{s[:200]}': {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(f"cannot read {what} '{s}': it is a directory, not a file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):  # /dev/zero would never end
        raise MediaError(f"cannot read {what} '{s}': not a regular file (a device or socket)")
    if st.st_size > MAX_FILE_BYTES:
        raise MediaError(f"cannot read {what} '{s}': {st.st_size:,} bytes, over the {MAX_FILE_BYTES // 2**30} GiB "
                         f"that glmv reads into memory")
    try:
        with open(path, "rb") as f:  # a FIFO (glmv ask <(cmd)) has no size: the cap applies while reading
            return _read_capped(f, f"cannot read {what} '{s}'")
    except OSError as exc:
        raise MediaError(f"cannot read {what} '{s}': {exc.strerror or exc}") from None


def _read_capped(stream: IO[bytes], prefix: str) -> bytes:
    """All of ``stream``, refused once it passes :data:`MAX_FILE_BYTES` (never more than that in memory)."""
    chunks, total = [], 0
    while chunk := stream.read(16 * 2**20):
        total += len(chunk)
        if total > MAX_FILE_BYTES:
            raise MediaError(f"{prefix}: more than the {MAX_FILE_BYTES // 2**30} GiB that glmv reads into memory")
        chunks.append(chunk)
    return b"".join(chunks)


# -- remote media ----------------------------------------------------------------------------------
# A server that fetches URLs for its clients can be turned into a proxy into its own network (SSRF):
# cloud metadata at 169.254.169.254, admin ports on 127.0.0.1, the office LAN. So a URL is fetched only
# from public addresses: the host is resolved once, every address it resolves to is checked, the
# connection goes to the checked address (a second DNS answer cannot swap in 127.0.0.1), and each
# redirect is re-checked the same way.
def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class RemotePolicy:
    """How media URLs are fetched: public addresses only, few redirects, bounded size and time.

    ``trusted_hosts`` names hosts exempt from the address check (an intranet media server the operator
    vouches for). ``resolve`` maps (host, port) to IP address strings; tests replace it.
    """

    max_bytes: int = MAX_DOWNLOAD_BYTES
    timeout_s: float = URL_TIMEOUT_S  # for the whole fetch, redirects included
    max_redirects: int = 3
    trusted_hosts: frozenset[str] = frozenset()
    resolve: Callable[[str, int], list[str]] = _resolve
    ssl_context: ssl.SSLContext | None = None  # None: the system's trusted certificate authorities


def address_refusal(address: str) -> str | None:
    """Why media must not be fetched from ``address``, or None when it is a public unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return f"'{address}' is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4 inside IPv6 (::ffff:127.0.0.1, 6to4, NAT64 64:ff9b::/96) reaches the IPv4 address: judge that.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in ipaddress.IPv6Network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_refusal(str(embedded))
    for test, kind in ((ip.is_unspecified, "unspecified"), (ip.is_loopback, "loopback"),
                       (ip.is_link_local, "link-local"), (ip.is_multicast, "multicast"),
                       (ip.is_private, "private"), (ip.is_reserved, "reserved")):
        if test:
            return f"{ip} is {'an' if kind[0] == 'u' else 'a'} {kind} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked beforehand, whatever DNS would say now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is still verified for the host name (SNI included)."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext | None = None) -> None:
        super().__init__(host, port, timeout=timeout, context=context or ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _checked_address(label: str, host: str, port: int, policy: RemotePolicy, what: str) -> str:
    try:
        addresses = policy.resolve(host, port)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise MediaError(f"cannot fetch {what} {label}: cannot resolve '{host}' ({reason})") from None
    if not addresses:
        raise MediaError(f"cannot fetch {what} {label}: '{host}' has no address")
    if host.lower() not in policy.trusted_hosts:
        for address in addresses:  # all of them: a name may list a public and an internal address
            refusal = address_refusal(address)
            if refusal:
                raise MediaError(f"cannot fetch {what} {label}: refused, {refusal}; media URLs must point to "
                                 f"public hosts (send the file as a data: URI instead)")
    return addresses[0]


def download(url: str, policy: RemotePolicy | None = None, what: str = "image") -> bytes:
    """Fetch ``url`` under ``policy``; every failure is a MediaError that quotes none of the response."""
    policy = policy or RemotePolicy()
    deadline = time.monotonic() + policy.timeout_s
    current = url
    shown_url = redact_url(url)  # messages name the URL without its credentials
    for hop in range(policy.max_redirects + 1):
        parts = urllib.parse.urlsplit(current)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise MediaError(f"cannot fetch {what} '{shown_url}': {'a redirect leads' if hop else 'it points'} to a "
                             f"'{scheme}:' URL; only http and https are fetched")
        try:
            host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise MediaError(f"cannot fetch {what} '{shown_url}': invalid port in '{redact_url(current)}'") from None
        if not host:
            raise MediaError(f"cannot fetch {what} '{shown_url}': no host in '{redact_url(current)}'")
        shown = redact_url(current)  # before cutting: a cut userinfo would lose the '@' that marks it
        shown = shown if len(shown) <= 200 else shown[:200] + "..."  # a redirect's target is the server's text
        label = f"'{shown_url}'" + (f" (redirected to '{shown}')" if hop else "")
        address = _checked_address(label, host, port, policy, what)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MediaError(f"cannot fetch {what} '{shown_url}': no answer within {policy.timeout_s:g} s")
        if scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPSConnection(host, port, address, remaining, policy.ssl_context)
        else:
            conn = _PinnedHTTPConnection(host, port, address, remaining)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"User-Agent": "glmv", "Accept-Encoding": "identity"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise MediaError(f"cannot fetch {what} '{shown_url}': HTTP {resp.status} redirect without a Location")
                current = urllib.parse.urljoin(current, location.strip())
                continue
            if resp.status != 200:
                raise MediaError(f"cannot fetch {what} '{shown_url}': HTTP {resp.status} {_status_phrase(resp.status)}")
            return _read_bounded(resp, conn, shown_url, policy, deadline, what)
        except MediaError:
            raise
        except TimeoutError:
            raise MediaError(f"cannot fetch {what} '{shown_url}': no answer within {policy.timeout_s:g} s") from None
        except ssl.SSLError as exc:
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or type(exc).__name__
            raise MediaError(f"cannot fetch {what} '{shown_url}': TLS failed ({reason})") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise MediaError(f"cannot fetch {what} '{shown_url}': {reason} (check the address and your network, "
                             f"or pass a local file)") from None
        finally:
            conn.close()
    raise MediaError(f"cannot fetch {what} '{shown_url}': more than {policy.max_redirects} redirects")


def _status_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase  # ours, not the server's reason text
    except ValueError:
        return "error"


def _read_bounded(resp: Any, conn: Any, url: str, policy: RemotePolicy, deadline: float, what: str) -> bytes:
    limit = f"{policy.max_bytes // 2**20} MB" if policy.max_bytes % 2**20 == 0 else f"{policy.max_bytes:,} bytes"
    too_big = f"cannot fetch {what} '{url}': larger than the {limit} download limit"
    length = resp.getheader("Content-Length")
    if length and length.strip().isdigit() and int(length) > policy.max_bytes:
        raise MediaError(too_big)
    chunks, total = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MediaError(f"cannot fetch {what} '{url}': not complete within {policy.timeout_s:g} s")
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > policy.max_bytes:
            raise MediaError(too_big)
        chunks.append(chunk)


def fit_to_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most ``max_pixels`` pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _bomb_error(name: str, max_decode_pixels: int) -> MediaError:
    return MediaError(f"cannot read image '{name}': its size is over the {max_decode_pixels / 1e6:.0f} Mpx safety cap "
                      f"(a decompression bomb?); scale it down first")


def _corrupt_error(name: str, exc: Exception) -> MediaError:
    # Pillow's messages can name its internal objects ("cannot identify image file <_io.BytesIO object at 0x...>"):
    # keep only what helps the user.
    detail = re.sub(r"\s*<[^>]*>", "", str(exc)).strip() or type(exc).__name__
    return MediaError(f"cannot read image '{name}': the file is truncated or corrupt ({detail})")


def _open_header(data: bytes, name: str, max_decode_pixels: int) -> Any:
    """Open an image reading only its header, refusing non-images and bombs before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if sniff_format(data) is None:
        raise MediaError(_not_image_message(name, data))
    try:
        with warnings.catch_warnings():
            # We apply our own (lower) cap below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _bomb_error(name, max_decode_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _corrupt_error(name, exc) from None
    w, h = img.size
    if w * h > max_decode_pixels:
        img.close()
        raise MediaError(
            f"cannot read image '{name}': {w}x{h} is {w * h / 1e6:.0f} Mpx, over the "
            f"{max_decode_pixels / 1e6:.0f} Mpx safety cap; scale it down first"
        )
    return img


def image_size(data: bytes, name: str, max_decode_pixels: int = MAX_DECODE_PIXELS) -> tuple[int, int]:
    """The (width, height) an image's header declares; no pixel is decoded (for work budgets)."""
    with _open_header(data, name, max_decode_pixels) as img:
        return img.size


def decode_image(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decode_pixels: int = MAX_DECODE_PIXELS) -> LoadedImage:
    """Decode image bytes into an RGB PIL image within the pixel budget."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    img = _open_header(data, name, max_decode_pixels)
    try:
        with img:
            w, h = img.size
            if w < 1 or h < 1:
                raise MediaError(f"cannot read image '{name}': it has no pixels ({w}x{h})")
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    # Transparent areas become white, as a viewer shows them, not black.
                    rgba = img.convert("RGBA")
                    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                    canvas.paste(rgba, mask=rgba.getchannel("A"))
                    img = canvas
                else:
                    img = img.convert("RGB")
            original = img.size
            target = fit_to_pixels(*img.size, max_pixels)
            if target != img.size:
                img = img.resize(target, Image.Resampling.BICUBIC)
            return LoadedImage(image=img.copy(), source=name, original_size=original,
                               origin=data if target != original else None)
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise _bomb_error(name, max_decode_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _corrupt_error(name, exc) from None


def load_image(
    source: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_remote: bool = True,
    max_decode_pixels: int = MAX_DECODE_PIXELS,
    stdin: IO[bytes] | None = None,
    remote: RemotePolicy | None = None,
) -> LoadedImage:
    """Load one image from any accepted source (see module docstring)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a core dependency
        raise MediaError("glmv needs Pillow to read images: pip install pillow") from exc
    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, Image.Image):
        img = source.convert("RGB")
        original = img.size
        target = fit_to_pixels(*img.size, max_pixels)
        if target == img.size:
            return LoadedImage(img, "<image>", original)
        return LoadedImage(img.resize(target), "<image>", original, origin=source)
    name = "<stdin>" if source == "-" else describe_source(source)
    data = read_source_bytes(source, allow_remote=allow_remote, stdin=stdin, remote=remote)
    return decode_image(data, name, max_pixels=max_pixels, max_decode_pixels=max_decode_pixels)


def image_to_data_uri(image: Any, fmt: str = "PNG") -> str:
    """Encode a PIL image as a data URI (for remote backends and HTML previews)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "image/png" if fmt.upper() == "PNG" else f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
