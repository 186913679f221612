"""Finding and loading a checkpoint: hub id, local folder or ``tiny``; device, dtype and 4-bit.

Resolution happens before any heavy import so that mistakes (a folder that does not exist, ``--int4``
on a machine without CUDA, a hub that cannot be reached) fail in a second with a message saying what
to do, instead of minutes of network retries and a traceback.
"""

from __future__ import annotations

import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ModelLoadError
from .settings import LARGE_MODEL, TINY_MODEL, Settings

Log = Callable[[str], None]

HUB_PROBE_TIMEOUT_S = 5.0


def _stderr_log(msg: str) -> None:
    print(f"glmv: {msg}", file=sys.stderr, flush=True)


def _is_hub_id(name: str) -> bool:
    org, sep, repo = name.partition("/")
    return bool(sep and org and repo) and "/" not in repo and not name.startswith((".", "~")) and " " not in name


def _hub_reachable(endpoint: str) -> str | None:
    """None if the hub answers a TCP connection, else the reason it does not."""
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return str(exc.strerror or exc)


def _offline_help(name: str) -> str:
    return (
        f"Download it where the hub is reachable (`hf download {name} --local-dir DIR`; the hf command comes with huggingface-hub), copy DIR "
        f"here and pass --model DIR; or run `--model tiny` for an offline smoke test with a tiny random model."
    )


def resolve_model(name: str, log: Log = _stderr_log, download: bool = True) -> Path | None:
    """The local folder holding checkpoint ``name``, downloading it from the hub if needed. With ``download``
    false: every check made (folder, cache, hub reachable, model exists), then None where a download would start."""
    if not name or not name.strip():
        raise ModelLoadError("no model given: pass --model with a hub id (zai-org/GLM-4.6V-Flash) or a local folder")
    if name == TINY_MODEL:
        from .tiny import ensure_tiny_checkpoint, tiny_checkpoint_path

        if not (tiny_checkpoint_path() / "glmv_tiny.json").exists():
            log("building the tiny test checkpoint (first use only) ...")
        return ensure_tiny_checkpoint()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"cannot load model '{name}': it is a file; pass the folder that holds config.json")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"cannot load model '{name}': the folder has no config.json (is it a complete checkpoint?)")
        return path
    if not _is_hub_id(name):
        raise ModelLoadError(
            f"cannot load model '{name}': no such folder, and it is not a hub id of the form org/name "
            f"(for example zai-org/GLM-4.6V-Flash)"
        )
    return _from_hub(name, log, download)


def _from_hub(repo_id: str, log: Log, download: bool = True) -> Path | None:
    from huggingface_hub import constants, model_info, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except (OSError, ValueError):
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"cannot load model '{repo_id}': it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
            + _offline_help(repo_id)
        )
    reason = _hub_reachable(constants.ENDPOINT)
    if reason is not None:
        raise ModelLoadError(
            f"cannot load model '{repo_id}': the Hugging Face hub ({constants.ENDPOINT}) is unreachable ({reason}) "
            f"and the model is not in the local cache. " + _offline_help(repo_id)
        )
    try:
        model_info(repo_id, timeout=20)
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"cannot load model '{repo_id}': no such model on the hub (check the spelling: "
            f"zai-org/GLM-4.6V-Flash or {LARGE_MODEL})"
        ) from None
    except GatedRepoError:
        raise ModelLoadError(f"cannot load model '{repo_id}': the model is gated; accept its licence and log in (hf auth login)") from None
    except Exception as exc:  # network trouble after the probe
        raise ModelLoadError(f"cannot load model '{repo_id}': the hub did not answer ({exc}). " + _offline_help(repo_id)) from None
    if not download:
        return None
    log(f"downloading {repo_id} from the hub (once; it is cached afterwards) ...")
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:
        raise ModelLoadError(f"cannot download model '{repo_id}': {exc}") from None


@dataclass
class Placement:
    device: str  # "cpu" or "cuda" (device_map auto spreads over all visible GPUs)
    dtype: Any  # torch dtype
    quant: str = "none"

    def describe(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        label = {"nf4": "nf4 (bitsandbytes)", "w4": "int4 w4 (glmv)"}.get(self.quant, name)
        return f"{label} on {self.device}"


def choose_placement(settings: Settings) -> Placement:
    """Device and dtype for ``settings``; raises before loading when the combination cannot work."""
    import torch

    has_cuda = torch.cuda.is_available()
    device = settings.device
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device.startswith("cuda") and not has_cuda:
        raise ModelLoadError(f"--device {device} needs a CUDA GPU, and none is visible here; use --device cpu")
    if settings.quant != "none" and not device.startswith("cuda"):
        flag = "--int4 (bitsandbytes nf4)" if settings.quant == "nf4" else "--quant w4"
        raise ModelLoadError(
            f"{flag} needs a CUDA GPU, and this run is on the CPU; drop it to run unquantized on the CPU "
            f"(slow), or run on a machine with an NVIDIA GPU"
        )
    if settings.quant == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelLoadError("--int4 needs bitsandbytes: pip install 'glmv[gpu]'") from None
    dtypes = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = dtypes[settings.dtype]
    return Placement(device=device, dtype=dtype, quant=settings.quant)


def chat_template_source(processor: Any, path: Path, name: str) -> str:
    """Which chat template prompts are rendered with: always the checkpoint's own (the released templates
    differ in details such as the newline after the generation prompt); glmv's own only for ``tiny``, whose
    checkpoint glmv writes. Raises when the checkpoint has none: guessing a format would silently degrade answers."""
    import hashlib

    template = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if not isinstance(template, str) or not template.strip():
        raise ModelLoadError(
            f"cannot load '{name}': the checkpoint has no chat template (chat_template.jinja); "
            f"use a complete GLM-4.6V checkpoint (zai-org/GLM-4.6V-Flash)"
        )
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]
    if (path / "glmv_tiny.json").exists():
        return f"glmv's GLM-4.6V template (tiny test checkpoint), sha256 {digest}"
    found = [f for f in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json") if (path / f).exists()]
    return f"the checkpoint's own ({found[0] if found else 'processor config'}), sha256 {digest}"


def load_checkpoint(path: Path, placement: Placement, name: str, log: Log = _stderr_log) -> tuple[Any, Any]:
    """Load processor and model from a local folder."""
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    t0 = time.perf_counter()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the processor of '{name}': {exc} (GLM-4.6V needs transformers >= 5.2; "
            f"this is {transformers.__version__})"
        ) from None
    log(f"chat template: {chat_template_source(processor, path, name)}")
    kwargs: dict[str, Any] = {"dtype": placement.dtype}
    if placement.device.startswith("cuda") and placement.quant != "w4":
        kwargs["device_map"] = "auto" if placement.device == "cuda" else placement.device
    if placement.quant == "w4":
        kwargs["dtype"] = torch.bfloat16  # loaded on the CPU, then quantized onto the GPU layer by layer
    if placement.quant == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if placement.dtype == torch.float32 else placement.dtype,
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except Exception as exc:
        text = str(exc)
        if "out of memory" in text.lower():
            raise ModelLoadError(
                f"cannot load '{name}' ({placement.describe()}): out of GPU memory; try --quant w4 or a smaller model"
            ) from None
        raise ModelLoadError(f"cannot load the model '{name}': {type(exc).__name__}: {text}") from None
    if placement.quant == "w4":
        from .engine.w4 import quantize_text_decoder

        device = "cuda" if placement.device == "cuda" else placement.device
        log("quantizing the text decoder to int4 (w4) ...")
        quantize_text_decoder(model, device)
        model.to(device)
    model.eval()
    log(f"model ready ({placement.describe()}) in {time.perf_counter() - t0:.1f} s")
    return processor, model
