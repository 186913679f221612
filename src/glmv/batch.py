"""``glmv batch``: run a task over files, folders, PDFs and decks without losing or mixing up anything.

Inputs expand into items: an image is one item, a PDF or deck one item per page, a video one item. Each
result lands where nothing else can write: the input's path relative to its root, full name kept, plus the
output suffix (``a/x.png`` -> ``out/a/x.png.md``; a PDF's pages ``out/doc.pdf/page-0003.md`` and, joined in
page order, ``out/doc.pdf.md``). With several inputs, each folder gets its own subfolder named after it.
Any remaining collision (two inputs writing one file, also on a folder that ignores case) is refused before
any work starts.

A manifest (``manifest.jsonl``, one JSON record per line, appended and synced) records each item's source
path, size and mtime, status, error, tokens and time. Rerunning skips an item only when its last record is
"done" for the same source, size and mtime (and page) and its outputs exist; ``--retry-failed`` retries
failures. The exit code and failure list describe the current inputs only. A failed item never stops the
batch, but an output folder that takes no more writes (disk full, quota, read-only) does: cleanly, with the
summary, and a rerun resumes. The folder is locked while a batch runs (a second run on it is refused); a
kill at any moment loses nothing finished, leaves no partial file (stray temporaries are removed at the next
start) and at most a torn last manifest line, which the next run drops.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from . import tasks
from .backends.base import Backend, Result
from .documents import check_resolution, kind_of, load_video, office_to_pdf, parse_pages, pdf_page_count, render_pdf
from .errors import GlmvError, MediaError
from .media import load_image
from .outputs import ensure_writable_dir, json_text, write_atomic
from .prompts import TASKS, user_message
from .settings import DEFAULT_LONG_SIDE, DEFAULT_MAX_PIXELS, SamplingParams

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the folder is not locked
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.jsonl"
LOCK_FILE = ".glmv-batch.lock"
WORK_DIR = ".glmv-work"  # decks converted to PDF live here while the batch runs (hidden: never an input)
DEFAULT_MAX_DOC_PAGES = 2000
COMPACT_SLACK = 1000  # superseded manifest lines tolerated before the manifest is rewritten at the next start
NAME_MAX = 255  # bytes in one path component on common filesystems
# A write error with one of these concerns one item's name; any other stops the batch (the folder is full,
# over quota, read-only, gone...), because no later item could be written either.
ITEM_WRITE_ERRNOS = {errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EINVAL, errno.EILSEQ}


@dataclass
class Item:
    id: str  # where its results go, relative to --out: "scans/a/x.png", "doc.pdf#page=3"
    rel: str  # the source's path relative to --out: "scans/a/x.png"
    source: Path  # the input file as found
    kind: str  # image | page | video | document (a PDF or deck that could not be expanded)
    size: int = 0
    mtime_ns: int = 0
    page: int | None = None  # 1-based
    path: Path | None = None  # what to read when it is not the source: a deck's converted PDF

    def key(self) -> dict[str, Any]:
        """What "the same input" means for resuming: source path, size, mtime and page."""
        return {"source": str(self.source), "size": self.size, "mtime_ns": self.mtime_ns, "page": self.page}

    def matches(self, rec: dict[str, Any] | None) -> bool:
        return rec is not None and all(rec.get(k) == v for k, v in self.key().items())


@dataclass
class Plan:
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    failed: list[tuple[Item, str]] = field(default_factory=list)  # inputs that failed while expanding


# -- planning -----------------------------------------------------------------------------------------------
def _roots(inputs: list[str]) -> list[tuple[Path, str]]:
    """Each distinct input with the subfolder of --out it writes to ("" for the top)."""
    roots: list[Path] = []
    seen: set[Path] = set()
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise GlmvError(f"cannot read '{raw}': no such file or folder")
        if p.resolve() not in seen:
            seen.add(p.resolve())
            roots.append(p)
    if len(roots) == 1:
        return [(roots[0], "")]
    # A file writes <name>.md (and <name>/ for pages) at the top; a folder gets a subfolder named after it,
    # with -2, -3... when that name is taken.
    used = {r.name.casefold() for r in roots if not r.is_dir()}
    labelled = []
    for r in roots:
        label = ""
        if r.is_dir():
            base = r.resolve().name or "root"
            label, n = base, 1
            while label.casefold() in used:
                n += 1
                label = f"{base}-{n}"
            used.add(label.casefold())
        labelled.append((r, label))
    return labelled


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _walk(root: Path, out: Path | None) -> Iterable[tuple[Path, str, bool]]:
    """(file, path relative to root, in the output folder) for the visible files under ``root``."""
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        yield f, rel.as_posix(), out is not None and _inside(f, out)


def expand(inputs: list[str], pages: str | None = None, out: Path | None = None,
           max_doc_pages: int = DEFAULT_MAX_DOC_PAGES, workdir: Path | None = None) -> Plan:
    """Files, folders (recursive, by extension), PDFs and decks (one item per page), with their output paths."""
    plan = Plan()
    out_abs = out.resolve() if out is not None else None
    for root, label in _roots(inputs):
        # only an output folder inside this root can hold files of ours: look for them only then
        holds_out = out_abs is not None and root.is_dir() and _inside(out_abs, root.resolve())
        files = _walk(root, out_abs if holds_out else None) if root.is_dir() else [(root, root.name, False)]
        for f, rel, in_out in files:
            kind = kind_of(f)
            if in_out and (kind == "unknown" or out_abs != root.resolve()):
                continue  # our own results, or files kept in the output folder: never inputs
            if kind == "unknown":
                plan.skipped.append((str(f), f"unsupported file type '{f.suffix or f.name}'"))
                continue
            rel = f"{label}/{rel}" if label else rel
            try:
                st = f.stat()
                if not f.is_file():  # a FIFO or device given by name would block or never end
                    raise OSError(errno.EINVAL, "not a regular file")
            except OSError as exc:
                plan.failed.append((Item(rel, rel, f.absolute(), "document"), f"cannot read '{f}': {exc.strerror}"))
                continue
            item = Item(rel, rel, f.absolute(), kind if kind in ("image", "video") else "document", st.st_size,
                        st.st_mtime_ns)
            if item.kind == "document":
                converted = None if workdir is None else workdir / str(len(plan.items) + len(plan.failed))
                _expand_document(plan, item, kind, pages, max_doc_pages, converted)
            else:
                plan.items.append(item)
    return plan


def _expand_document(plan: Plan, doc: Item, kind: str, pages: str | None, max_doc_pages: int,
                     workdir: Path | None) -> None:
    try:
        if workdir is not None and kind != "pdf":
            workdir.mkdir(parents=True, exist_ok=True)
        source = doc.source if kind == "pdf" else office_to_pdf(doc.source, workdir)
        n = pdf_page_count(source)
        selected: list[int] | range = parse_pages(pages, n, str(doc.source)) if pages or n <= 0 else range(n)
        if len(selected) > max_doc_pages:
            raise MediaError(f"'{doc.source}' has {len(selected)} pages to read, more than the limit of "
                             f"{max_doc_pages} per document: choose pages with --pages (for example "
                             f"--pages 1-{max_doc_pages}) or raise --max-doc-pages")
    except MediaError as exc:
        plan.failed.append((doc, str(exc)))
        return
    for i in selected:
        plan.items.append(Item(f"{doc.rel}#page={i + 1}", doc.rel, doc.source, "page", doc.size, doc.mtime_ns,
                               i + 1, Path(source)))


def expected_outputs(item: Item, opts: Options) -> list[str]:
    """The files an item's results go to, relative to --out."""
    base = f"{item.rel}/page-{item.page:04d}" if item.kind == "page" else item.rel
    suffixes = ([".html"] if opts.task == "html" else []) + [s for s, fmts in ((".md", ("md", "both")),
                                                                               (".json", ("json", "both")))
                                                             if opts.fmt in fmts]
    return [base + s for s in suffixes]


def _joins(opts: Options) -> bool:
    return opts.fmt in ("md", "both")


def refuse_long_names(plan: Plan, opts: Options) -> None:
    """Fail (alone) each input whose output names would be longer than a file name may be."""
    keep: list[Item] = []
    refused: set[str] = set()
    for item in plan.items:
        names = expected_outputs(item, opts) + ([item.rel + ".md"] if item.kind == "page" else [])
        long = next((p for n in names for p in Path(n).parts if len(os.fsencode(p)) > NAME_MAX), None)
        if long is None:
            keep.append(item)
        elif item.rel not in refused:
            refused.add(item.rel)
            kind = "document" if item.page else item.kind
            doc = Item(item.rel, item.rel, item.source, kind, item.size, item.mtime_ns)
            plan.failed.append((doc, f"cannot write results for '{item.source}': the output name '{long[:40]}...' "
                                     f"would be longer than {NAME_MAX} bytes; rename the file"))
    plan.items = keep


def check_collisions(plan: Plan, opts: Options, out: Path, ignores_case: bool) -> None:
    """Refuse, before any work, a plan where two inputs would write one file (or a file and a folder)."""

    def fold(path: str) -> str:
        return unicodedata.normalize("NFC", path).casefold() if ignores_case else path

    writers: dict[str, tuple[str, str]] = {fold(n): (n, "glmv's own files") for n in (MANIFEST, LOCK_FILE)}
    folders: dict[str, tuple[str, str]] = {}
    clashes: list[str] = []
    docs = {item.rel: item for item in plan.items if item.kind == "page"}
    planned = [(o, str(i.source)) for i in plan.items for o in expected_outputs(i, opts)]
    planned += [(rel + ".md", str(item.source)) for rel, item in docs.items()] if _joins(opts) else []
    for path, source in planned:
        owner = writers.setdefault(fold(path), (path, source))
        if owner[1] != source:
            clashes.append(f"'{owner[1]}' and '{source}' both write '{path}'")
        parent = Path(path).parent
        while parent != Path("."):
            folders.setdefault(fold(parent.as_posix()), (parent.as_posix(), source))
            parent = parent.parent
    for key, (path, source) in writers.items():
        if key in folders and folders[key][1] != source:
            clashes.append(f"'{source}' writes the file '{path}' where '{folders[key][1]}' needs a folder")
        elif (out / path).is_dir():
            clashes.append(f"'{source}' writes the file '{path}' where a folder is in the way")
    for path, source in folders.values():
        if (out / path).exists() and not (out / path).is_dir():
            clashes.append(f"'{source}' needs the folder '{path}' where a file is in the way")
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        case = " (this output folder ignores case)" if ignores_case else ""
        raise GlmvError(f"output names collide in '{out}'{case}: {'; '.join(clashes[:3])}{more}; rename one of the "
                        f"inputs or run them with separate --out folders")


# -- the output folder: lock, manifest, temporaries ------------------------------------------------------------
class FolderLock:
    """An exclusive advisory lock on the output folder for one batch; the kernel drops it if the process dies."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            self._fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise GlmvError(f"cannot create the lock file in output folder '{folder}': {exc.strerror or exc}") from None
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self._fd, 32).decode("ascii", "replace").strip()
            os.close(self._fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise GlmvError(f"output folder '{folder}' is in use by another glmv batch{pid}: wait for it to finish "
                            f"or choose another --out") from None
        try:  # the pid is only for the message above: a full disk must not stop us here
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass

    def ignores_case(self) -> bool:
        return os.path.exists(self.folder / LOCK_FILE.upper())

    def release(self) -> None:
        os.close(self._fd)  # closing the only descriptor releases the flock


class Manifest:
    """Append-only JSONL status log; the latest record per item id wins. A torn last line is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.latest: dict[str, dict[str, Any]] = {}
        self.repaired = False
        data = path.read_bytes() if path.exists() else b""
        end = data.rfind(b"\n") + 1
        # split on "\n" only: names may hold U+2028 or \x1c, which splitlines() would cut records at
        lines = data[:end].decode("utf-8", "replace").split("\n")
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if end < len(data):  # cut by a kill or a full disk: complete it if it is whole, else drop it
            tail = data[end:].decode("utf-8", "replace")
            if self._parse(tail) is not None:
                os.write(self._fd, b"\n")
                lines.append(tail)
            else:
                os.ftruncate(self._fd, end)
            self.repaired = True
        for line in lines:
            rec = self._parse(line)
            if rec is not None:
                self.latest[rec["id"]] = rec
        self._lock = threading.Lock()
        if len(lines) > 2 * len(self.latest) + COMPACT_SLACK:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the file with only the latest record per item (atomically: a kill leaves old or new)."""
        text = "".join(json_text(rec) + "\n" for rec in self.latest.values())
        try:
            write_atomic(self.path, text)
        except OSError:
            return  # no room to rewrite it: the long file works just as well
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    @staticmethod
    def _parse(line: str) -> dict[str, Any] | None:
        try:
            rec = json.loads(line)
        except ValueError:
            return None
        return rec if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None

    def record(self, **rec: Any) -> None:
        """Append one record and sync it; on a failed write the file is cut back so no torn line stays."""
        rec["ts"] = round(time.time(), 3)
        data = (json_text(rec) + "\n").encode("utf-8")
        with self._lock:
            start = os.fstat(self._fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
            except OSError:
                try:
                    os.ftruncate(self._fd, start)
                except OSError:
                    pass
                raise
            self.latest[rec["id"]] = rec

    def close(self) -> None:
        os.close(self._fd)


def _clean_stale_temps(out: Path) -> int:
    n = 0
    for f in out.rglob(".*.tmp"):
        try:
            f.unlink()
            n += 1
        except OSError:
            pass
    return n


# -- running --------------------------------------------------------------------------------------------------
@dataclass
class Options:
    task: str
    prompt: str
    out: Path
    fmt: str = "md"
    batch_size: int = 4
    retry_failed: bool = False
    pages: str | None = None
    long_side: int = DEFAULT_LONG_SIDE
    dpi: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    thinking: bool = True
    sampling_overrides: dict[str, Any] = field(default_factory=dict)
    max_doc_pages: int = DEFAULT_MAX_DOC_PAGES

    def __post_init__(self) -> None:
        check_resolution(self.long_side, self.dpi)  # before any work, not once per page


class FolderFull(Exception):
    """The output folder takes no more writes; the batch stops and can be resumed."""


def run_batch(inputs: list[str], opts: Options, backend_factory: Callable[[], Backend],
              stderr: TextIO = sys.stderr) -> int:
    """Run the batch; 0 if every current input is done, 1 if some failed. Raises GlmvError if it cannot run."""
    out = ensure_writable_dir(opts.out)
    lock = FolderLock(out)  # first: a second run must not clean away this run's temporary files
    workdir = out / WORK_DIR
    try:
        stale = _clean_stale_temps(out)
        shutil.rmtree(workdir, ignore_errors=True)  # a killed run's converted decks
        plan = expand(inputs, opts.pages, out, opts.max_doc_pages, workdir)
        refuse_long_names(plan, opts)
        check_collisions(plan, opts, out, lock.ignores_case())
        try:
            manifest = Manifest(out / MANIFEST)
        except OSError as exc:
            raise GlmvError(f"cannot open the manifest '{out / MANIFEST}': {exc.strerror or exc}; check the output "
                            f"folder (is the disk full?) and rerun") from None
        try:
            return _Run(out, opts, plan, manifest, stderr).run(backend_factory, stale)
        finally:
            manifest.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        lock.release()


class _Run:
    def __init__(self, out: Path, opts: Options, plan: Plan, manifest: Manifest, stderr: TextIO) -> None:
        self.out, self.opts, self.plan, self.manifest, self.stderr = out, opts, plan, manifest, stderr
        self.stop = threading.Event()  # set when the folder is full or the user interrupts: no new items start
        self.stop_reason: str | None = None
        # One cancel event per running item: a backend may set the event it was given (when its stream ends
        # early), so sharing one would let a single failing item cancel all the others.
        self._cancels: set[threading.Event] = set()
        self.stats = {"done": 0, "failed": 0, "tokens": 0}
        self.backend: Backend | None = None
        self.sampling = SamplingParams()
        self._lock = threading.Lock()

    def _is_done(self, item: Item) -> bool:
        rec = self.manifest.latest.get(item.id)
        return (item.matches(rec) and rec.get("status") == "done" and  # type: ignore[union-attr]
                all((self.out / o).exists() for o in expected_outputs(item, self.opts)))

    def _failed_before(self, item: Item) -> bool:
        rec = self.manifest.latest.get(item.id)
        return item.matches(rec) and rec.get("status") == "failed"  # type: ignore[union-attr]

    def _record(self, item: Item, what: str, **rec: Any) -> None:
        """Append to the manifest; a manifest that cannot be written stops the batch."""
        try:
            self.manifest.record(id=item.id, **item.key(), **rec)
        except OSError as exc:
            raise FolderFull(self._stop_message(exc, f"{MANIFEST} ({what})")) from None

    def _stop_message(self, exc: OSError, path: str) -> str:
        if exc.errno == errno.ENOSPC:
            why, fix = f"the disk holding '{self.out}' is full", "free some space"
        elif exc.errno == errno.EDQUOT:
            why, fix = f"the disk quota for '{self.out}' is used up", "free some space or raise the quota"
        else:
            why, fix = f"cannot write to '{self.out}': {exc.strerror or exc}", "fix that"
        return f"{why} (writing {path}); the batch stopped: {fix} and rerun the same command to resume"

    def _stopped(self, reason: str | None) -> None:
        """Start no new item and cancel the running ones."""
        with self._lock:
            self.stop_reason = self.stop_reason or reason
            self.stop.set()
            for cancel in self._cancels:
                cancel.set()

    def run(self, backend_factory: Callable[[], Backend], stale: int) -> int:
        plan, opts, out = self.plan, self.opts, self.out
        todo = [i for i in plan.items if not self._is_done(i) and (opts.retry_failed or not self._failed_before(i))]
        already = sum(1 for i in plan.items if self._is_done(i))
        for path, reason in plan.skipped:
            self.stderr.write(f"glmv: skipped {path}: {reason}\n")
        if stale:
            self.stderr.write(f"glmv: removed {stale} unfinished temporary file(s) from an interrupted run\n")
        if self.manifest.repaired:
            self.stderr.write(f"glmv: repaired the last line of {out / MANIFEST}, cut by an interrupted run\n")
        others = [(i, r) for i in todo if (r := self.manifest.latest.get(i.id)) and r.get("status") == "done"
                  and r.get("source") != str(i.source)]
        if others:
            self.stderr.write(f"glmv: replacing {len(others)} result(s) written earlier for other files (first: "
                              f"'{others[0][0].id}' from '{others[0][1].get('source')}'); use another --out to keep "
                              f"both\n")
        self.stderr.write(f"glmv: {len(plan.items)} item(s): {len(todo)} to do, {already} already done, "
                          f"{len(plan.items) - len(todo) - already} failed earlier (--retry-failed retries them), "
                          f"{len(plan.skipped)} skipped\n")
        t0 = time.perf_counter()
        interrupted = False
        try:
            for item, error in plan.failed:
                rec = self.manifest.latest.get(item.id)
                if not (item.matches(rec) and rec.get("error") == error):  # type: ignore[union-attr]
                    self._record(item, "a failure", status="failed", error=error)
            if todo:
                self.backend = backend_factory()
                defaults = self.backend.default_sampling
                self.sampling = defaults.merged(**opts.sampling_overrides)
                interrupted = self._run_items(todo)
            joined = 0 if self.stop.is_set() else self._join_documents({i.rel for i in todo})
        except FolderFull as exc:
            self._stopped(str(exc))
            joined = 0
        finally:
            if self.backend is not None:
                self.backend.close()
        failures = self._failures()
        left = len(todo) - self.stats["done"] - self.stats["failed"]
        failed_now = self.stats["failed"] + len(plan.failed)  # documents that could not be opened count too
        self.stderr.write(f"glmv: done {self.stats['done']} now ({already} earlier), failed {failed_now} "
                          f"now, {len(failures)} failing in all, {left} not done, {self.stats['tokens']} tokens, "
                          f"{time.perf_counter() - t0:.1f} s; {joined} joined document(s); manifest {out / MANIFEST}\n")
        for item_id, error in failures[:20]:
            self.stderr.write(f"glmv: failed {item_id}: {error}\n")
        if len(failures) > 20:
            self.stderr.write(f"glmv: ... and {len(failures) - 20} more failures (see {out / MANIFEST})\n")
        if interrupted:
            raise KeyboardInterrupt
        if self.stop_reason:
            raise GlmvError(self.stop_reason)
        return 1 if failures else 0

    def _run_items(self, todo: list[Item]) -> bool:
        """Run the items ``--batch-size`` at a time; True if the user interrupted."""
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="item", file=self.stderr, dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=max(1, self.opts.batch_size))
        try:
            for fut in as_completed([pool.submit(self._work, item) for item in todo]):
                fut.result()
                bar.update(1)
                bar.set_postfix_str(f"{self.stats['failed']} failed, {self.stats['tokens']} tokens")
            return False
        except KeyboardInterrupt:
            self._stopped(None)
            return True
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _work(self, item: Item) -> None:
        if self.stop.is_set():
            return
        start = time.perf_counter()
        try:
            result, error = self._generate(item)
            if result is not None:
                try:
                    outputs = _write(self.out, item, result, self.opts)
                except OSError as exc:
                    if exc.errno not in ITEM_WRITE_ERRNOS:
                        raise FolderFull(self._stop_message(exc, f"results for '{item.id}'")) from None
                    error = f"cannot write results for '{item.source}': {exc.strerror or exc}"
                else:
                    tokens = result.usage.completion_tokens
                    self._record(item, "a result", status="done", outputs=outputs, completion_tokens=tokens,
                                 prompt_tokens=result.usage.prompt_tokens,
                                 seconds=round(time.perf_counter() - start, 3))
                    with self._lock:
                        self.stats["done"] += 1
                        self.stats["tokens"] += tokens
                    return
            if error is None:
                return  # stopped while it ran: it stays to do
            self._record(item, "a failure", status="failed", error=error, seconds=round(time.perf_counter() - start, 3))
            with self._lock:
                self.stats["failed"] += 1
        except FolderFull as exc:
            self._stopped(str(exc))

    def _generate(self, item: Item) -> tuple[Result | None, str | None]:
        """(result, None), (None, error), or (None, None) when the batch stopped while it ran."""
        assert self.backend is not None
        try:
            media = _load(item, self.opts)
            cancel = threading.Event()
            with self._lock:
                if self.stop.is_set():
                    return None, None
                self._cancels.add(cancel)
            try:
                result = tasks.finish(tasks.ask(self.backend, [user_message(self.opts.prompt, media)], self.sampling,
                                                thinking=self.opts.thinking, cancel=cancel)).result
            finally:
                with self._lock:
                    self._cancels.discard(cancel)
        except GlmvError as exc:
            return None, str(exc)
        except OSError as exc:
            return None, f"cannot read '{item.source}': {exc.strerror or exc}"
        except Exception as exc:  # a bug in a decoder or backend fails this item, not the whole batch
            return None, f"unexpected {type(exc).__name__} on '{item.id}': {exc}"
        if result.finish_reason == "cancelled":
            return None, None if self.stop.is_set() else "the backend cancelled the generation; rerun to retry"
        return result, None

    def _failures(self) -> list[tuple[str, str]]:
        """(id, error) of the current inputs that are failing now; old records of other files do not count."""
        out = [(item.id, error) for item, error in self.plan.failed]
        for item in self.plan.items:
            rec = self.manifest.latest.get(item.id)
            if item.matches(rec) and rec.get("status") == "failed":  # type: ignore[union-attr]
                out.append((item.id, str(rec.get("error"))))  # type: ignore[union-attr]
        return out

    def _join_documents(self, touched: set[str]) -> int:
        """Write <doc>.md (pages in order) for each document whose pages are all done, if new or changed."""
        if not _joins(self.opts):
            return 0
        docs: dict[str, list[Item]] = {}
        for item in self.plan.items:
            if item.kind == "page":
                docs.setdefault(item.rel, []).append(item)
        joined = 0
        for rel, items in docs.items():
            target = self.out / (rel + ".md")
            if not all(self._is_done(i) for i in items) or (rel not in touched and target.exists()):
                continue
            parts = []
            for item in sorted(items, key=lambda i: i.page or 0):
                page_md = self.out / next(o for o in expected_outputs(item, self.opts) if o.endswith(".md"))
                parts.append(f"<!-- page {item.page} -->\n\n{page_md.read_text(encoding='utf-8').strip()}")
            try:
                write_atomic(target, "\n\n".join(parts) + "\n")
            except OSError as exc:
                raise FolderFull(self._stop_message(exc, f"'{rel}.md'")) from None
            joined += 1
        return joined


def _load(item: Item, opts: Options) -> list[Any]:
    if item.kind == "page":  # documents.py serializes PDFium; decoding images and video runs in parallel
        return render_pdf(item.path or item.source, str(item.page), opts.long_side, opts.dpi, opts.max_pixels)
    if item.kind == "video":
        return [load_video(item.source)]
    return [load_image(item.source, max_pixels=opts.max_pixels)]


def _write(out: Path, item: Item, result: Result, opts: Options) -> list[str]:
    written: list[str] = []
    for rel in expected_outputs(item, opts):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".html"):
            data = tasks.page_of(result.output)[0]
        elif rel.endswith(".md"):
            data = result.output.answer.rstrip() + "\n"
        else:
            record = {"id": item.id, "source": str(item.source), "page": item.page, "task": opts.task,
                      **result.to_dict()}
            data = json_text(record, indent=1) + "\n"
        write_atomic(path, data)
        written.append(rel)
    return written


def default_prompt(task: str, prompt: str | None) -> str:
    if prompt:
        return prompt
    if task == "ask":
        raise GlmvError("glmv batch --task ask needs a prompt: -p 'what is in this image?'")
    return TASKS[task].prompt


__all__ = ["run_batch", "expand", "expected_outputs", "refuse_long_names", "check_collisions", "Options", "Manifest",
           "FolderLock", "default_prompt"]
