from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# No test may reach the Hugging Face hub, whatever network the machine has: a stray hub id must fail fast (the
# "hub unreachable" path), never start a 20 GB download. Set before anything imports huggingface_hub, and
# inherited by every subprocess the tests start.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """One glmv cache per test session (the tiny checkpoint is built once into it), no hub access."""
    cache = os.environ.get("GLMV_TEST_CACHE") or str(tmp_path_factory.mktemp("glmv-cache"))
    old = {k: os.environ.get(k) for k in ("GLMV_CACHE", "HF_HUB_OFFLINE", "GLMV_MODEL")}
    os.environ["GLMV_CACHE"] = cache
    os.environ.pop("GLMV_MODEL", None)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_path(_isolated_cache):
    from glmv.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_backend(tiny_path):
    from glmv.backends.local import LocalBackend
    from glmv.settings import Settings

    backend = LocalBackend(Settings(model=str(tiny_path)), log=lambda m: None).load()
    yield backend
    backend.close()


def glmv_in_process(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """``glmv ARGS`` run by ``glmv.cli.main`` in this process, from the checkout's root, the backend chosen as a
    user's command chooses it (the tiny model loads in a fraction of a second once torch is imported). The same
    code as the console script without a new interpreter and its imports; a few tests keep real processes for
    the entry point itself. ``stdin``: the bytes an image read from ``-`` comes from."""
    import glmv.cli as cli

    built, real_default = [], cli._default_backend

    def default_backend(settings):  # the real one; recorded so that its inference thread ends with the command
        built.append(real_default(settings))
        return built[-1]

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_stdin = os.getcwd(), sys.stdin
    os.chdir(REPO)
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    cli._default_backend = default_backend
    try:  # what the core logs to sys.stderr (loading, "fast engine ready") lands where a process would print it
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(args), stdout=out, stderr=err)
    finally:
        cli._default_backend = real_default
        os.chdir(old_cwd)
        sys.stdin = old_stdin
        for backend in built:
            backend.close()
    return subprocess.CompletedProcess(["glmv", *args], code, out.getvalue(), err.getvalue())


def png_bytes(size=(64, 48), color=(200, 30, 30), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing a huge image, with almost no data (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def sample_png(tmp_path) -> Path:
    p = tmp_path / "red.png"
    p.write_bytes(png_bytes())
    return p
