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
DEFAULT_LONG_SIDE = 1600  # pixels for a rendered PDF/deck page's longer side: small print stays legible
# Per-request KV-cache capacity of the fast engine (prompt + answer), in tokens.
DEFAULT_MAX_SEQ_LEN = 16384


@dataclass(frozen=True)
class Bound:
    """The allowed range of one sampling parameter, declared once: :class:`SamplingParams` checks values against
    it, the web app's sliders take their range from it and the CLI's and the server's messages quote ``rule``.

    (Plain data rather than pydantic fields: the CLI's resident path must not pay pydantic's import; the
    server's pydantic schema takes its documented ``minimum``/``maximum`` from here, see :func:`json_schema`.)
    """

    lo: float
    hi: float
    rule: str  # how the message says it: "between 0 and 2"
    integer: bool = False
    lo_open: bool = False  # lo itself is refused: (0, 1]
    step: float = 0.01  # a slider's step (and how far inside an open end its range starts)

    def admits(self, value: Any) -> bool:
        if not (_is_int(value) if self.integer else _is_num(value)):
            return False
        return (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi

    @property
    def slider(self) -> tuple[float, float]:
        """The range a slider can offer: the bounds, an open end moved in by one step."""
        return (self.lo + self.step if self.lo_open else self.lo), self.hi

    def json_schema(self) -> dict[str, Any]:
        """The bounds as JSON Schema keywords (for the server's OpenAPI description)."""
        schema: dict[str, Any] = {"exclusiveMinimum" if self.lo_open else "minimum": self.lo,
                                  "description": f"must be {self.rule}"}
        if self.hi != float("inf"):
            schema["maximum"] = self.hi
        return schema


# The one declaration of what each sampling parameter may be (the defaults are SamplingParams' fields below).
SAMPLING_BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0.0, 2.0, "between 0 and 2"),
    "top_p": Bound(0.0, 1.0, "in (0, 1]", lo_open=True),
    "top_k": Bound(0, MAX_INT32, "an integer from 0 (off) to 2^31-1", integer=True, step=1),
    "repetition_penalty": Bound(0.0, 10.0, "in (0, 10]", lo_open=True),
    "max_new_tokens": Bound(1, float("inf"), "an integer >= 1", integer=True, step=1),
    "seed": Bound(0, MAX_SEED, "an integer from 0 to 2^63-1", integer=True, step=1),
}
MAX_STOPS = 8


@dataclass(frozen=True)
class SamplingParams:
    """Generation parameters, validated against :data:`SAMPLING_BOUNDS` on construction (bad values raise
    :class:`RequestError` saying ``invalid NAME VALUE: must be RULE``)."""

    temperature: float = 0.8
    top_p: float = 0.6
    top_k: int = 2
    repetition_penalty: float = 1.1
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, bound in SAMPLING_BOUNDS.items():
            value = getattr(self, name)
            if not (value is None and name == "seed") and not bound.admits(value):
                raise RequestError(f"invalid {name} {value!r}: must be {bound.rule}")
        if not (all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= MAX_STOPS):
            raise RequestError(f"invalid stop {self.stop!r}: must be up to {MAX_STOPS} non-empty strings")

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
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
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
