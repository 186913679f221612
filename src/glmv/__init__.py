"""glmv: run the GLM-4.6V vision-language models from a CLI, a web app, an OpenAI-compatible server
and a batch runner, over one core. Importing the package does no work: nothing loads until asked."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import GlmvError, MediaError, ModelLoadError, RequestError
from .parsing import ParsedOutput, StreamParser, ToolCall, extract_html, parse_output

__all__ = [
    "GlmvError",
    "MediaError",
    "ModelLoadError",
    "ParsedOutput",
    "RequestError",
    "StreamParser",
    "ToolCall",
    "extract_html",
    "parse_output",
    "__version__",
]
