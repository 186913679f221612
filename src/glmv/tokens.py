"""GLM-4.6V's special and markup token strings, as the released tokenizer has them (MODEL_FACTS.md).

One list for the two places that need the strings: the output parser (which tags switch its state and which
control tokens it drops) and the tiny checkpoint (whose tokenizer must hold the same single tokens, special
or not, as the real one). Token ids are never listed here: they are read from the loaded tokenizer.
"""

from __future__ import annotations

# Control tokens: special in the released tokenizer (``skip_special_tokens=True`` removes them).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
ARG_KEY_OPEN, ARG_KEY_CLOSE = "<arg_key>", "</arg_key>"
ARG_VALUE_OPEN, ARG_VALUE_CLOSE = "<arg_value>", "</arg_value>"
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
NOTHINK = "/nothink"  # appended to user turns by the template when thinking is off

# Single tokens that are NOT special in the released tokenizer: they survive ``skip_special_tokens=True``.
PLAIN_TOKENS = (
    THINK_OPEN,
    THINK_CLOSE,
    TOOL_OPEN,
    TOOL_CLOSE,
    "<tool_response>",
    "</tool_response>",
    ARG_KEY_OPEN,
    ARG_KEY_CLOSE,
    ARG_VALUE_OPEN,
    ARG_VALUE_CLOSE,
    NOTHINK,
    BOX_OPEN,
    BOX_CLOSE,
)

__all__ = ["ARG_KEY_CLOSE", "ARG_KEY_OPEN", "ARG_VALUE_CLOSE", "ARG_VALUE_OPEN", "BOX_CLOSE", "BOX_OPEN", "NOTHINK",
           "PLAIN_TOKENS", "SPECIAL_TOKENS", "THINK_CLOSE", "THINK_OPEN", "TOOL_CLOSE", "TOOL_OPEN"]
