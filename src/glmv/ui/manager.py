"""The web app's model manager: loads a backend in the background, reports progress, swaps models.

The page appears at once; loading happens on a thread and the page polls :meth:`ModelManager.status`.
Switching models closes the old backend first (freeing GPU memory). Before loading, :func:`estimate`
compares what the choice needs with what the GPUs have.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..errors import GlmvError
from ..settings import DEFAULT_MODEL, LARGE_MODEL, Settings

# Parameters of the known checkpoints (billions): text + vision.
KNOWN_PARAMS_B = {DEFAULT_MODEL: 10.3, LARGE_MODEL: 108.0, "tiny": 0.001}
BYTES_PER_PARAM = {"none": 2.0, "w4": 0.62, "nf4": 0.70}  # measured: 20.6 GB / 9.4 GB / 7.2 GB for Flash

BackendFactory = Callable[[Settings, Callable[[str], None]], Any]


@dataclass
class Estimate:
    needed_gb: float | None
    available_gb: float | None
    warning: str | None

    def markdown(self) -> str:
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


def estimate(model: str, quant: str, free_gb: float | None = None) -> Estimate:
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

    def __init__(self, settings: Settings, factory: BackendFactory) -> None:
        self.settings = settings
        self._factory = factory
        self.backend: Any = None
        self.state = "idle"
        self.message = ""
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
            self.settings = settings
            self.state, self.message, self.progress = "loading", f"loading {settings.model} ...", []
            self.started_at = time.time()
            self._thread = threading.Thread(target=self._load, args=(settings,), daemon=True, name="glmv-load")
            self._thread.start()

    def _load(self, settings: Settings) -> None:
        old, self.backend = self.backend, None
        if old is not None:
            self._log("freeing the previous model ...")
            old.close()
            del old
            gc.collect()
        try:
            backend = self._factory(settings, self._log)
        except GlmvError as exc:
            self.state, self.message = "error", str(exc)
            return
        except Exception as exc:  # keep the page alive and say what happened
            self.state, self.message = "error", f"{type(exc).__name__}: {exc}"
            return
        self.backend = backend
        self.state = "ready"
        self.message = f"{settings.model} is ready ({time.time() - self.started_at:.1f} s)"

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def require(self) -> Any:
        if self.state == "ready" and self.backend is not None:
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

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
