"""The web app's model manager: loads a backend in the background, reports progress, swaps models.

The page appears at once; loading happens on a thread and the page polls :meth:`ModelManager.status`.
Switching models closes the old backend first (freeing GPU memory), but only after the new choice has
passed its checks (:func:`check_choice`, and the ``precheck`` that finds or downloads the checkpoint): a
choice that cannot work leaves the working model in place. Before loading, :func:`estimate` compares what
the choice needs with what the GPUs have, and says so when the folder does not exist. Messages written
for the command line are translated into the page's terms (:func:`in_ui_terms`).
"""

from __future__ import annotations

import gc
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..backends.base import check_backend
from ..errors import GlmvError
from ..privacy import redact_url
from ..settings import DEFAULT_MODEL, LARGE_MODEL, Settings

# Parameters of the known checkpoints (billions): text + vision.
KNOWN_PARAMS_B = {DEFAULT_MODEL: 10.3, LARGE_MODEL: 108.0, "tiny": 0.001}
BYTES_PER_PARAM = {"none": 2.0, "w4": 0.62, "nf4": 0.70}  # measured: 20.6 GB / 9.4 GB / 7.2 GB for Flash

BackendFactory = Callable[[Settings, Callable[[str], None]], Any]
Precheck = Callable[[Settings, Callable[[str], None]], None]

# The core's advice names CLI flags; the page has a Model panel instead.
UI_TERMS = [
    ("pass --model DIR", 'choose "local folder…" in the Model panel and enter DIR'),
    ("run `--model tiny` for an offline smoke test", 'choose "tiny test model" in the Model panel for an offline smoke test'),
    ("pass --model with a hub id", "choose a model in the Model panel, or a local folder"),
    ("(check --base-url)", "(check the --base-url the app was started with)"),
]


def in_ui_terms(message: str) -> str:
    for cli, ui in UI_TERMS:
        message = message.replace(cli, ui)
    return message


def _looks_like_folder(model: str) -> bool:
    """A path rather than a hub id (org/name) or a known name."""
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return bool(torch.cuda.is_available())


def check_choice(model: str, quant: str, has_cuda: bool | None = None) -> str | None:
    """Why this model/precision cannot load here, found without loading anything (None if it may)."""
    if model not in KNOWN_PARAMS_B and _looks_like_folder(model):
        path = Path(model).expanduser()
        if not path.exists():
            return f"no such folder: {model}"
        if not path.is_dir():
            return f"{model} is a file; enter the folder that holds config.json"
        if not (path / "config.json").exists():
            return f"the folder {model} has no config.json (is it a complete checkpoint?)"
    if quant in ("w4", "nf4") and not (cuda_available() if has_cuda is None else has_cuda):
        name = {"w4": "4-bit fast (w4)", "nf4": "4-bit nf4"}[quant]
        return f"{name} needs a CUDA GPU and this machine has none (use bf16)"
    return None


@dataclass
class Estimate:
    needed_gb: float | None
    available_gb: float | None
    warning: str | None
    problem: str | None = None  # the choice cannot load at all

    def markdown(self) -> str:
        if self.problem:
            return f"**Cannot load:** {self.problem}."
        need = "unknown" if self.needed_gb is None else f"~{self.needed_gb:.1f} GB"
        have = "no CUDA GPU (runs on the CPU, slowly)" if self.available_gb is None else f"{self.available_gb:.1f} GB free on the GPU(s)"
        text = f"Needs {need} of GPU memory; {have}."
        return text + (f"\n\n**Warning:** {self.warning}" if self.warning else "")


def _local_params_b(path: Path) -> float | None:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            total = json.loads(index.read_text())["metadata"]["total_size"]
            return total / 2 / 1e9  # bf16 checkpoints: 2 bytes a parameter
        except (ValueError, KeyError):
            return None
    files = list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2 / 1e9 if files else None


def gpu_free_gb() -> float | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())) / 1e9


def estimate(model: str, quant: str, free_gb: float | None = None, has_cuda: bool | None = None) -> Estimate:
    problem = check_choice(model, quant, free_gb is not None if has_cuda is None else has_cuda)
    if problem:
        return Estimate(None, free_gb, None, problem)
    params = KNOWN_PARAMS_B.get(model)
    if params is None and Path(model).expanduser().is_dir():
        params = _local_params_b(Path(model).expanduser())
    needed = None if params is None else params * BYTES_PER_PARAM.get(quant, 2.0) + (1.0 if params > 1 else 0.0)
    warning = None
    if needed is not None and free_gb is not None and needed > free_gb:
        warning = f"this will not fit: {needed:.0f} GB needed, {free_gb:.0f} GB free. Choose 4-bit or a smaller model."
    elif free_gb is None and needed is not None and needed > 2:
        warning = "without a GPU this model will be very slow (minutes per answer)."
    return Estimate(needed, free_gb, warning)


class ModelManager:
    """Owns the current backend for every browser session; loads and swaps on a background thread."""

    def __init__(self, settings: Settings, factory: BackendFactory, precheck: Precheck | None = None) -> None:
        self.settings = settings
        self._factory = factory
        self._precheck = precheck
        self.backend: Any = None
        self.state = "idle"
        self.message = ""
        self.failures = 0  # counts failed loads, so each page can react once to a new one
        self.name = ""  # what is loaded, as the header shows it
        self._previous: Settings | None = None
        self.progress: list[str] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.started_at = 0.0

    def _log(self, line: str) -> None:
        self.progress.append(line)
        del self.progress[:-6]

    def load_async(self, **changes: Any) -> None:
        with self._lock:
            if self.state == "loading":
                raise GlmvError("a model is already loading; wait for it to finish")
            settings = replace(self.settings, **{k: v for k, v in changes.items() if v is not None})
            settings.validate()
            problem = check_choice(settings.model, settings.quant)
            if problem:
                raise GlmvError(f"cannot load {settings.model}: {problem}")
            self._previous = self.settings if self.backend is not None else None
            self.settings = settings
            self.state, self.message, self.progress = "loading", f"loading {settings.model} ...", []
            self.started_at = time.time()
            self._thread = threading.Thread(target=self._load, args=(settings,), daemon=True, name="glmv-load")
            self._thread.start()

    def _fail(self, settings: Settings, message: str) -> None:
        self.failures += 1
        message = in_ui_terms(message)
        if self.backend is not None:  # the working model stays
            self.settings = self._previous or self.settings
            self.state, self.message = "ready", f"{self.name} is ready · could not load {settings.model}: {message}"
        else:
            self.state, self.message = "error", message

    def _load(self, settings: Settings) -> None:
        if self._precheck is not None:  # find or download the checkpoint while the old model still serves
            try:
                self._precheck(settings, self._log)
            except Exception as exc:
                self._fail(settings, str(exc) if isinstance(exc, GlmvError) else f"{type(exc).__name__}: {exc}")
                return
        old, self.backend = self.backend, None
        freed = old is not None
        if old is not None:
            self._log("freeing the previous model ...")
            old.close()
            del old
            gc.collect()
        try:
            backend = check_backend(self._factory(settings, self._log))
        except Exception as exc:  # keep the page alive and say what happened
            self._fail(settings, str(exc) if isinstance(exc, GlmvError) else f"{type(exc).__name__}: {exc}")
            if freed and self._previous is not None:  # it failed after the old model was freed
                self._restore(self._previous)
            return
        self.backend = backend
        self.name = display_name(backend, settings)
        self.state = "ready"
        self.message = f"{self.name} is ready ({time.time() - self.started_at:.1f} s)"

    def _restore(self, settings: Settings) -> None:
        failed = self.message
        self._log(f"reloading {settings.model} ...")
        try:
            self.backend = self._factory(settings, self._log)
        except Exception:
            return
        self.settings, self.name, self.state = settings, display_name(self.backend, settings), "ready"
        self.message = f"{self.name} is ready again · {failed}"

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def require(self) -> Any:
        if self.backend is not None and self.state in ("ready", "loading"):  # the old model serves until freed
            return self.backend
        if self.state == "loading":
            raise GlmvError("the model is still loading; try again in a moment")
        if self.state == "error":
            raise GlmvError(f"no model is loaded: {self.message}")
        raise GlmvError("no model is loaded: choose one in the Model panel")

    def status_markdown(self) -> str:
        icon = {"ready": "●", "loading": "◌", "error": "✕"}.get(self.state, "○")
        text = f"{icon} **{self.message or 'no model loaded'}**"
        if self.state == "loading":
            text += f" ({time.time() - self.started_at:.0f} s)"
            if self.progress:
                text += "\n\n" + "\n".join(f"- {p}" for p in self.progress[-3:])
        return text

    def header(self) -> str:
        return f"## glmv · {self.name or 'GLM-4.6V'}"

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def display_name(backend: Any, settings: Settings) -> str:
    """The model as a user should see it: a remote server's own model name, else the checkpoint's."""
    if backend.served_model and backend.base_url:
        return f"{backend.served_model} (served by {redact_url(backend.base_url)})"
    return settings.model
