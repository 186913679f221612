"""Domain errors of glmv.

Every failure a user can cause or fix is one of these, with a message that names the input and says
what to do. Front ends translate them: the CLI prints ``error: ...`` and exits 2, the web app shows
the message, the server answers with an OpenAI-style error object and a 4xx status.
"""

from __future__ import annotations


class GlmvError(Exception):
    """Base class: a problem the user can act on. ``status`` is the HTTP status a server maps it to."""

    status = 400


class MediaError(GlmvError):
    """An image, document or video that cannot be read."""


class RequestError(GlmvError):
    """A request that is invalid before any model work: empty prompt, bad sampling value, ..."""


class ModelLoadError(GlmvError):
    """The model cannot be found, fetched or loaded on this machine."""

    status = 500


class ContextLengthError(RequestError):
    """The prompt (text plus visual tokens) does not fit the model's context."""

    code = "context_length_exceeded"


class LimitError(RequestError):
    """A request over one of the work limits (:mod:`glmv.limits`), refused before the work starts.

    ``limit`` names the limit (``max_images``, ...); the server answers 413 with code ``limit_exceeded``.
    """

    status = 413
    code = "limit_exceeded"

    def __init__(self, message: str, limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit


class GenerationError(GlmvError):
    """Generation failed on the device (out of memory, ...)."""

    status = 500
