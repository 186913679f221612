"""Every default in one place: the model, precision, image budget and sampling.

:class:`Settings` describes how to load and run the model; :class:`SamplingParams` is the one
validated set of generation parameters that the CLI, the web app and the server all map onto.
Defaults come from the model card (temperature 0.8, top_p 0.6, top_k 2, repetition_penalty 1.1) and
are replaced by the checkpoint's own ``generation_config.json`` where it sets them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import RequestError

DEFAULT_MODEL = "zai-org/GLM-4.6V-Flash"
LARGE_MODEL = "zai-org/GLM-4.6V"
TINY_MODEL = "tiny"
DEFAULT_MAX_NEW_TOKENS = 8192
MAX_SEED = 2**63 - 1  # what torch.manual_seed takes
MAX_INT32 = 2**31 - 1
# Cap on decoded image size. The processor rounds sides to multiples of 28 and costs one visual token
# per 28x28 block; 4 Mpx (about 5,100 tokens) keeps 1080p screenshots whole and bounds prefill.
DEFAULT_MAX_PIXELS = 4_000_000
# Hard ceiling against decompression bombs: anything larger is refused before decoding.
MAX_DECODE_PIXELS = 64_000_000


@dataclass(frozen=True)
class SamplingParams:
    """Generation parameters, validated on construction (bad values raise :class:`RequestError`)."""

    temperature: float = 0.8
    top_p: float = 0.6
    top_k: int = 2
    repetition_penalty: float = 1.1
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, rule: str) -> None:
            if not ok:
                raise RequestError(f"invalid {name} {getattr(self, name)!r}: must be {rule}")

        check("temperature", _is_num(self.temperature) and 0.0 <= self.temperature <= 2.0, "between 0 and 2")
        check("top_p", _is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "in (0, 1]")
        check("top_k", _is_int(self.top_k) and 0 <= self.top_k <= MAX_INT32, "an integer from 0 (off) to 2^31-1")
        check(
            "repetition_penalty",
            _is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
            "in (0, 10]",
        )
        check("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1")
        check("seed", self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED), "an integer from 0 to 2^63-1")
        check("stop", all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 8, "up to 8 non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def merged(self, **overrides: Any) -> "SamplingParams":
        """A copy with the non-None overrides applied (and validated)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise RequestError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        values = {k: v for k, v in overrides.items() if v is not None}
        if "stop" in values and isinstance(values["stop"], str):
            values["stop"] = (values["stop"],)
        if "stop" in values:
            values["stop"] = tuple(values["stop"])
        return replace(self, **values)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # rejects NaN


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Settings:
    """How to load and run the model. Front ends fill it from flags, controls or environment."""

    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32
    # none | nf4 (bitsandbytes, double quantization, bf16 compute: the tutorial's --int4)
    # | w4 (glmv's fast 4-bit: int4 groups of 128 with Triton kernels, used by the fast engine)
    quant: str = "none"
    max_pixels: int = DEFAULT_MAX_PIXELS
    thinking: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    engine: str = "auto"  # auto (fast on CUDA where supported) | fast | hf (transformers generate)
    max_seq_len: int = 16384  # per-request KV-cache capacity of the fast engine (prompt + answer)
    # fast engine: prompt-lookup speculative decoding: auto (for prompts that carry text to copy: HTML edits,
    # refine rounds, OCR re-runs) | on | off
    speculate: str = "auto"
    prefix_cache_gb: float | None = None  # fast engine's prefix cache (None: auto, from free memory; 0: off)
    allow_remote_media: bool = True  # the CLI may fetch URLs it is given; the server turns this off
    # fast engine: time cuBLAS against Triton GEMV per shape (cached on disk); GLMV_TUNE=0 turns it off
    tune: bool = True

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        """Defaults, then ``GLMV_*`` environment variables, then explicit overrides (None = unset)."""
        env: dict[str, Any] = {}
        if os.environ.get("GLMV_MODEL"):
            env["model"] = os.environ["GLMV_MODEL"]
        if os.environ.get("GLMV_DEVICE"):
            env["device"] = os.environ["GLMV_DEVICE"]
        if os.environ.get("GLMV_MAX_PIXELS"):
            try:
                env["max_pixels"] = int(os.environ["GLMV_MAX_PIXELS"])
            except ValueError as exc:
                raise RequestError(f"GLMV_MAX_PIXELS={os.environ['GLMV_MAX_PIXELS']!r} is not an integer") from exc
        env["tune"] = tune_from_env()
        env.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**env)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not isinstance(self.max_pixels, int) or self.max_pixels < 28 * 28:
            raise RequestError(f"invalid max_pixels {self.max_pixels!r}: must be an integer >= 784 (28x28)")
        if self.max_pixels > MAX_DECODE_PIXELS:
            raise RequestError(f"invalid max_pixels {self.max_pixels}: at most {MAX_DECODE_PIXELS}")
        if self.dtype not in ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"):
            raise RequestError(f"invalid dtype {self.dtype!r}: use auto, bfloat16, float16 or float32")
        if self.quant not in ("none", "nf4", "w4"):
            raise RequestError(f"invalid quantization {self.quant!r}: use none, nf4 or w4")
        if self.engine not in ("auto", "fast", "hf"):
            raise RequestError(f"invalid engine {self.engine!r}: use auto, fast or hf")
        if self.speculate not in ("auto", "on", "off"):
            raise RequestError(f"invalid speculate {self.speculate!r}: use auto, on or off")
        if self.prefix_cache_gb is not None and not self.prefix_cache_gb >= 0:
            raise RequestError(f"invalid prefix_cache_gb {self.prefix_cache_gb!r}: must be a number >= 0 (0 turns it off)")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise RequestError(f"invalid device {self.device!r}: use auto, cpu, cuda or cuda:N")


def tune_from_env() -> bool:
    """The fast engine's per-shape GEMV tuning, on unless ``GLMV_TUNE=0``: read here, where settings are built,
    and handed to the engine through its config (never read inside the engine)."""
    return os.environ.get("GLMV_TUNE", "1") != "0"


def tuning_dir() -> Path:
    """Where the fast engine caches its per-shape GEMV choices (handed to it in ``EngineConfig``)."""
    return cache_root() / "tuning"


def cache_root() -> Path:
    """Where glmv keeps what it builds (the tiny checkpoint, compile caches)."""
    base = os.environ.get("GLMV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "glmv"
    )
    return Path(base)
