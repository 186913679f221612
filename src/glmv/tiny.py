"""A tiny random checkpoint in the real GLM-4.6V format: the test fixture and the offline smoke model.

It is built here, in seconds on a CPU, because no test machine can download the real weights. What is
real: the file layout (``config.json`` of model type ``glm4v``, a ``tokenizer.json`` holding every
special token of GLM-4.6V, a ``chat_template.jinja`` that renders the real prompt format,
``generation_config.json`` with the real stop tokens (its sampling defaults are deliberately not the
model card's, so tests can tell they are read from the checkpoint), the ``Glm46VProcessor``
configs) and therefore the whole loading, processing and generation path. What is not: the weights are
random and the vocabulary is small, so its text is gibberish and its token ids differ from the real
ones (which keeps the code honest about reading ids from the checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from .settings import cache_root
from .tokens import PLAIN_TOKENS, SPECIAL_TOKENS  # the real tokenizer's special and plain single tokens

# Bump when the layout changes, so cached copies are rebuilt (4: think/box/tool tags no longer special,
# released pixel bounds, the template that strips reasoning from history; 5: sampling defaults distinct
# from the model card's).
TINY_VERSION = "5"

# The released processor configs of the family (GLM-OCR, GLM-4.1V) bound images to 12544..9633792 pixels
# (at most ~6144 visual tokens); transformers' class defaults (longest_edge 11760000) differ.
IMAGE_SIZE = {"shortest_edge": 12544, "longest_edge": 9633792}

_CORPUS = """
describe this image. Extract all text in reading order; render tables as Markdown.
Turn this screenshot into a single self-contained HTML file with inline CSS.
<!DOCTYPE html><html><head><meta charset="utf-8"><title>Page</title><style>body { margin: 0; }</style>
</head><body><header><h1>Welcome</h1></header><main><p>Hello world</p><table><tr><td>1</td></tr></table>
</main><footer>Contact us</footer></body></html>
The image shows a red square, a blue circle and a green triangle on a white background.
| Item | Quantity | Price |
|------|----------|-------|
| Apple | 3 | 1.20 |
The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'"()[]{}<>/\\-_=+*&^%$#@~`
```html
<div class="card"><button>Sign in</button></div>
```
{"name": "crop", "arguments": {"box": [100, 200, 300, 400]}}
"""


def chat_template_text() -> str:
    return resources.files("glmv.templates").joinpath("glm46v_chat_template.jinja").read_text(encoding="utf-8")


def _build_tokenizer(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out)


def build_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into ``out`` (created) and return it."""
    import torch
    from transformers import (
        AutoTokenizer,
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm46VImageProcessor,
        Glm46VProcessor,
        Glm46VVideoProcessor,
        GenerationConfig,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + PLAIN_TOKENS}

    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 500000.0,
            "mrope_section": [2, 3, 3],
            "partial_rotary_factor": 0.5,
        },
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "num_heads": 2,
        "intermediate_size": 128,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 128,
        "image_size": 336,
    }
    config = Glm4vConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        do_sample=True,
        # Deliberately not the model card's values (settings.py hard-codes those as the fallback), so a
        # test can tell that the defaults were read from the checkpoint.
        temperature=0.7,
        top_p=0.65,
        top_k=3,
        repetition_penalty=1.05,
        max_new_tokens=8192,
        eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out)

    processor = Glm46VProcessor(
        image_processor=Glm46VImageProcessor(size=dict(IMAGE_SIZE)),
        tokenizer=tokenizer,
        video_processor=Glm46VVideoProcessor(),
        chat_template=chat_template_text(),
    )
    processor.save_pretrained(out)
    (out / "glmv_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "seed": seed}) + "\n")
    return out


def tiny_checkpoint_path() -> Path:
    return cache_root() / f"tiny-glm46v-v{TINY_VERSION}"


def ensure_tiny_checkpoint() -> Path:
    """The cached tiny checkpoint, built atomically on first use."""
    target = tiny_checkpoint_path()
    if (target / "glmv_tiny.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_checkpoint(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "glmv_tiny.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
