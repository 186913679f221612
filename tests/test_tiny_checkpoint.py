"""The tiny checkpoint really is in the GLM-4.6V format, and its template renders MODEL_FACTS.md's prompts."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from glmv.media import load_image
from glmv.parsing import ToolCall
from glmv.prompts import Message, to_template_messages, user_message
from glmv.tiny import PLAIN_TOKENS, SPECIAL_TOKENS

IMG = "<|begin_of_image|><|image|><|end_of_image|>"


@pytest.fixture(scope="module")
def processor(tiny_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_path)


def render(processor, messages, **kw):
    msgs, _ = to_template_messages(messages)
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)


def img(w=56, h=56):
    return load_image(Image.new("RGB", (w, h), "white"))


def test_files_and_model_types(tiny_path):
    names = {p.name for p in tiny_path.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
            "model.safetensors"} <= names
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["model_type"] == "glm4v"
    assert config["text_config"]["model_type"] == "glm4v_text"
    assert config["vision_config"]["model_type"] == "glm4v_vision"
    assert config["architectures"] == ["Glm4vForConditionalGeneration"]


def test_every_special_token_is_one_token(processor):
    tok = processor.tokenizer
    for t in SPECIAL_TOKENS + PLAIN_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, t
    assert tok.padding_side == "left"
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"


def test_ids_in_config_agree_with_tokenizer(tiny_path, processor):
    config = json.loads((tiny_path / "config.json").read_text())
    tok = processor.tokenizer
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image|>")
    assert config["video_token_id"] == tok.convert_tokens_to_ids("<|video|>")
    assert config["image_start_token_id"] == tok.convert_tokens_to_ids("<|begin_of_image|>")
    gen = json.loads((tiny_path / "generation_config.json").read_text())
    stops = {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    assert set(gen["eos_token_id"]) == stops
    assert (gen["temperature"], gen["top_p"], gen["top_k"], gen["repetition_penalty"]) == (0.7, 0.65, 3, 1.05)


def test_prompt_format_matches_model_facts(processor):
    text = render(processor, [Message("system", ["{system text}"]), user_message("describe this image", [img()])])
    assert text == (
        "[gMASK]<sop><|system|>\n{system text}<|user|>\n"
        "<|begin_of_image|><|image|><|end_of_image|>describe this image<|assistant|>\n"
    )


def test_several_images_in_one_turn(processor):
    text = render(processor, [user_message("compare", [img(), img()])])
    assert text == f"[gMASK]<sop><|user|>\n{IMG}{IMG}compare<|assistant|>\n"


def test_thinking_off_appends_nothink_and_prefills_empty_think(processor):
    msgs = [user_message("first"), Message("assistant", ["ok"]), user_message("second")]
    text = render(processor, msgs, enable_thinking=False)
    assert text.count("/nothink") == 2
    assert "first/nothink" in text and "second/nothink" in text
    assert text.endswith("<|assistant|>\n<think></think>\n")


def test_history_is_rendered_without_reasoning(processor):
    msgs = [user_message("q1"), Message("assistant", ["answer one"]), user_message("q2")]
    text = render(processor, msgs)
    assert "<|assistant|>\n<think></think>\nanswer one<|user|>\nq2<|assistant|>\n" in text


def test_tools_block_and_tool_result_with_image(processor):
    tools = [{"type": "function", "function": {"name": "crop", "description": "zoom in",
                                                 "parameters": {"type": "object", "properties": {"box": {"type": "array"}}}}}]
    call = ToolCall("crop", {"box": [1, 2, 3, 4], "note": "top left"})
    msgs = [
        user_message("read the small print", [img()]),
        Message("assistant", ["Zooming."], tool_calls=[call]),
        Message("tool", [img(), "crop of box [1, 2, 3, 4]"]),
    ]
    text = render(processor, msgs, tools=tools)
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools")
    assert "<tools>\n" + json.dumps(tools[0]) + "\n</tools>" in text
    assert "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>" in text
    assert (
        "<|assistant|>\n<think></think>\nZooming.\n<tool_call>crop\n<arg_key>box</arg_key>\n<arg_value>[1, 2, 3, 4]"
        "</arg_value>\n<arg_key>note</arg_key>\n<arg_value>top left</arg_value>\n</tool_call>"
    ) in text
    assert text.endswith(f"<|observation|>\n<tool_response>\n{IMG}crop of box [1, 2, 3, 4]\n</tool_response><|assistant|>\n")


def test_processor_expands_image_tokens_like_the_real_one(processor):
    text = render(processor, [user_message("describe this image", [img()])])
    image = Image.new("RGB", (1288, 728), "white")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    # MODEL_FACTS.md: 1288x728 -> 1196 visual tokens.
    assert int((inputs["input_ids"][0] == image_id).sum()) == 1196
    assert inputs["image_grid_thw"].tolist() == [[1, 26 * 2, 46 * 2]]


def test_think_box_and_tool_tags_are_single_tokens_that_survive_skip_special_tokens(processor):
    """Like the released tokenizers (MODEL_FACTS.md): one token each, but not special."""
    tok = processor.tokenizer
    text = "<think>r</think><|begin_of_box|>[[1,2,3,4]]<|end_of_box|><tool_call>f\n<arg_key>k</arg_key>" \
           "\n<arg_value>v</arg_value>\n</tool_call>/nothink"
    ids = tok.encode(text + "<|endoftext|><|user|><|image|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == text  # the control tokens go, the tags stay


def test_processor_carries_the_released_pixel_bounds(processor, tiny_path):
    config = json.loads((tiny_path / "processor_config.json").read_text())
    size = config.get("image_processor", config).get("size")
    assert size == {"shortest_edge": 12544, "longest_edge": 9633792}
    # MODEL_FACTS.md: at most ~6144 visual tokens per image; 4000x3000 -> 6030 (transformers' defaults give more).
    text = render(processor, [user_message("describe this image", [img()])])
    inputs = processor(text=[text], images=[Image.new("RGB", (4000, 3000), "white")], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    assert int((inputs["input_ids"][0] == image_id).sum()) == 6030
