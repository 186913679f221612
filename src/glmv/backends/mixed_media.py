"""Images and video in one prompt, on transformers' GLM-4.6V model.

GLM-4.6V marks both image and video placeholders in ``input_ids`` with the same ``<|image|>`` token (a video's
frames are written as images between ``<|begin_of_video|>`` and ``<|end_of_video|>``). transformers' model
builds the image mask and the video mask from that one token, so a prompt holding an image and a video fails
with ``Image features and image tokens do not match``. The processor already says which placeholder is which
in ``mm_token_type_ids`` (1: image, 2: video); :func:`separate_image_and_video_tokens` makes the model use it.
Prompts with only images or only video are untouched and take transformers' own path.
"""

from __future__ import annotations

import threading
from typing import Any

IMAGE_TYPE, VIDEO_TYPE = 1, 2  # the processor's mm_token_type_ids values


def separate_image_and_video_tokens(model: Any) -> bool:
    """Patch ``model`` (a loaded GLM-4.xV) so mixed image + video prompts work; False when it does not apply."""
    inner = getattr(model, "model", None)
    image_token_id = getattr(getattr(model, "config", None), "image_token_id", None)
    if inner is None or image_token_id is None or not hasattr(inner, "get_placeholder_mask"):
        return False
    original_forward, original_mask = inner.forward, inner.get_placeholder_mask
    current = threading.local()  # the token types of the forward call running on this thread

    def forward(*args: Any, **kwargs: Any) -> Any:
        current.types = kwargs.get("mm_token_type_ids")
        try:
            return original_forward(*args, **kwargs)
        finally:
            current.types = None

    def get_placeholder_mask(input_ids: Any, inputs_embeds: Any, image_features: Any = None,
                             video_features: Any = None) -> Any:
        types = getattr(current, "types", None)
        if input_ids is None or types is None or not (bool((types == IMAGE_TYPE).any()) and bool((types == VIDEO_TYPE).any())):
            return original_mask(input_ids, inputs_embeds, image_features=image_features, video_features=video_features)
        placeholder = input_ids == image_token_id
        types = types.to(input_ids.device)
        masks = []
        for kind, type_id, features in (("Image", IMAGE_TYPE, image_features), ("Video", VIDEO_TYPE, video_features)):
            mask = placeholder & (types == type_id)
            n = int(mask.sum())
            if features is not None and n * inputs_embeds.shape[-1] != features.numel():
                raise ValueError(f"{kind} features and {kind.lower()} tokens do not match, tokens: {n}, "
                                 f"features: {features.shape[0]}")
            masks.append(mask.unsqueeze(-1).to(inputs_embeds.device))
        return masks[0], masks[1]

    inner.forward = forward
    inner.get_placeholder_mask = get_placeholder_mask
    return True


__all__ = ["separate_image_and_video_tokens"]
