"""``glmv batch`` under faults: collisions, resume keys, stale failures, the folder lock, torn manifests, a full
disk, kill -9 at random moments, huge page counts, and mixed PDFs + images + video again and again.

The model is the scripted backend (real PDF rendering, real video and image decoding, real files); the tiny
model's end-to-end batch runs are in test_documents.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, bomb_png, png_bytes
from glmv.batch import FolderLock, Options, check_collisions, expand, run_batch
from glmv.cli import main
from glmv.errors import GlmvError
from glmv.testing.scripted import ScriptedBackend
from test_documents import make_pdf, make_video


def echo(request) -> str:
    """Answer with the name of what the model was shown, so every output can be traced to its source."""
    return "seen " + request.messages[-1].content[0].source


def run(inputs: list[Path], out: Path, script=echo, delay_s: float = 0.0, **opts) -> tuple[int, str]:
    err = io.StringIO()
    options = Options(task="ocr", prompt="read it", out=out, long_side=200, **opts)
    rc = run_batch([str(p) for p in inputs], options, lambda: ScriptedBackend(script, delay_s), err)
    return rc, err.getvalue()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().split("\n") if line]


def done_ids(out: Path) -> list[str]:
    return sorted(r["id"] for r in records(out) if r["status"] == "done")


def no_backend():
    raise AssertionError("the batch must be refused before any model work")


def img(path: Path, color=(200, 30, 30), size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(size, color))
    return path


# -- output layout and collisions -------------------------------------------------------------------------------
def test_outputs_keep_folder_and_full_name(tmp_path):
    src = tmp_path / "in"
    img(src / "a" / "x.png")
    img(src / "a" / "x.jpg", (0, 200, 0))  # same stem: used to overwrite x.md
    img(src / "doc.png")
    make_pdf(src / "doc.pdf", 2)  # same stem as doc.png
    out = tmp_path / "out"
    rc, err = run([src], out, fmt="both")
    assert rc == 0, err
    for rel in ("a/x.png", "a/x.jpg", "doc.png"):
        assert (out / f"{rel}.md").read_text() == f"seen {src / rel}\n"
        assert json.loads((out / f"{rel}.json").read_text())["source"] == str(src / rel)
    assert (out / "doc.pdf" / "page-0002.md").read_text() == f"seen {src / 'doc.pdf'}#page=2\n"
    joined = (out / "doc.pdf.md").read_text()
    assert joined.index("<!-- page 1 -->") < joined.index("#page=1") < joined.index("<!-- page 2 -->")
    assert done_ids(out) == sorted(["a/x.png", "a/x.jpg", "doc.png", "doc.pdf#page=1", "doc.pdf#page=2"])


def test_several_roots_get_their_own_subfolders(tmp_path):
    one, two = tmp_path / "one" / "scans", tmp_path / "two" / "scans"
    img(one / "x.png")
    img(two / "x.png", (0, 0, 250))
    make_pdf(tmp_path / "doc.pdf", 1)
    folder_named_like_the_pdf = tmp_path / "other" / "doc.pdf"
    img(folder_named_like_the_pdf / "y.png")
    out = tmp_path / "out"
    rc, err = run([one, two, tmp_path / "doc.pdf", folder_named_like_the_pdf, one], out)  # `one` twice: once
    assert rc == 0, err
    assert (out / "scans" / "x.png.md").read_text() == f"seen {one / 'x.png'}\n"
    assert (out / "scans-2" / "x.png.md").read_text() == f"seen {two / 'x.png'}\n"
    assert (out / "doc.pdf.md").exists() and (out / "doc.pdf" / "page-0001.md").exists()
    assert (out / "doc.pdf-2" / "y.png.md").read_text() == f"seen {folder_named_like_the_pdf / 'y.png'}\n"
    assert len(done_ids(out)) == 4


def test_colliding_outputs_are_refused_before_any_work(tmp_path):
    a, b = img(tmp_path / "a" / "x.png"), img(tmp_path / "b" / "x.png")
    out = tmp_path / "out"
    with pytest.raises(GlmvError, match=r"collide.*a/x.png' and '.*b/x.png' both write 'x.png.md'.*separate --out"):
        run_batch([str(a), str(b)], Options(task="ocr", prompt="p", out=out), no_backend)
    assert not (out / "manifest.jsonl").exists()
    # a folder called x.png.md next to x.png: one needs a file where the other needs a folder
    src = tmp_path / "c"
    img(src / "x.png")
    img(src / "x.png.md" / "y.png")
    stderr = io.StringIO()
    rc = main(["batch", str(src), "--out", str(out)], backend_factory=lambda s: no_backend(), stderr=stderr)
    assert rc == 2 and stderr.getvalue().count("\n") == 1
    assert stderr.getvalue().startswith("error: output names collide") and "needs a folder" in stderr.getvalue()


def test_case_insensitive_folders_refuse_names_that_differ_only_in_case(tmp_path):
    src = tmp_path / "in"
    img(src / "Scan.png")
    img(src / "scan.png")
    opts = Options(task="ocr", prompt="p", out=tmp_path / "out")
    plan = expand([str(src)])
    check_collisions(plan, opts, opts.out, ignores_case=False)  # a case-sensitive folder keeps both
    with pytest.raises(GlmvError, match="ignores case.*/Scan.png' and '.*/scan.png' both write"):
        check_collisions(plan, opts, opts.out, ignores_case=True)


# -- what "done" means -------------------------------------------------------------------------------------
def test_done_is_keyed_by_source_size_and_mtime(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    img(first / "x.png")
    img(second / "x.png", (0, 0, 255), (70, 50))  # never processed; same name as an image that was
    out = tmp_path / "out"
    assert run([first], out)[0] == 0
    rc, err = run([second], out)
    assert "1 to do" in err and (out / "x.png.md").read_text() == f"seen {second / 'x.png'}\n"
    assert f"replacing 1 result(s) written earlier for other files (first: 'x.png' from '{first / 'x.png'}')" in err
    rc, err = run([second], out)
    assert "0 to do, 1 already done" in err
    os.utime(second / "x.png", ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: done again
    assert "1 to do" in run([second], out)[1]
    img(second / "x.png", (9, 9, 9), (90, 50))  # replaced
    assert "1 to do" in run([second], out)[1]
    (out / "x.png.md").unlink()  # an output deleted by hand: redone
    assert "1 to do" in run([second], out)[1]
    assert "1 to do" in run([second], out, fmt="both")[1]  # a format not written yet
    assert len(done_ids(out)) == 6


def test_old_failures_do_not_outlive_their_files_and_retry_failed_clears_them(tmp_path):
    src = tmp_path / "in"
    img(src / "good.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)
    flaky = img(src / "flaky.png")
    tired = {"now": True}

    def fails_once(request):
        if "flaky" in request.messages[-1].content[0].source and tired["now"]:
            return GlmvError("the model is tired")
        return echo(request)

    out = tmp_path / "out"
    rc, err = run([src], out, script=fails_once)
    assert rc == 1 and "failed broken.jpg: cannot read" in err and "failed flaky.png: the model is tired" in err
    rc, err = run([src], out, script=fails_once)  # unchanged inputs: still failing, not retried
    assert rc == 1 and "0 to do" in err and "2 failing in all" in err
    tired["now"] = False
    rc, err = run([src], out, script=fails_once, retry_failed=True)
    assert rc == 1 and "failed flaky.png" not in err and "failed broken.jpg" in err
    (src / "broken.jpg").unlink()  # the failing file is gone: it no longer counts
    rc, err = run([src], out, script=fails_once)
    assert rc == 0 and "glmv: failed" not in err and "0 failing in all" in err, err
    assert (out / f"{flaky.name}.md").exists()


# -- the folder lock ---------------------------------------------------------------------------------------
def test_a_second_batch_on_the_same_folder_is_refused_and_a_dead_holder_does_not_block(tmp_path):
    src = tmp_path / "in"
    img(src / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from glmv.batch import FolderLock; FolderLock(Path(sys.argv[1])); print('locked', "
                               "flush=True); time.sleep(120)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        stderr = io.StringIO()
        rc = main(["batch", str(src), "--out", str(out)], backend_factory=lambda s: no_backend(), stderr=stderr)
        assert rc == 2 and stderr.getvalue() == (f"error: output folder '{out}' is in use by another glmv batch "
                                                 f"(pid {holder.pid}): wait for it to finish or choose another --out\n")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".glmv-batch.lock").exists()  # left behind by the killed holder: stale, and harmless
    assert run([src], out)[0] == 0
    lock = FolderLock(out)  # in-process too (a second descriptor is a second owner)
    try:
        with pytest.raises(GlmvError, match="in use by another glmv batch"):
            run([src], out)
    finally:
        lock.release()


# -- a torn manifest ------------------------------------------------------------------------------------------
TORN_TAILS = ['{"id": "b.png", "sta', '{"id": "b.png", "status": "failed", "error": "x"}', "\x00\x00"]


@pytest.mark.parametrize("tail", TORN_TAILS)
def test_a_torn_last_manifest_line_is_repaired(tmp_path, tail):
    src = tmp_path / "in"
    img(src / "a.png")
    img(src / "b.png")
    out = tmp_path / "out"
    assert run([src / "a.png"], out)[0] == 0
    with open(out / "manifest.jsonl", "a") as f:
        f.write("not json at all\n[1, 2]\n" + tail)  # junk lines, then one cut by a kill (no newline)
    rc, err = run([src], out)
    assert rc == 0 and "repaired the last line" in err and "1 to do" in err
    lines = (out / "manifest.jsonl").read_text().split("\n")[:-1]
    assert lines[1:3] == ["not json at all", "[1, 2]"]
    recs = [json.loads(line) for line in lines[:1] + lines[3:]]  # nothing glued onto the torn line
    assert sorted(r["id"] for r in recs if r["status"] == "done") == ["a.png", "b.png"]


def test_a_manifest_of_mostly_superseded_lines_is_compacted(tmp_path, monkeypatch):
    monkeypatch.setattr("glmv.batch.COMPACT_SLACK", 5)
    src = tmp_path / "in"
    x = img(src / "x.png")
    img(src / "y.png")
    out = tmp_path / "out"
    for i in range(12):  # x changes every run: one more superseded line each time (13 lines in all)
        os.utime(x, ns=(time.time_ns(), time.time_ns() + i * 10**9))
        assert run([src], out)[0] == 0
    lines = (out / "manifest.jsonl").read_text().split("\n")[:-1]
    assert 2 <= len(lines) < 12  # rewritten once on the way
    assert "0 to do, 2 already done" in run([src], out)[1]


# -- a full disk ---------------------------------------------------------------------------------------------
def mixed_inputs(root: Path, n_images: int = 4, pdf_pages: int = 2) -> Path:
    for i in range(n_images):
        img(root / ("sub" if i % 2 else "") / f"p{i:02d}.png", (i * 40, 90, 200))
    make_pdf(root / "doc.pdf", pdf_pages)
    return root


def assert_clean(out: Path) -> None:
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    for line in (out / "manifest.jsonl").read_text().split("\n")[:-1]:
        json.loads(line)  # every line whole


@pytest.mark.parametrize("fail_at,code", [(0, errno.ENOSPC), (1, errno.ENOSPC), (2, errno.EDQUOT), (5, errno.ENOSPC),
                                          (9, errno.EDQUOT), (12, errno.ENOSPC), (18, errno.ENOSPC)])
def test_a_full_disk_stops_cleanly_and_the_batch_resumes(tmp_path, monkeypatch, fail_at, code):
    """The disk "fills up" at the fail_at-th fsync: a real OSError from the real write path (outputs and manifest
    both sync every write), then space comes back."""
    src = mixed_inputs(tmp_path / "in")
    out = tmp_path / "out"
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > fail_at:
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    stderr = io.StringIO()
    rc = main(["batch", str(src), "--out", str(out), "--format", "both", "--pdf-long-side", "200", "--batch-size", "2"],
              backend_factory=lambda s: ScriptedBackend(echo), stderr=stderr)
    monkeypatch.setattr(os, "fsync", real_fsync)
    err = stderr.getvalue()
    assert rc == 2 and "glmv: done " in err and "not done" in err, err  # the summary came first
    last = err.strip().splitlines()[-1]
    word = "is full" if code == errno.ENOSPC else "quota"
    assert last.startswith("error: ") and word in last and "rerun the same command to resume" in last
    assert_clean(out)
    rc, err = run([src], out, fmt="both")
    assert rc == 0, err
    assert done_ids(out) == sorted(["p00.png", "sub/p01.png", "p02.png", "sub/p03.png", "doc.pdf#page=1",
                                    "doc.pdf#page=2"])  # each exactly once
    assert (out / "doc.pdf.md").exists() and (out / "sub" / "p03.png.json").exists()
    assert_clean(out)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this sandbox does not allow mounting a tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_really_full_tmpfs_stops_cleanly_and_resumes(tmp_path, small_tmpfs):
    src = tmp_path / "in"
    for i in range(8):
        img(src / f"p{i}.png", (i * 30, 0, 0))
    out = small_tmpfs / "out"
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"x" * (200 * 1024))  # about 50 KB left: a few 16 KB answers fit, not all
    big = lambda request: echo(request) + " " + "w" * 16_000  # noqa: E731
    with pytest.raises(GlmvError, match="the disk holding .* is full .*rerun the same command to resume"):
        run([src], out, script=big, batch_size=2)
    assert_clean(out)
    first = done_ids(out)
    assert len(first) < 8
    filler.unlink()  # space is back
    rc, err = run([src], out, script=big, batch_size=2)
    assert rc == 0, err
    assert done_ids(out) == sorted(f"p{i}.png" for i in range(8))
    assert_clean(out)


# -- huge documents --------------------------------------------------------------------------------------------
def test_pages_per_document_are_capped_with_a_message(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_pdf(src / "long.pdf", 5)
    img(src / "x.png")
    out = tmp_path / "out"
    rc, err = run([src], out, max_doc_pages=3)
    assert rc == 1 and "long.pdf' has 5 pages to read, more than the limit of 3 per document" in err
    assert "--pages" in err and "--max-doc-pages" in err
    assert len(records(out)) == 2 and not (out / "long.pdf").exists()
    rc, err = run([src], out, max_doc_pages=3, pages="2-3")
    assert rc == 0 and done_ids(out) == ["long.pdf#page=2", "long.pdf#page=3", "x.png"]


def test_a_pdf_claiming_a_million_pages_does_not_become_a_million_items(tmp_path):
    from pypdf import PdfReader, PdfWriter
    from pypdf.generic import NameObject, NumberObject

    src = tmp_path / "in"
    src.mkdir()
    make_pdf(tmp_path / "one.pdf", 1)
    writer = PdfWriter()
    writer.add_page(PdfReader(tmp_path / "one.pdf").pages[0])
    writer._root_object["/Pages"][NameObject("/Count")] = NumberObject(1_000_000)
    with open(src / "liar.pdf", "wb") as f:
        writer.write(f)
    img(src / "x.png")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc, err = run([src], out)
    assert time.perf_counter() - t0 < 20
    assert rc == 0, err  # its one real page is read, nothing else
    assert done_ids(out) == ["liar.pdf#page=1", "x.png"] and len(records(out)) == 2


# -- hostile files in the input folder ---------------------------------------------------------------------------
def test_hostile_files_fail_alone_with_a_clear_message(tmp_path):
    src = tmp_path / "in"
    img(src / "ok.png")
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("this is not an image")
    (src / "corrupt.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(300))
    (src / "empty.pdf").write_bytes(b"")
    (src / "junk.mp4").write_bytes(b"not a video" * 20)
    (src / "bomb.png").write_bytes(bomb_png(60_000, 60_000))  # 3.6 gigapixels announced in 100 bytes
    (src / ("n" * 248 + ".png")).write_bytes(png_bytes())  # x.png.json would be longer than a name may be
    img(src / "odd name\twith tab ü\u2028\x1c\x85.png")  # line separators for str.splitlines()
    (src / "loop").mkdir()
    (src / "loop" / "again").symlink_to(src)  # a folder cycle
    (src / "dangling.png").symlink_to(src / "nowhere.png")
    (src / ".hidden.png").write_bytes(b"secret")
    (src / "out").mkdir()
    img(src / "out" / "old-result.png")  # the output folder inside the input folder is never read
    out = src / "out"
    rc, err = run([src], out)
    assert rc == 1
    assert "Traceback" not in err
    failed = {r["id"]: r["error"] for r in records(out) if r["status"] == "failed"}
    assert set(failed) == {"empty.png", "text.png", "corrupt.pdf", "empty.pdf", "junk.mp4", "bomb.png", "n" * 248 + ".png"}
    for name, error in failed.items():
        assert name[:40] in error and not error.startswith("unexpected"), error
    assert done_ids(out) == ["odd name\twith tab ü\u2028\x1c\x85.png", "ok.png"]
    assert "0 to do, 2 already done" in run([src], out)[1]
    assert not (out / "out").exists()


def test_a_file_name_that_is_not_utf8_is_done_and_resumed(tmp_path):
    """A name with a byte like 0xff (Python holds it as a lone surrogate) stopped the whole batch with an
    unexpected UnicodeEncodeError, before any item; now its results are written and a rerun finds it done."""
    src = tmp_path / "in"
    img(src / "ok.png")
    name = os.fsdecode(b"caf\xe9-latin1.png")
    img(src / name)
    out = tmp_path / "out"
    rc, err = run([src], out, fmt="both")
    assert rc == 0 and "unexpected" not in err, err
    assert sorted(done_ids(out)) == sorted([name, "ok.png"])
    assert (out / (name + ".md")).exists() and json.loads((out / (name + ".json")).read_text())["id"] == name
    assert "0 to do, 2 already done" in run([src], out, fmt="both")[1]


def test_a_missing_input_is_an_error_before_any_work(tmp_path):
    stderr = io.StringIO()
    rc = main(["batch", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], backend_factory=lambda s: no_backend(),
              stderr=stderr)
    assert rc == 2 and stderr.getvalue() == f"error: cannot read '{tmp_path / 'nope'}': no such file or folder\n"


def test_a_fifo_given_by_name_fails_instead_of_blocking(tmp_path):
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    rc, err = run([fifo], tmp_path / "out")
    assert rc == 1 and f"failed scan.png: cannot read '{fifo}': not a regular file" in err


# -- PDFs, images and a video, again and again --------------------------------------------------------------------
def test_pdfs_images_and_a_video_twenty_times_in_a_row(tmp_path):
    src = mixed_inputs(tmp_path / "in", n_images=3, pdf_pages=3)
    make_pdf(src / "sub" / "two.pdf", 2)
    make_video(src / "clip.mp4", seconds=1.0)
    expected = sorted(["p00.png", "sub/p01.png", "p02.png", "clip.mp4", "sub/two.pdf#page=1", "sub/two.pdf#page=2"]
                      + [f"doc.pdf#page={i}" for i in (1, 2, 3)])
    for n in range(20):
        out = tmp_path / f"out{n}"
        rc, err = run([src], out, batch_size=4)
        assert rc == 0, err
        assert done_ids(out) == expected
        assert (out / "clip.mp4.md").read_text() == f"seen {src / 'clip.mp4'}\n"


# -- kill -9 at random moments ---------------------------------------------------------------------------------------
KILLABLE = """
import sys
from glmv.cli import main
from glmv.testing.scripted import ScriptedBackend
# 30 pieces of 100 characters, 10 ms apart: about 0.3 s an item, and 3 KB results
script = lambda r: ["seen " + r.messages[-1].content[0].source] + ["w" * 100] * 30
sys.exit(main(sys.argv[1:], backend_factory=lambda s: ScriptedBackend(script, delay_s=0.01)))
"""


def manifest_lines(out: Path) -> int:
    path = out / "manifest.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_kill_9_at_ten_random_moments_then_resume_does_every_item_once(tmp_path):
    src = mixed_inputs(tmp_path / "in", n_images=16, pdf_pages=4)
    out = tmp_path / "out"
    args = [sys.executable, "-c", KILLABLE, "batch", str(src), "--out", str(out), "--format", "both",
            "--pdf-long-side", "200", "--batch-size", "3"]
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    progress = []
    for _ in range(10):
        before = manifest_lines(out)
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = ""
        while "item(s):" not in line and proc.poll() is None:  # planned: the work starts now
            line = proc.stderr.readline()
        # a random moment: after 0 to 3 more results (whatever the machine's speed), plus 0 to 0.3 s
        wait_for, deadline = before + rng.randrange(4), time.time() + 30
        while manifest_lines(out) < wait_for and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        progress.append(manifest_lines(out))
    assert len(set(progress)) >= 3, (seed, progress)  # the kills landed all through the work
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (seed, p.stderr)
    expected = sorted([f"p{i:02d}.png" if i % 2 == 0 else f"sub/p{i:02d}.png" for i in range(16)]
                      + [f"doc.pdf#page={i}" for i in (1, 2, 3, 4)])
    assert done_ids(out) == expected, seed  # every item done exactly once, across all the kills
    assert_clean(out)
    for rec in records(out):
        for rel in rec.get("outputs", []):
            text = (out / rel).read_text()
            assert text.startswith(("seen ", "{")) and "w" * 3000 in text, (seed, rel)  # whole files only
    assert (out / "doc.pdf.md").read_text().count("<!-- page ") == 4


def test_decks_are_converted_inside_the_output_folder_and_cleaned_up(tmp_path, monkeypatch):
    """LibreOffice is replaced by a stand-in program that "converts" any deck into a 2-page PDF, as soffice would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pdf = make_pdf(tmp_path / "converted.pdf", 2)
    soffice = bin_dir / "soffice"
    soffice.write_text(f'#!/bin/sh\n# soffice ... --outdir DIR FILE\nwhile [ "$1" != "--outdir" ]; do shift; done\n'
                       f'name=$(basename "$3"); cp {pdf} "$2/${{name%.*}}.pdf"\n')
    soffice.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "a" / "talk.pptx").write_bytes(b"PK deck a")
    (src / "talk.pptx").write_bytes(b"PK deck b")  # same stem: converted apart, written apart
    out = tmp_path / "out"
    rc, err = run([src], out)
    assert rc == 0, err
    assert done_ids(out) == ["a/talk.pptx#page=1", "a/talk.pptx#page=2", "talk.pptx#page=1", "talk.pptx#page=2"]
    assert (out / "a" / "talk.pptx.md").exists() and (out / "talk.pptx" / "page-0002.md").exists()
    assert not (out / ".glmv-work").exists()


def test_the_output_folder_may_be_the_input_folder(tmp_path):
    src = tmp_path / "in"
    img(src / "x.png")
    img(src / "sub" / "y.jpg")
    rc, err = run([src], src, fmt="both")
    assert rc == 0 and "2 to do" in err
    rc, err = run([src], src, fmt="both")  # its own results are not inputs
    assert rc == 0 and "0 to do, 2 already done" in err and "skipped" not in err.replace("0 skipped", "")
    make_pdf(src / "doc.pdf", 2)  # its pages would need a folder doc.pdf/ where the PDF itself is
    with pytest.raises(GlmvError, match="doc.pdf' needs the folder 'doc.pdf' where a file is in the way"):
        run([src], src)


def test_ctrl_c_stops_at_once_with_the_summary_and_resumes(tmp_path):
    src = mixed_inputs(tmp_path / "in", n_images=8, pdf_pages=2)
    out = tmp_path / "out"
    args = [sys.executable, "-c", KILLABLE, "batch", str(src), "--out", str(out), "--batch-size", "2"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "manifest.jsonl").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    err = proc.communicate(timeout=30)[1]
    assert time.time() - t0 < 5 and proc.returncode == 130, err
    assert "glmv: done " in err and "not done" in err and "interrupted" in err and "Traceback" not in err
    assert_clean(out)
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(done_ids(out)) == len(set(done_ids(out))) == 10


class CancelsOnError(ScriptedBackend):
    """Like the local backend: a stream that ends in an error sets the cancel event it was given."""

    def generate(self, request, cancel=None):
        if "bad" in request.messages[-1].content[0].source:
            if cancel is not None:
                cancel.set()
            raise GlmvError("generation failed: the engine refused this one")
        return super().generate(request, cancel)


def test_one_failing_generation_does_not_cancel_the_others(tmp_path):
    src = tmp_path / "in"
    img(src / "bad.png")
    for i in range(6):
        img(src / f"ok{i}.png")
    err = io.StringIO()
    rc = run_batch([str(src)], Options(task="ocr", prompt="p", out=tmp_path / "out", batch_size=3),
                   lambda: CancelsOnError(echo, delay_s=0.01), err)
    assert rc == 1 and "done 6 now" in err.getvalue() and "0 not done" in err.getvalue(), err.getvalue()
