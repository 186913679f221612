"""The chunk assembler every backend streams through (backends/stream.py), and the scripted backend built on it.

The assembler owns stop strings, the thinking/answer/tool split, counts, timings and the finish reason; the
local, remote and scripted backends only hand it text. The last test runs the local backend on the tiny
model and the scripted backend on the very text pieces the model produced: the chunks must be the same.
"""

from __future__ import annotations

import json
import threading

import pytest

from glmv.backends.base import Chunk, GenerationRequest, collect
from glmv.backends.stream import ChunkAssembler, IncrementalDecoder
from glmv.parsing import ToolCall, parse_output
from glmv.prompts import user_message
from glmv.settings import SamplingParams
from glmv.testing.scripted import ScriptedBackend

TOOLS = [{"type": "function", "function": {"name": "crop", "parameters": {
    "type": "object", "properties": {"box": {"type": "array"}, "note": {"type": "string"}}}}}]
CALL_TEXT = ("<think>Need a closer look.</think><tool_call>crop\n<arg_key>box</arg_key>\n<arg_value>[1, 2, 3, 4]"
             "</arg_value>\n<arg_key>note</arg_key>\n<arg_value>top \"left\"</arg_value>\n</tool_call>")


def pieces_of(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def assemble(pieces: list[str], ended=None, **kwargs) -> list[Chunk]:
    out = ChunkAssembler(**kwargs)
    chunks: list[Chunk] = []
    for piece in pieces:
        chunks += out.push(piece, tokens=1)
    return chunks + out.done(ended)


def shown(chunks: list[Chunk], kind: str = "answer") -> str:
    return "".join(c.text for c in chunks if c.type == kind)


# -- stop strings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", range(1, 9))
def test_a_stop_string_split_across_pieces_is_never_shown(size):
    text = "<think>plan</think>The answer is 42.\nEND of it, and more text after."
    chunks = assemble(pieces_of(text, size), stops=("\nEND", "never"))
    done = chunks[-1]
    assert shown(chunks) == "The answer is 42." == done.result.answer
    assert "END" not in done.result.answer and shown(chunks, "thinking") == "plan"
    assert done.finish_reason == "stop"


def test_after_a_stop_string_text_is_dropped_but_tokens_are_counted():
    out = ChunkAssembler(stops=("STOP",), max_new_tokens=100)
    first = out.push("hello STO", tokens=3) + out.push("P world", tokens=2)
    assert out.stopped
    assert out.push("more", tokens=4) == []  # the model may emit a token or two before it notices
    done = out.done("cancelled")[-1]  # cancelled because of the stop string: still a stop
    assert shown(first) == "hello " and done.result.answer == "hello"
    assert done.usage.completion_tokens == 9 and done.finish_reason == "stop"


def test_held_back_text_is_released_when_no_stop_string_follows():
    chunks = assemble(["abc S", "T"], stops=("STOP",))
    assert shown(chunks) == "abc ST" and chunks[-1].result.answer == "abc ST"


# -- finish reasons -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ended, pieces, max_new, expect", [
    ("stop", ["a", "b"], 2, "stop"),  # the model's own stop token, even at the limit
    (None, ["a", "b"], 2, "length"),  # no stop token and the limit reached: counted
    (None, ["a", "b"], 3, "stop"),
    ("length", ["a"], None, "length"),  # a server said so
    ("cancelled", ["a"], 1, "cancelled"),
    (None, pieces_of(CALL_TEXT, 5), 10_000, "tool_calls"),
    ("length", pieces_of(CALL_TEXT, 5), None, "tool_calls"),  # complete calls are run, whatever cut the rest
    ("cancelled", pieces_of(CALL_TEXT, 5), None, "cancelled"),
])
def test_finish_reason(ended, pieces, max_new, expect):
    done = assemble(pieces, ended, max_new_tokens=max_new, tools=TOOLS)[-1]
    assert done.type == "done" and done.finish_reason == expect


# -- tool calls -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_tool_arguments_stream_in_fragments_that_join_to_the_call(size):
    chunks = assemble(pieces_of(CALL_TEXT, size), tools=TOOLS)
    frags = [c for c in chunks if c.type == "tool_args"]
    assert frags[0].name == "crop" and all(c.name is None for c in frags[1:])
    calls = [c.tool_call for c in chunks if c.type == "tool_call"]
    assert [(c.name, c.arguments) for c in calls] == [("crop", {"box": [1, 2, 3, 4], "note": 'top "left"'})]
    assert json.loads("".join(c.text for c in frags)) == calls[0].arguments
    assert "".join(c.text for c in frags) == calls[0].arguments_json()
    done = chunks[-1]
    assert done.result.tool_calls == calls and done.result.thinking == "Need a closer look."
    assert chunks.index(next(c for c in chunks if c.type == "tool_call")) > chunks.index(frags[-1])


def test_a_cut_off_call_is_reported_as_far_as_it_was_streamed():
    text = CALL_TEXT[: CALL_TEXT.index("</arg_value>\n<arg_key>note")]
    chunks = assemble(pieces_of(text, 4), tools=TOOLS, max_new_tokens=len(pieces_of(text, 4)))
    done = chunks[-1]
    assert done.finish_reason == "length" and not done.result.tool_calls
    assert done.result.cut_call.arguments == "".join(c.text for c in chunks if c.type == "tool_args")
    assert parse_output(text, tools=TOOLS).cut_call == done.result.cut_call  # the same as a whole-text parse


def test_without_tools_call_markup_is_answer_text():
    done = assemble(pieces_of(CALL_TEXT, 3))[-1]
    assert not done.result.tool_calls and "crop" in done.result.answer and done.finish_reason == "stop"


def test_reasoning_and_whole_calls_from_a_server():
    out = ChunkAssembler()
    chunks = out.push_thinking("Too small.", tokens=1) + out.push("<think>More.</think>Zooming.", tokens=1)
    out.add_tool_call(ToolCall("crop", {"box": [1, 2, 3, 4]}))
    chunks += out.done("stop")
    assert [c.type for c in chunks] == ["thinking", "thinking", "answer", "tool_call", "done"]
    assert chunks[-1].result.thinking == "Too small.\n\nMore." and chunks[-1].finish_reason == "tool_calls"
    assert chunks[-1].usage.completion_tokens == 2


def test_counts_and_timings():
    out = ChunkAssembler(prompt_tokens=7)
    assert out.push("", tokens=1) == [] and out.timings.ttft_s is not None  # a token that is not text yet
    done = (out.push("hi", tokens=2) + out.done())[-1]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (7, 3)
    assert done.timings.total_s >= done.timings.ttft_s and done.raw_text == "hi"


def test_incremental_decoder_holds_back_half_a_character():
    class Bytes:  # a tokenizer whose ids are UTF-8 bytes
        def decode(self, ids, **kwargs):
            return bytes(ids).decode("utf-8", errors="replace")

    dec = IncrementalDecoder(Bytes())
    snowman = list("☃".encode())
    assert dec.push([ord("a")]) == "a"
    assert dec.push(snowman[:2]) == "" and dec.push(snowman[2:]) == "☃"
    assert dec.push(snowman[:1]) == "" and dec.flush() == "\ufffd"


# -- the scripted backend is the assembler plus a script ---------------------------------------------------
def request(text="hi", **sampling):
    return GenerationRequest([user_message(text)], sampling=SamplingParams(**sampling), tools=None)


def test_scripted_backend_applies_stop_strings_and_limits_like_a_model():
    assert collect(ScriptedBackend("Answer. STOP junk").generate(request(stop=("STOP",)))).output.answer == "Answer."
    r = collect(ScriptedBackend(["a", "b", "c", "d"]).generate(request(max_new_tokens=3)))
    assert (r.output.answer, r.finish_reason, r.usage.completion_tokens) == ("abc", "length", 3)
    r = collect(ScriptedBackend(["a", "b", "c"]).generate(request(max_new_tokens=4)))
    assert (r.finish_reason, r.usage.completion_tokens) == ("stop", 3)
    cancel = threading.Event()
    cancel.set()
    assert collect(ScriptedBackend("abc").generate(request(), cancel)).finish_reason == "cancelled"


@pytest.mark.slow
def test_scripted_and_local_give_the_same_chunks_for_the_same_text(tiny_backend, monkeypatch):
    """The local backend on the tiny model, then the scripted one fed the text of each token the model made."""
    produced: list[list[int]] = []
    submit = tiny_backend.scheduler.submit

    def recording_submit(job):
        put = job.out.put

        def tee(item):
            if item[0] == "tokens":
                produced.append(list(item[1]))
            put(item)

        job.out.put = tee
        return submit(job)

    monkeypatch.setattr(tiny_backend.scheduler, "submit", recording_submit)
    sampling = tiny_backend.default_sampling.merged(temperature=0, max_new_tokens=40)
    req = GenerationRequest([user_message("describe this image")], sampling=sampling)
    local = list(tiny_backend.generate(req))
    monkeypatch.undo()

    eos = tiny_backend.eos_ids()
    decoder = IncrementalDecoder(tiny_backend.processor.tokenizer)
    pieces = [decoder.push([i for i in ids if i not in eos]) for ids in produced]
    assert all(len(ids) == 1 for ids in produced) and decoder.flush() == ""
    scripted = list(ScriptedBackend(pieces).generate(req))

    def key(c: Chunk):
        return (c.type, c.text, c.index, c.name, c.tool_call, c.finish_reason, c.result, c.usage.completion_tokens)

    assert local[-1].finish_reason in ("length", "stop") and len(local) > 3
    assert [key(c) for c in scripted] == [key(c) for c in local]
    assert scripted[-1].raw_text == local[-1].raw_text
