"""Resident models: ``glmv start`` / ``stop`` / ``ps``, and finding a running one for ``glmv ask``.

A resident model is a ``glmv serve`` process started in the background (its own session, output to a log
file in the cache folder) that keeps the model loaded, so a later ``glmv ask`` pays a second, not the whole
start-up. The server records itself in ``<cache>/resident/<id>.json`` once it listens (pid, port, model,
settings, default sampling, a random API key: the file is private to the user, mode 0600 in a 0700 folder)
and removes the file when it exits, after an idle timeout too. Readers drop records of processes that are
gone. Nothing here imports torch: the client side of this path must stay fast.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from .errors import GlmvError
from .privacy import private_dir, private_file
from .settings import TINY_MODEL, cache_root

# Settings that change what the model computes; a client flag given explicitly must agree with the server.
MATCH_FIELDS = ("max_pixels", "device", "dtype", "quant", "engine")


def state_dir() -> Path:
    return cache_root() / "resident"


def normalize_model(name: str) -> str:
    """The same model named from two folders must compare equal: local folders become absolute paths."""
    if name != TINY_MODEL and os.path.isdir(os.path.expanduser(name)):
        return str(Path(name).expanduser().resolve())
    return name


def parse_duration(text: str) -> float | None:
    """``90``, ``90s``, ``30m``, ``2h`` -> seconds; ``0``/``never`` -> None (no timeout)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
    if text.strip().lower() in ("never", "none", "off"):
        return None
    if not m:
        raise GlmvError(f"invalid idle timeout {text!r}: use seconds or a number with s, m or h (30m, 2h), "
                        f"or 0 for never")
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    return seconds or None


@dataclass
class Resident:
    """One running background server, as recorded in its state file."""

    pid: int
    port: int
    model: str
    settings: dict[str, Any]
    api_key: str
    started: float
    log: str
    idle_timeout_s: float | None = None
    resolved: dict[str, Any] = field(default_factory=dict)  # what "auto" became: device and dtype
    sampling: dict[str, Any] = field(default_factory=dict)  # the checkpoint's default sampling
    path: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def public(self) -> dict[str, Any]:
        """Everything but the key, for ``glmv ps --json``."""
        d = asdict(self)
        d.pop("api_key")
        d["base_url"] = self.base_url
        d["uptime_s"] = round(time.time() - self.started, 1)
        return d

    def mismatch(self, model: str, explicit: dict[str, Any]) -> str | None:
        """Why this server cannot answer for ``model`` with the explicitly given settings (None: it can)."""
        if normalize_model(model) != self.model:
            return f"it runs {self.model}"
        for name in MATCH_FIELDS:
            want = explicit.get(name)
            if want is None:
                continue
            have = {self.settings.get(name), self.resolved.get(name)}
            if name == "max_pixels":  # the client scales images first: any cap up to the server's gives the same
                if int(want) <= int(self.settings.get(name) or 0):
                    continue
                return f"it scales images to at most {self.settings.get(name)} pixels, fewer than {want}"
            if name == "dtype":
                want = _DTYPE_ALIASES.get(str(want), want)
                have = {_DTYPE_ALIASES.get(str(h), h) for h in have}
            if want not in have:
                return f"it runs with {name} {self.settings.get(name)}, not {want}"
        return None


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the pid
        return False
    return True


def _is_server(pid: int, state_path: str) -> bool:
    """Whether ``pid`` is still the server recorded in ``state_path``. After a crash or kill -9 its record stays
    behind and the pid may since belong to another process, which ``glmv stop`` must never signal: the server's
    command line names its state file (a unique name), so /proc tells them apart. A zombie counts as gone."""
    if not _alive(pid):
        return False
    if not Path("/proc/self/cmdline").exists():  # not Linux: the pid is all there is to go on
        return True
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:  # it ended meanwhile
        return False
    if stat.rpartition(")")[2].split()[:1] == ["Z"]:
        return False
    name = os.fsencode(Path(state_path).name)
    return any(os.path.basename(arg) == name for arg in argv)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


def write_state(path: Path, resident: Resident) -> None:
    """Atomically, readable by the user only (the file holds the server's API key)."""
    private_dir(path.parent)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in asdict(resident).items() if k != "path"}, f)
    os.replace(tmp, path)


def remove_state(path: Path, pid: int) -> None:
    """Remove ``path`` if it still describes process ``pid``."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def list_residents(check_port: bool = False) -> list[Resident]:
    """Running resident servers, oldest first; records of dead processes are deleted."""
    out: list[Resident] = []
    d = state_dir()
    if not d.is_dir():
        return out
    for path in sorted(d.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            r = Resident(**data, path=str(path))
        except (OSError, ValueError, TypeError):
            continue  # being written, or not ours
        if not _is_server(r.pid, r.path):
            path.unlink(missing_ok=True)
            continue
        if check_port and not _listening(r.port):
            continue
        out.append(r)
    return sorted(out, key=lambda r: r.started)


def find_resident(model: str, explicit: dict[str, Any]) -> tuple[Resident | None, str | None]:
    """A running server that can answer for ``model`` (and why the others cannot, for the one-line note)."""
    reasons = []
    for r in list_residents(check_port=True):
        why = r.mismatch(model, explicit)
        if why is None:
            return r, None
        reasons.append(f"the resident server on port {r.port} is not used: {why}")
    return None, (reasons[0] if reasons else None)


@contextmanager
def start_lock(stderr: TextIO) -> Iterator[None]:
    """Held while ``glmv start`` looks for a running server and starts one: two starts at once would otherwise
    both find none and load the model twice (twice the GPU memory). The second waits, then finds the first."""
    d = private_dir(state_dir())
    with open(private_file(d / ".start.lock"), "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stderr.write("glmv: another glmv start is loading a model; waiting for it…\n")
            stderr.flush()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def new_state_path() -> Path:
    return state_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.json"


def start(serve_args: list[str], model: str, stderr: TextIO, wait_s: float | None = None) -> Resident:
    """Start ``glmv serve SERVE_ARGS`` in the background and wait until it listens; echo its progress."""
    state = new_state_path()
    private_dir(state.parent)  # records hold API keys, logs hold what the server said: the user's only
    _prune_logs(state.parent)
    log_path = state.with_suffix(".log")
    # The key goes in the environment, not on the command line. Hex, not urlsafe: a key starting with "-" reads
    # as a flag, so `--api-key KEY` failed about one time in 64.
    env = dict(os.environ, GLMV_API_KEY=secrets.token_hex(24))
    cmd = [sys.executable, "-m", "glmv.cli", "serve", "--model", model, "--port", "0", "--state-file", str(state),
           *serve_args]
    with open(private_file(log_path), "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # Ctrl-C in this terminal must not reach it
    shown = 0
    deadline = None if wait_s is None else time.monotonic() + wait_s
    try:
        while True:
            shown = _echo_progress(log_path, shown, stderr)
            if state.exists():
                data = json.loads(state.read_text(encoding="utf-8"))
                return Resident(**data, path=str(state))
            if proc.poll() is not None:
                last = _last_error(log_path)
                raise GlmvError(f"the background server for {model} exited while starting: {last} (log: {log_path})")
            if deadline is not None and time.monotonic() > deadline:
                proc.terminate()
                raise GlmvError(f"the background server for {model} did not start within {wait_s:.0f} s "
                                f"(log: {log_path})")
            time.sleep(0.1)
    except KeyboardInterrupt:
        proc.terminate()
        raise


def _prune_logs(folder: Path, keep_s: float = 7 * 86400) -> None:
    """Logs of servers that ended are kept a week (for `glmv start` failures and idle exits), then removed."""
    cutoff = time.time() - keep_s
    for log in folder.glob("*.log"):
        try:
            if not log.with_suffix(".json").exists() and log.stat().st_mtime < cutoff:
                log.unlink()
        except OSError:
            pass


def _echo_progress(log_path: Path, shown: int, stderr: TextIO) -> int:
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return shown
    for line in lines[shown:]:
        if line.startswith("glmv: ") and "serving " not in line:
            stderr.write(line + "\n")
            stderr.flush()
    return len(lines)


def _last_error(log_path: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else "no output"


def stop(resident: Resident, timeout_s: float = 15.0) -> bool:
    """Stop one server (SIGTERM: it finishes in-flight answers; SIGKILL after ``timeout_s``). True if it stopped."""
    if not _is_server(resident.pid, resident.path):  # ended since it was listed (its pid may be another's now)
        Path(resident.path).unlink(missing_ok=True)
        return True
    try:
        os.kill(resident.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while _is_server(resident.pid, resident.path) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _is_server(resident.pid, resident.path):
        try:
            os.kill(resident.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    Path(resident.path).unlink(missing_ok=True)
    Path(resident.log).unlink(missing_ok=True)  # stopped on purpose: nothing to look into
    return True


# -- the server side: activity tracking, idle shutdown, the state file ------------------------------
class ActivityTracker:
    """ASGI wrapper counting API requests in flight (streams included) and when the last one ended.

    A request counts once its body has arrived whole (at once for a GET): a client that sends headers and
    then nothing is not activity, so it cannot hold the idle timeout off (the server's guard answers it 408).
    Such a request ending does not restart the idle clock either."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.in_flight = 0
        self.last = time.monotonic()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        counted = False

        def begin() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.in_flight += 1

        async def tracked_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                begin()
            return message

        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            begin()
        try:
            await self.app(scope, tracked_receive, send)
        finally:
            if counted:
                self.in_flight -= 1
                self.last = time.monotonic()


def watch_server(server: Any, tracker: ActivityTracker, idle_timeout_s: float | None,
                 on_ready: Callable[[int], None], on_idle: Callable[[], None]) -> None:
    """Run in a thread beside uvicorn: report the bound port once listening, then stop the server when idle."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    on_ready(port)
    if idle_timeout_s is None:
        return
    while not server.should_exit:
        time.sleep(min(1.0, idle_timeout_s / 4))
        if tracker.in_flight == 0 and time.monotonic() - tracker.last > idle_timeout_s:
            on_idle()
            server.should_exit = True
            return
