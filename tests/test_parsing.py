from __future__ import annotations

import random

import pytest

from glmv.parsing import StreamParser, extract_html, format_tool_call, parse_output, parse_tool_call


def stream(text: str, sizes=(1, 2, 3, 5, 7), seed=0, thinking_open=False):
    """Feed ``text`` in random small pieces; return (joined deltas per part, final result)."""
    rng = random.Random(seed)
    p = StreamParser(thinking_open=thinking_open)
    parts = {"thinking": "", "answer": "", "tool": ""}
    i = 0
    while i < len(text):
        n = rng.choice(sizes)
        for d in p.feed(text[i : i + n]):
            parts[d.part] += d.text
        i += n
    for d in p.finish():
        parts[d.part] += d.text
    return parts, p.result()


CASES = [
    # (raw model text, thinking, answer)
    ("<think>Let me look.</think>A red square.", "Let me look.", "A red square."),
    ("\n<think>\nreasoning here\n</think>\n<answer>The cat.</answer><|endoftext|>", "reasoning here", "The cat."),
    ("<think>hmm</think><|begin_of_box|>42<|end_of_box|>", "hmm", "42"),
    ("<think>hmm</think>The answer is <|begin_of_box|> 42 <|end_of_box|>.", "hmm", "The answer is 42."),
    ("<think>a</think>\n\nplain answer<|user|>", "a", "plain answer"),
    ("no thinking at all", "", "no thinking at all"),
    ("<think>cut off by max_new_tokens and never clo", "cut off by max_new_tokens and never clo", ""),
    ("<think></think>\nanswer only", "", "answer only"),
    ("<think>x</think>Answer<|endoftext|>", "x", "Answer"),
    ("<think>x</think><answer><|begin_of_box|>B<|end_of_box|></answer>", "x", "B"),
    ("<think>first</think>part one <think>second</think>part two", "first\n\nsecond", "part one part two"),
    ("<think>x</think>tags <b>kept</b> & <i>html</i>", "x", "tags <b>kept</b> & <i>html</i>"),
    ("<think>x</think>a < b and c > d", "x", "a < b and c > d"),
]


@pytest.mark.parametrize("text,thinking,answer", CASES)
def test_parse_output_splits_thinking_and_answer(text, thinking, answer):
    r = parse_output(text)
    assert r.thinking == thinking
    assert r.answer == answer


@pytest.mark.parametrize("text,thinking,answer", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_matches_whole_parse(text, thinking, answer, seed):
    parts, result = stream(text, seed=seed)
    assert parts["thinking"].strip() == thinking
    assert parts["answer"].strip() == answer
    assert result.thinking == thinking and result.answer == answer


def test_truncated_flag_for_unclosed_think():
    assert parse_output("<think>never closed").truncated
    assert not parse_output("<think>closed</think>done").truncated


def test_prefilled_think_is_inferred_from_lone_close():
    r = parse_output("reasoning without an opening tag</think>the answer")
    assert r.thinking == "reasoning without an opening tag"
    assert r.answer == "the answer"


def test_stream_with_prompt_that_opened_thinking():
    parts, r = stream("step 1, step 2</think>done", thinking_open=True)
    assert parts["thinking"] == "step 1, step 2"
    assert r.answer == "done"


def test_partial_tags_are_never_leaked_in_stream():
    p = StreamParser()
    out = p.feed("<thi")
    assert out == []  # could become <think>
    out = p.feed("nk>abc</th")
    assert [(d.part, d.text) for d in out] == [("thinking", "abc")]
    out = p.feed("ink>ok")
    assert [(d.part, d.text) for d in out] == [("answer", "ok")]


def test_angle_bracket_text_is_released_once_not_a_tag():
    p = StreamParser()
    p.feed("<think>t</think>")
    assert "".join(d.text for d in p.feed("x <")) == "x "  # "<" may start a tag: held
    assert "".join(d.text for d in p.feed("yz")) == "<yz"  # "<yz" cannot: released


# -- tool calls -------------------------------------------------------------------------------
TOOL_TEXT = (
    "<think>I should zoom in.</think>Let me zoom.\n"
    "<tool_call>crop\n<arg_key>box</arg_key>\n<arg_value>[100, 200, 300, 400]</arg_value>\n"
    "<arg_key>image</arg_key>\n<arg_value>0</arg_value>\n<arg_key>note</arg_key>\n<arg_value>small print</arg_value>\n"
    "</tool_call>"
)


def test_tool_call_parsed_with_json_values():
    r = parse_output(TOOL_TEXT)
    assert r.answer == "Let me zoom."
    assert len(r.tool_calls) == 1
    call = r.tool_calls[0]
    assert call.name == "crop"
    assert call.arguments == {"box": [100, 200, 300, 400], "image": 0, "note": "small print"}


@pytest.mark.parametrize("seed", range(5))
def test_tool_call_streamed(seed):
    _, r = stream(TOOL_TEXT, seed=seed)
    assert [c.to_dict() for c in r.tool_calls] == [
        {"name": "crop", "arguments": {"box": [100, 200, 300, 400], "image": 0, "note": "small print"}}
    ]


def test_two_tool_calls_and_json_form():
    text = (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"
        '<tool_call>{"name": "lookup", "arguments": {"q": "x", "n": 2}}</tool_call>'
    )
    r = parse_output(text)
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("get_weather", {"city": "Paris"}), ("lookup", {"q": "x", "n": 2})]
    assert r.answer == ""


def test_unclosed_tool_call_is_not_executed_but_reported():
    r = parse_output("<tool_call>crop\n<arg_key>box</arg_key>\n<arg_val")
    assert r.tool_calls == []
    assert r.truncated
    assert r.cut_call is not None and r.cut_call.name == "crop"
    assert r.to_dict()["cut_off_tool_call"] == {"name": "crop", "arguments": "{"}


def test_call_cut_before_its_name_ends_stays_text():
    r = parse_output("Let me look.<tool_call>cro")
    assert r.tool_calls == [] and r.cut_call is None and r.truncated
    assert r.answer == "Let me look.<tool_call>cro"


def test_tool_call_round_trip():
    args = {"box": [1, 2, 3, 4], "label": "zoom", "scale": 2.5}
    call = parse_tool_call(format_tool_call("crop", args)[len("<tool_call>") : -len("</tool_call>")])
    assert call is not None and call.name == "crop" and call.arguments == args


def test_tool_call_without_name_is_dropped():
    assert parse_tool_call("\n<arg_key>a</arg_key><arg_value>1</arg_value>") is None


def test_tool_call_tag_inside_thinking_is_reasoning():
    r = parse_output("<think>I could use <tool_call> here</think>no call")
    assert r.tool_calls == [] and r.answer == "no call"


# -- HTML -----------------------------------------------------------------------------------
PAGE = "<!DOCTYPE html>\n<html><head><title>T</title></head><body><h1>Hi</h1></body></html>"


def test_html_from_fence():
    ans = f"Here is the page:\n```html\n{PAGE}\n```\nEnjoy."
    assert extract_html(ans).strip() == PAGE


def test_html_raw_without_fence():
    ans = f"Sure. {PAGE} That is all."
    assert extract_html(ans).strip() == PAGE


def test_html_raw_unclosed_is_kept_to_the_end():
    ans = "<html><body><p>cut off"
    assert extract_html(ans).strip() == ans


def test_html_largest_of_several_fences_and_assets_inlined():
    ans = (
        "```html\n<div>small</div>\n```\n"
        f"```html\n{PAGE}\n```\n"
        "```css\nh1 { color: red; }\n```\n"
        "```js\nconsole.log('hi');\n```"
    )
    html = extract_html(ans)
    assert "<h1>Hi</h1>" in html and "small" not in html
    assert html.index("h1 { color: red; }") < html.index("</head>")
    assert html.index("console.log('hi');") < html.index("</body>")


def test_html_unlabelled_fence():
    assert "<h1>Hi</h1>" in extract_html(f"```\n{PAGE}\n```")


def test_no_html():
    assert extract_html("Just a description of a cat.") is None
    assert extract_html("```python\nprint(1)\n```") is None


def test_html_through_parse_output_with_thinking_and_box():
    text = f"<think>plan the layout</think><|begin_of_box|>```html\n{PAGE}\n```<|end_of_box|>"
    r = parse_output(text)
    assert r.html.strip() == PAGE
    assert r.thinking == "plan the layout"
