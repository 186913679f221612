"""``glmv batch``: run a task over files, folders, PDFs and decks without losing anything.

Inputs expand into items: an image is one item, a PDF or deck one item per page (a video one item).
Every result is written atomically the moment it is ready, and a manifest (``manifest.jsonl``, one JSON
record per line, appended and synced) records each item's status, error, tokens and time. Rerunning the
same command skips what is done; ``--retry-failed`` retries failures. A failed item never stops the batch;
the exit code is 1 if any item failed. Killing the process at any moment loses nothing already finished
and leaves no partial files (stray temporary files are removed at the next start). For a PDF, the per-page
results are joined into one Markdown document in page order once every page is done. Items are submitted
``--batch-size`` at a time so the engine batches them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from .backends.base import Backend, GenerationRequest, collect
from .documents import IMAGE_EXTS, OFFICE_EXTS, PDF_EXTS, VIDEO_EXTS, kind_of, load_video, office_to_pdf, parse_pages, render_pdf
from .errors import GlmvError, MediaError
from .media import load_image
from .outputs import ensure_writable_dir, text_as_page, write_atomic
from .prompts import TASKS, user_message
from .settings import SamplingParams

SUPPORTED = IMAGE_EXTS | PDF_EXTS | OFFICE_EXTS | VIDEO_EXTS


@dataclass
class Item:
    id: str  # stable across runs: relative path, plus #page=N for document pages
    path: Path
    rel: str
    kind: str  # image | page | video
    page: int | None = None  # 1-based
    pages_total: int | None = None


@dataclass
class Plan:
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    failed: list[tuple[Item, str]] = field(default_factory=list)  # items that failed while expanding


def _rel(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


def expand(inputs: list[str], pages: str | None = None) -> Plan:
    """Files, folders (recursive, by extension), PDFs and decks (one item per page)."""
    plan = Plan()
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            plan.failed.append((Item(raw, p, raw, "image"), f"cannot read '{raw}': no such file or folder"))
            continue
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            root = p
        else:
            files, root = [p], None
        for f in files:
            rel = _rel(f, root) if root is not None else f.name
            kind = kind_of(f)
            if kind == "unknown":
                plan.skipped.append((str(f), f"unsupported file type '{f.suffix or f.name}'"))
                continue
            if kind == "image":
                plan.items.append(Item(rel, f, rel, "image"))
            elif kind == "video":
                plan.items.append(Item(rel, f, rel, "video"))
            else:
                try:
                    from .documents import pdf_page_count

                    source = f if kind == "pdf" else office_to_pdf(f)
                    n = pdf_page_count(source)
                    for i in parse_pages(pages, n, str(f)):
                        plan.items.append(Item(f"{rel}#page={i + 1}", Path(source), rel, "page", i + 1, n))
                except MediaError as exc:
                    plan.failed.append((Item(rel, f, rel, "page"), str(exc)))
    return plan


class Manifest:
    """Append-only JSONL status log; the latest record per item wins. A torn last line is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.latest: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    self.latest[rec["id"]] = rec
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill
        self._lock = threading.Lock()
        self._fh = open(path, "a", encoding="utf-8")

    def record(self, **rec: Any) -> None:
        rec["ts"] = round(time.time(), 3)
        line = json.dumps(rec, ensure_ascii=False)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self.latest[rec["id"]] = rec

    def close(self) -> None:
        self._fh.close()


def _out_base(out: Path, item: Item) -> Path:
    rel = Path(item.rel)
    if item.kind == "page":
        return out / rel.parent / rel.stem / f"page-{item.page:04d}"
    return out / rel.parent / rel.stem


def _clean_stale_temps(out: Path) -> int:
    n = 0
    for f in out.rglob(".*.tmp"):
        try:
            f.unlink()
            n += 1
        except OSError:
            pass
    return n


@dataclass
class Options:
    task: str
    prompt: str
    out: Path
    fmt: str = "md"
    batch_size: int = 4
    retry_failed: bool = False
    pages: str | None = None
    long_side: int = 1600
    dpi: float | None = None
    max_pixels: int = 4_000_000
    thinking: bool = True
    sampling_overrides: dict[str, Any] = field(default_factory=dict)


def run_batch(inputs: list[str], opts: Options, backend_factory: Callable[[], Backend], stderr: TextIO = sys.stderr) -> int:
    out = ensure_writable_dir(opts.out)
    stale = _clean_stale_temps(out)
    plan = expand(inputs, opts.pages)
    manifest = Manifest(out / "manifest.jsonl")
    todo: list[Item] = []
    already = 0
    for item in plan.items:
        prev = manifest.latest.get(item.id)
        if prev and prev.get("status") == "done" and all((out / o).exists() for o in prev.get("outputs", [])):
            already += 1
        elif prev and prev.get("status") == "failed" and not opts.retry_failed:
            already += 1
        else:
            todo.append(item)
    for item, error in plan.failed:
        manifest.record(id=item.id, source=str(item.path), status="failed", error=error)
    for path, reason in plan.skipped:
        stderr.write(f"glmv: skipped {path}: {reason}\n")
    if stale:
        stderr.write(f"glmv: removed {stale} unfinished temporary file(s) from an interrupted run\n")
    stderr.write(f"glmv: {len(plan.items)} item(s): {len(todo)} to do, {already} already done or failed earlier"
                 f" (--retry-failed retries failures), {len(plan.skipped)} skipped\n")

    stats = {"done": 0, "failed": len(plan.failed), "tokens": 0}
    t0 = time.perf_counter()
    backend = backend_factory() if todo else None
    defaults = (getattr(backend, "default_sampling", None) if backend else None) or SamplingParams()
    sampling = defaults.merged(**opts.sampling_overrides)

    def work(item: Item) -> None:
        start = time.perf_counter()
        try:
            media = _load(item, opts)
            request = GenerationRequest([user_message(opts.prompt, media)], sampling=sampling, thinking=opts.thinking)
            result = collect(backend.generate(request))
            outputs = _write(out, item, result, opts)
        except GlmvError as exc:
            manifest.record(id=item.id, source=str(item.path), page=item.page, status="failed", error=str(exc),
                            seconds=round(time.perf_counter() - start, 3))
            stats["failed"] += 1
            return
        tokens = result.usage.completion_tokens
        stats["done"] += 1
        stats["tokens"] += tokens
        manifest.record(id=item.id, source=str(item.path), page=item.page, status="done", outputs=outputs,
                        prompt_tokens=result.usage.prompt_tokens, completion_tokens=tokens,
                        seconds=round(time.perf_counter() - start, 3))

    try:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="item", file=stderr, disable=not todo, dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=max(1, opts.batch_size)) as pool:
            futures = [pool.submit(work, item) for item in todo]
            for fut in as_completed(futures):
                fut.result()
                bar.update(1)
                bar.set_postfix_str(f"{stats['failed']} failed, {stats['tokens']} tokens")
        bar.close()
        joined = _join_documents(out, plan, manifest)
    finally:
        manifest.close()
        if backend is not None:
            backend.close()
    elapsed = time.perf_counter() - t0
    stderr.write(f"glmv: done {stats['done']}, skipped {already + len(plan.skipped)}, failed {stats['failed']} now, "
                 f"{stats['tokens']} tokens, {elapsed:.1f} s; {joined} joined document(s); manifest {out / 'manifest.jsonl'}\n")
    failed_now = [r for r in manifest.latest.values() if r.get("status") == "failed"]
    for r in failed_now[:20]:
        stderr.write(f"glmv: failed {r['id']}: {r.get('error')}\n")
    return 1 if failed_now else 0


def _load(item: Item, opts: Options) -> list[Any]:
    if item.kind == "page":
        return render_pdf(item.path, str(item.page), opts.long_side, opts.dpi, opts.max_pixels)
    if item.kind == "video":
        return [load_video(item.path)]
    return [load_image(item.path, max_pixels=opts.max_pixels)]


def _write(out: Path, item: Item, result: Any, opts: Options) -> list[str]:
    base = _out_base(out, item)
    base.parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    if opts.task == "html":
        page = result.output.html or text_as_page(result.output.answer)
        path = base.with_suffix(".html")
        write_atomic(path, page)
        written.append(path.relative_to(out).as_posix())
    if opts.fmt in ("md", "both"):
        path = base.with_suffix(".md")
        write_atomic(path, result.output.answer.rstrip() + "\n")
        written.append(path.relative_to(out).as_posix())
    if opts.fmt in ("json", "both"):
        path = base.with_suffix(".json")
        record = {"id": item.id, "source": str(item.path), "page": item.page, "task": opts.task, **result.to_dict()}
        write_atomic(path, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
        written.append(path.relative_to(out).as_posix())
    return written


def _join_documents(out: Path, plan: Plan, manifest: Manifest) -> int:
    """For each PDF/deck whose pages are all done, write <name>.md with the pages in order."""
    docs: dict[str, list[Item]] = {}
    for item in plan.items:
        if item.kind == "page":
            docs.setdefault(item.rel, []).append(item)
    joined = 0
    for rel, items in docs.items():
        recs = [manifest.latest.get(i.id) for i in items]
        if not all(r and r.get("status") == "done" for r in recs):
            continue
        parts = []
        for item, rec in sorted(zip(items, recs), key=lambda x: x[0].page or 0):
            md = next((o for o in rec.get("outputs", []) if o.endswith(".md")), None)
            text = (out / md).read_text(encoding="utf-8").strip() if md else ""
            parts.append(f"<!-- page {item.page} -->\n\n{text}")
        target = out / Path(rel).parent / (Path(rel).stem + ".md")
        write_atomic(target, "\n\n".join(parts) + "\n")
        joined += 1
    return joined


def default_prompt(task: str, prompt: str | None) -> str:
    if prompt:
        return prompt
    if task == "ask":
        raise GlmvError("glmv batch --task ask needs a prompt: -p 'what is in this image?'")
    return TASKS[task].prompt


__all__ = ["run_batch", "expand", "Options", "Manifest", "default_prompt"]
