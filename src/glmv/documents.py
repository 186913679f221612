"""PDFs, slide decks and office files, and video: turned into what the model reads.

- PDF pages are rendered with pypdfium2 at a resolution chosen from a target long side (or a dpi), for a
  page range like ``1-5,9``; each page becomes an image.
- Slide decks and office files (.pptx, .odp, .docx, ...) are converted to PDF by LibreOffice headless when it
  is installed.
- Video is decoded with PyAV and sampled at the processor's rate (2 frames a second) up to a duration cap;
  the frames and their timestamps go through the processor's video path, so answers can refer to moments.

Every failure is a :class:`~glmv.errors.MediaError` naming the file and what to do.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MediaError
from .limits import Budget
from .media import LoadedImage, RemotePolicy, describe_source, fit_to_pixels, read_source_bytes
from .settings import DEFAULT_LONG_SIDE, DEFAULT_MAX_PIXELS, MAX_DECODE_PIXELS

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
PDF_EXTS = {".pdf"}
OFFICE_EXTS = {".pptx", ".ppt", ".odp", ".docx", ".doc", ".odt", ".key"}
VIDEO_EXTS = {".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi"}
VIDEO_FPS = 2.0
VIDEO_MAX_SECONDS = 300.0
VIDEO_MAX_FRAMES = 600
VIDEO_FRAME_PIXELS = 700_000  # per sampled frame; the processor shrinks further to fit its per-video budget


@dataclass
class LoadedVideo:
    """Sampled RGB frames (uint8 [T, H, W, 3]) with the metadata the processor needs for timestamps."""

    frames: Any
    metadata: Any  # transformers VideoMetadata
    source: str
    data: bytes = field(default=b"", repr=False)  # the original file, for remote backends

    @property
    def timestamps(self) -> list[float]:
        return list(self.metadata.timestamps)

    def data_uri(self) -> str:
        return "data:video/mp4;base64," + base64.b64encode(self.data).decode("ascii")


def kind_of(path: Path) -> str:
    ext = path.suffix.lower()
    for kind, exts in (("image", IMAGE_EXTS), ("pdf", PDF_EXTS), ("office", OFFICE_EXTS), ("video", VIDEO_EXTS)):
        if ext in exts:
            return kind
    return "unknown"


def sniff_kind(data: bytes) -> str | None:
    if data.startswith(b"%PDF"):
        return "pdf"
    if data[4:8] == b"ftyp" or data.startswith(b"\x1a\x45\xdf\xa3") or (data[:4] == b"RIFF" and data[8:12] == b"AVI "):
        return "video"
    return None


# -- page ranges -----------------------------------------------------------------------------------
MAX_PAGE_SPEC_CHARS = 1000
MIN_DPI, MAX_DPI = 10.0, 2400.0  # a letter page at 2400 dpi is far over the 64 Mpx cap already
PATCH_PX, MAX_LONG_SIDE = 28, 20_000  # a page smaller than one visual patch is nothing to read


def parse_pages(spec: str | None, n_pages: int, source: str = "document") -> list[int]:
    """``"1-5,9"`` -> [0, 1, 2, 3, 4, 8] (0-based), in the order given, each page once.

    An open or overlong end (``3-``, ``2-999``) stops at the last page; a start past the end is an error.
    The work is bounded by the spec's length plus the document's real page count, never by the numbers in
    the spec (``1-999999999`` costs no more than ``1-``).
    """
    if n_pages <= 0:
        raise MediaError(f"cannot read '{source}': it has no pages")
    if spec is None or not spec.strip():
        return list(range(n_pages))
    if len(spec) > MAX_PAGE_SPEC_CHARS:
        raise MediaError(f"invalid page range: {len(spec)} characters, over {MAX_PAGE_SPEC_CHARS}; use ranges like 1-50")
    out: list[int] = []
    seen = bytearray(n_pages)
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                start, end = int(a) if a else 1, int(b) if b else n_pages
            else:
                start = end = int(part)
        except ValueError:
            raise MediaError(f"invalid page range '{spec}': use numbers like 1-5,9") from None
        if start > n_pages:
            raise MediaError(f"page range '{part}' is outside '{source}', which has {n_pages} page(s)")
        if start < 1 or end < start:
            raise MediaError(f"invalid page range '{part}' in '{spec}'")
        for p in range(start - 1, min(end, n_pages)):
            if not seen[p]:
                seen[p] = 1
                out.append(p)
    if not out:
        raise MediaError(f"the page range '{spec}' selects no pages")
    return out


# -- PDF -------------------------------------------------------------------------------------------
# PDFium is not thread-safe: two threads inside it at once corrupt its heap ("double free or corruption",
# segfaults), even on different documents. So every call into it (open, page count, page size, render,
# close) holds this one process-wide lock, and every PDFium object is closed explicitly under it, so that
# no garbage-collector finalizer ever calls into PDFium from another thread. Rendering is serialized page
# by page; the lock is not held while our own code resizes the pixels.
PDFIUM_LOCK = threading.RLock()


@dataclass
class PdfInfo:
    """What a PDF costs before anything is rendered: the real page count and each selected page's size."""

    name: str
    data: bytes = field(repr=False)
    n_pages: int
    indices: list[int]  # selected pages, 0-based
    sizes_pt: list[tuple[float, float]]  # (width, height) in points, one per selected page


def _open_pdf(data: bytes, name: str) -> Any:
    """Open a document; the caller holds :data:`PDFIUM_LOCK` and closes it."""
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise MediaError("reading PDFs needs pypdfium2: pip install pypdfium2") from None
    if not data:
        raise MediaError(f"cannot read PDF '{name}': the file is empty (0 bytes)")
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        # PDFium's error code can be stale from an earlier document, so look at the file itself.
        if b"/Encrypt" in data:
            raise MediaError(f"cannot read PDF '{name}': it is encrypted (password protected); decrypt it first "
                             f"(for example: qpdf --decrypt in.pdf out.pdf)") from None
        if re.search(rb"/Count\s+0\b", data) and not re.search(rb"/Type\s*/Page\b", data):
            raise MediaError(f"cannot read PDF '{name}': it has no pages") from None
        raise MediaError(f"cannot read PDF '{name}': the file is corrupt or not a PDF ({exc})") from None


def _page_size(doc: Any, index: int) -> tuple[float, float] | None:
    """A page's size in points, or None when PDFium cannot find that page (caller holds the lock)."""
    import pypdfium2 as pdfium

    try:
        w, h = doc.get_page_size(index)
    except pdfium.PdfiumError:
        return None
    return float(w), float(h)


def _real_page_count(doc: Any) -> int:
    """The number of pages the document really holds (caller holds the lock).

    PDFium trusts the page tree's ``/Count`` (up to about a million), so a 1-page file can claim 1,000,000
    pages. When the claimed last page does not exist, a binary search finds the last one that does
    (about 20 lookups, no rendering).
    """
    claimed = len(doc)
    if claimed <= 0 or _page_size(doc, claimed - 1) is not None:
        return max(claimed, 0)
    lo, hi = 0, claimed - 1  # pages before lo exist; page hi does not
    while lo < hi:
        mid = (lo + hi) // 2
        if _page_size(doc, mid) is not None:
            lo = mid + 1
        else:
            hi = mid
    return lo


def inspect_pdf(source: Any, pages: str | None = None, *, allow_remote: bool = True,
                remote: RemotePolicy | None = None, name: str | None = None) -> PdfInfo:
    """Read a PDF's real page count and the selected pages' sizes, rendering nothing."""
    name = name or describe_source(source)
    data = read_source_bytes(source, allow_remote=allow_remote, remote=remote, what="PDF")
    with PDFIUM_LOCK:
        doc = _open_pdf(data, name)
        try:
            n = _real_page_count(doc)
            if n == 0:
                raise MediaError(f"cannot read PDF '{name}': it has no readable pages (corrupt page tree?)")
            indices = parse_pages(pages, n, name)
            sizes = [_page_size(doc, i) or (612.0, 792.0) for i in indices]
        finally:
            doc.close()
    return PdfInfo(name, data, n, indices, sizes)


def pdf_page_count(source: Any) -> int:
    """The document's real page count (not the header's claim)."""
    return inspect_pdf(source).n_pages


def _render_scale(size_pt: tuple[float, float], long_side: int | None, dpi: float | None) -> float:
    return dpi / 72.0 if dpi else (long_side or DEFAULT_LONG_SIDE) / max(*size_pt, 1.0)


def page_render_size(size_pt: tuple[float, float], long_side: int | None, dpi: float | None) -> tuple[int, int]:
    """The pixel size PDFium renders a page of ``size_pt`` points at (known before rendering)."""
    scale = _render_scale(size_pt, long_side, dpi)
    return max(1, round(size_pt[0] * scale)), max(1, round(size_pt[1] * scale))


def render_pdf(
    source: Any,
    pages: str | None = None,
    long_side: int | None = DEFAULT_LONG_SIDE,
    dpi: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    info: PdfInfo | None = None,
) -> list[LoadedImage]:
    """Render the selected pages; each image's ``source`` names the file and page.

    ``info`` (from :func:`inspect_pdf`) saves reading and counting the document twice.
    """
    info = info or inspect_pdf(source, pages)
    name = info.name
    for i, size in zip(info.indices, info.sizes_pt):
        w, h = page_render_size(size, long_side, dpi)
        if w * h > MAX_DECODE_PIXELS:
            raise MediaError(f"cannot render page {i + 1} of '{name}': {w}x{h} pixels at this resolution is over the "
                             f"{MAX_DECODE_PIXELS // 10**6} Mpx safety cap; use a lower --dpi or --pdf-long-side")
    out = []
    with PDFIUM_LOCK:
        doc = _open_pdf(info.data, name)
    try:
        for i, size in zip(info.indices, info.sizes_pt):
            with PDFIUM_LOCK:
                try:
                    page = doc[i]
                    try:
                        bitmap = page.render(scale=_render_scale(size, long_side, dpi))
                        try:
                            img = bitmap.to_pil().convert("RGB")  # a copy: the bitmap's buffer is freed below
                        finally:
                            bitmap.close()
                    finally:
                        page.close()
                except Exception as exc:
                    raise MediaError(f"cannot render page {i + 1} of '{name}': {exc}") from None
            original = img.size
            target = fit_to_pixels(*img.size, max_pixels)
            if target != img.size:
                img = img.resize(target)
            out.append(LoadedImage(img, f"{name}#page={i + 1}", original))
        return out
    finally:
        with PDFIUM_LOCK:
            doc.close()


# -- office files ------------------------------------------------------------------------------------
def office_to_pdf(path: Path, workdir: Path | None = None) -> Path:
    """Convert a deck or document to PDF with LibreOffice headless; returns the PDF's path."""
    exe = shutil.which("soffice") or shutil.which("libreoffice")
    if exe is None:
        raise MediaError(
            f"cannot read '{path}': slide decks and office files need LibreOffice "
            f"(Debian/Ubuntu: apt-get install libreoffice-impress libreoffice-writer), or export it as PDF first"
        )
    if not path.exists():
        raise MediaError(f"cannot read '{path}': no such file")
    out_dir = Path(workdir or tempfile.mkdtemp(prefix="glmv-office-"))
    profile = Path(tempfile.mkdtemp(prefix="glmv-lo-profile-"))
    try:
        proc = subprocess.run(
            [exe, f"-env:UserInstallation=file://{profile}", "--headless", "--convert-to", "pdf", "--outdir",
             str(out_dir), str(path)],
            capture_output=True, text=True, timeout=300,
        )
    except subprocess.TimeoutExpired:
        raise MediaError(f"cannot convert '{path}' to PDF: LibreOffice took over 5 minutes") from None
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    pdf = out_dir / (path.stem + ".pdf")
    if proc.returncode != 0 or not pdf.exists():
        raise MediaError(f"cannot convert '{path}' to PDF with LibreOffice: {(proc.stderr or proc.stdout).strip()[:300]}")
    return pdf


# -- video -------------------------------------------------------------------------------------------
# PyAV needs no lock: each call opens its own container and codec context and nothing is shared between
# threads (FFmpeg is thread-safe across separate contexts; what crashes is one context on two threads).
def video_frame_size(width: int, height: int, max_pixels: int = VIDEO_FRAME_PIXELS) -> tuple[int, int]:
    """The size sampled frames are scaled to: within ``max_pixels``, each side at least one 28-pixel patch."""
    w, h = fit_to_pixels(width, height, max_pixels)
    return max(28, w), max(28, h)


def _open_video(data: bytes, name: str) -> tuple[Any, Any]:
    """Open a container and its first video stream (the caller closes the container)."""
    try:
        import av
    except ImportError:
        raise MediaError("reading video needs PyAV: pip install av") from None
    if not data:
        raise MediaError(f"cannot read video '{name}': the file is empty (0 bytes)")
    try:
        container = av.open(io.BytesIO(data))
    except Exception as exc:
        raise MediaError(f"cannot read video '{name}': not a video file PyAV can decode ({exc})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"cannot read video '{name}': it has no video stream")
    return container, container.streams.video[0]


def probe_video(data: bytes, name: str, fps: float = VIDEO_FPS, max_seconds: float = VIDEO_MAX_SECONDS,
                max_frames: int = VIDEO_MAX_FRAMES, max_pixels: int = VIDEO_FRAME_PIXELS) -> tuple[int, tuple[int, int]]:
    """How many frames :func:`load_video` will sample and their size, from the container header alone."""
    import av

    container, stream = _open_video(data, name)
    try:
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width < 1 or height < 1:
            raise MediaError(f"cannot read video '{name}': its header gives no frame size (corrupt?)")
        if width * height > MAX_DECODE_PIXELS:
            raise MediaError(f"cannot read video '{name}': {width}x{height} frames are over the "
                             f"{MAX_DECODE_PIXELS // 10**6} Mpx safety cap")
        if stream.duration and stream.time_base:
            seconds: float | None = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / av.time_base
        else:
            seconds = None  # unknown: assume the most we would sample
    finally:
        container.close()
    frames = max_frames if seconds is None else min(max_frames, int(min(seconds, max_seconds) * fps) + 1)
    return frames + frames % 2, video_frame_size(width, height, max_pixels)


def load_video(source: Any, fps: float = VIDEO_FPS, max_seconds: float = VIDEO_MAX_SECONDS,
               max_frames: int = VIDEO_MAX_FRAMES, max_pixels: int = VIDEO_FRAME_PIXELS, allow_remote: bool = True,
               remote: RemotePolicy | None = None, name: str | None = None) -> LoadedVideo:
    """Decode and sample a video at ``fps`` (frames in pairs, as the processor groups them in time)."""
    import numpy as np
    from transformers.video_utils import VideoMetadata

    name = name or describe_source(source)
    data = read_source_bytes(source, allow_remote=allow_remote, remote=remote, what="video")
    container, stream = _open_video(data, name)
    frames, indices = [], []
    try:
        src_fps = float(stream.average_rate or stream.guessed_rate or 25.0)
        step = 1.0 / fps
        next_t = 0.0
        last_t = 0.0
        width = height = None
        for i, frame in enumerate(container.decode(stream)):
            t = float(frame.time) if frame.time is not None else i / src_fps
            last_t = t
            if t > max_seconds or len(frames) >= max_frames:
                break
            if t + 1e-6 >= next_t:
                img = frame.to_image()
                if width is None:
                    width, height = video_frame_size(img.width, img.height, max_pixels)
                frames.append(np.asarray(img.convert("RGB").resize((width, height))))
                indices.append(int(round(t * src_fps)))
                next_t += step
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot read video '{name}': the file is truncated or corrupt ({exc})") from None
    finally:
        container.close()
    if not frames:
        raise MediaError(f"cannot read video '{name}': no frames could be decoded (truncated or corrupt?)")
    if len(frames) % 2:  # the processor pairs frames in time
        frames.append(frames[-1])
        indices.append(indices[-1])
    meta = VideoMetadata(total_num_frames=max(indices) + 1, fps=src_fps, duration=last_t, frames_indices=indices,
                         video_backend="pyav", width=width, height=height)
    return LoadedVideo(np.stack(frames), meta, name, data)


# -- one entry point for the front ends ------------------------------------------------------------------
@dataclass
class PlannedInput:
    """A source read and measured but not decoded: its bytes, its kind and what decoding it will cost."""

    kind: str  # image | pdf | video
    name: str
    data: bytes = field(repr=False)
    size: tuple[int, int] = (0, 0)  # image: from its header; video: each sampled frame's size
    frames: int = 0  # video: frames that will be sampled
    pdf: PdfInfo | None = None


def check_resolution(long_side: int | None, dpi: float | None) -> None:
    """Refuse a render resolution that is not a positive, finite number (``--dpi nan``, ``--pdf-long-side -3``)
    before any page is measured: PDFium would fail on it with a message about crop boxes, or render nothing."""
    if dpi is not None and not (MIN_DPI <= dpi <= MAX_DPI):  # NaN fails both comparisons
        raise MediaError(f"invalid --dpi {dpi:g}: use a number from {MIN_DPI:g} to {MAX_DPI:g} (or --pdf-long-side)")
    if long_side is not None and not (PATCH_PX <= long_side <= MAX_LONG_SIDE):
        raise MediaError(f"invalid --pdf-long-side {long_side!r}: use a number of pixels from {PATCH_PX} to "
                         f"{MAX_LONG_SIDE}")


@dataclass(frozen=True)
class RenderOptions:
    """How documents become images: the page range, the render resolution and the pixel cap."""

    pages: str | None = None
    long_side: int | None = DEFAULT_LONG_SIDE
    dpi: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        check_resolution(self.long_side, self.dpi)


def _is_local_path(source: Any) -> bool:
    return isinstance(source, (str, Path)) and str(source) != "-" and not str(source).startswith(("data:", "http://", "https://"))


def plan_input(source: Any, opts: RenderOptions = RenderOptions(), *, kind: str | None = None,
               allow_remote: bool = True, remote: RemotePolicy | None = None, stdin: Any = None) -> PlannedInput:
    """Read one source and measure it (image header, PDF page count and sizes, video header); decode nothing.

    ``kind`` forces image, pdf or video (a request part says which it is); otherwise a local file's
    extension decides, then the bytes' signature.
    """
    from .media import image_size

    name = "<stdin>" if str(source) == "-" else describe_source(source)
    if kind is None and _is_local_path(source):
        kind = kind_of(Path(source).expanduser())
        if kind == "office":
            source, kind = office_to_pdf(Path(source).expanduser()), "pdf"
        elif kind not in ("pdf", "video"):
            kind = "image"
    what = {"pdf": "PDF", "video": "video"}.get(kind or "", "image")
    data = read_source_bytes(source, allow_remote=allow_remote, remote=remote, stdin=stdin, what=what)
    if kind is None:
        kind = sniff_kind(data) or "image"
    if kind == "pdf":
        return PlannedInput("pdf", name, data, pdf=inspect_pdf(data, opts.pages, name=name))
    if kind == "video":
        frames, size = probe_video(data, name)
        return PlannedInput("video", name, data, size=size, frames=frames)
    return PlannedInput("image", name, data, size=image_size(data, name))


MAX_ASPECT = 200  # the processor refuses images whose long side is over 200 times the short one


def _check_aspect(name: str, size: tuple[int, int]) -> None:
    w, h = size
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        raise MediaError(f"cannot use '{name}': it is {w}x{h} pixels, more than {MAX_ASPECT} times as long as it is "
                         f"wide, which the model cannot take; crop it into parts")


def charge(planned: PlannedInput, budget: Budget, opts: RenderOptions = RenderOptions()) -> None:
    """Count a planned input against the budget (raises when a limit is passed or the model cannot take it)."""
    if planned.kind == "image":
        _check_aspect(planned.name, planned.size)
        budget.add_image(planned.name, planned.size, fit_to_pixels(*planned.size, opts.max_pixels))
    elif planned.kind == "pdf":
        assert planned.pdf is not None
        rendered = [page_render_size(size, opts.long_side, opts.dpi) for size in planned.pdf.sizes_pt]
        for i, size in zip(planned.pdf.indices, rendered):
            _check_aspect(f"{planned.name}#page={i + 1}", size)
        budget.add_pages(planned.name, rendered, [fit_to_pixels(w, h, opts.max_pixels) for w, h in rendered])
    else:
        _check_aspect(planned.name, planned.size)
        budget.add_video(planned.name, planned.frames, planned.size)


def decode_planned(planned: PlannedInput, opts: RenderOptions = RenderOptions()) -> list[Any]:
    """Decode or render a planned input: images, PDF pages as images, or one video."""
    from .media import decode_image

    if planned.kind == "pdf":
        return render_pdf(planned.data, opts.pages, opts.long_side, opts.dpi, opts.max_pixels, info=planned.pdf)
    if planned.kind == "video":
        # No more frames than the budget was charged for, even if the header understated the duration.
        return [load_video(planned.data, name=planned.name, max_frames=planned.frames)]
    return [decode_image(planned.data, planned.name, max_pixels=opts.max_pixels)]


def load_all(sources: list[Any], opts: RenderOptions = RenderOptions(), *, budget: Budget | None = None,
             allow_remote: bool = True, remote: RemotePolicy | None = None) -> list[Any]:
    """Plan every source, check the whole budget, then decode: nothing is decoded when anything is over."""
    plans = [plan_input(src, opts, allow_remote=allow_remote, remote=remote) for src in sources]
    if budget is not None:
        for planned in plans:
            charge(planned, budget, opts)
    return [m for planned in plans for m in decode_planned(planned, opts)]


def load_inputs(source: Any, *, pages: str | None = None, long_side: int | None = DEFAULT_LONG_SIDE,
                dpi: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, allow_remote: bool = True,
                budget: Budget | None = None) -> list[Any]:
    """Images, PDF pages (as images) or a video from one source (path, URL, data URI, bytes, ``-``)."""
    opts = RenderOptions(pages, long_side, dpi, max_pixels)
    return load_all([source], opts, budget=budget, allow_remote=allow_remote)
