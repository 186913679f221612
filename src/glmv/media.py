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
import io
import math
import sys
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import MediaError
from .settings import DEFAULT_MAX_PIXELS, MAX_DECODE_PIXELS

MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
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

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def describe_source(source: Any) -> str:
    if isinstance(source, (str, Path)):
        s = str(source)
        if s.startswith("data:"):
            return s[:40] + ("..." if len(s) > 40 else "")
        return s
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
    if not data:
        return f"cannot read image '{name}': the file is empty (0 bytes)"
    head = data[:16]
    if head.startswith(b"%PDF"):
        kind = "a PDF document"
    elif all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        kind = f"text starting {head.decode('ascii', 'replace')!r}"
    else:
        kind = f"unknown bytes {head[:8].hex(' ')}"
    return f"cannot read image '{name}': not a PNG/JPEG/WebP/GIF/BMP/TIFF file (got {kind})"


def read_source_bytes(source: Any, *, allow_remote: bool = True, stdin: IO[bytes] | None = None) -> bytes:
    """The raw bytes behind a path, URL, data URI, ``-`` or bytes."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if not isinstance(source, (str, Path)):
        raise MediaError(f"cannot read image {describe_source(source)}: expected a path, URL or data URI")
    s = str(source)
    name = describe_source(s)
    if s == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return stream.read()
    if s.startswith("data:"):
        header, sep, payload = s.partition(",")
        if not sep:
            raise MediaError(f"cannot read image '{name}': malformed data URI (no ',' before the data)")
        try:
            if header.endswith(";base64"):
                return base64.b64decode(payload, validate=False)
            return urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"cannot read image '{name}': invalid base64 data ({exc})") from None
    scheme = urllib.parse.urlsplit(s).scheme.lower()
    if scheme in ("http", "https"):
        if not allow_remote:
            raise MediaError(f"cannot read image '{s}': fetching URLs is disabled here (the operator must allow remote media)")
        return _download(s)
    if scheme == "file":
        s = urllib.parse.unquote(urllib.parse.urlsplit(s).path)
    path = Path(s).expanduser()
    if not path.exists():
        raise MediaError(f"cannot read image '{s}': no such file")
    if path.is_dir():
        raise MediaError(f"cannot read image '{s}': it is a directory, not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read image '{s}': {exc.strerror or exc}") from None


def _download(url: str) -> bytes:
    import urllib.error  # here, not at the top: urllib.request costs every command's start-up (email, http)
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "glmv"})
    try:
        with urllib.request.urlopen(req, timeout=URL_TIMEOUT_S) as resp:  # noqa: S310 (scheme checked)
            data = resp.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise MediaError(f"cannot fetch image '{url}': HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MediaError(f"cannot fetch image '{url}': {reason} (check the address and your network, or pass a local file)") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise MediaError(f"cannot fetch image '{url}': larger than {MAX_DOWNLOAD_BYTES // 2**20} MB")
    return data


def fit_to_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most ``max_pixels`` pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def decode_image(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decode_pixels: int = MAX_DECODE_PIXELS) -> LoadedImage:
    """Decode image bytes into an RGB PIL image within the pixel budget."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if sniff_format(data) is None:
        raise MediaError(_not_image_message(name, data))
    try:
        with warnings.catch_warnings():
            # We apply our own (lower) cap below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            w, h = img.size
            if w * h > max_decode_pixels:
                raise MediaError(
                    f"cannot read image '{name}': {w}x{h} is {w * h / 1e6:.0f} Mpx, over the "
                    f"{max_decode_pixels / 1e6:.0f} Mpx safety cap; scale it down first"
                )
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
            return LoadedImage(image=img.copy(), source=name, original_size=original)
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(
            f"cannot read image '{name}': its size is over the {max_decode_pixels / 1e6:.0f} Mpx safety cap "
            f"(a decompression bomb?); scale it down first"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        detail = str(exc) or type(exc).__name__
        raise MediaError(f"cannot read image '{name}': the file is truncated or corrupt ({detail})") from None


def load_image(
    source: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_remote: bool = True,
    max_decode_pixels: int = MAX_DECODE_PIXELS,
    stdin: IO[bytes] | None = None,
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
        return LoadedImage(img.resize(target) if target != img.size else img, "<image>", original)
    name = "<stdin>" if source == "-" else describe_source(source)
    data = read_source_bytes(source, allow_remote=allow_remote, stdin=stdin)
    return decode_image(data, name, max_pixels=max_pixels, max_decode_pixels=max_decode_pixels)


def image_to_data_uri(image: Any, fmt: str = "PNG") -> str:
    """Encode a PIL image as a data URI (for remote backends and HTML previews)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "image/png" if fmt.upper() == "PNG" else f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
