"""The local transformers backend on the tiny checkpoint: streaming, cancel, stops, limits, one inference thread."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from glmv.backends.base import GenerationRequest, collect
from glmv.backends.stream import IncrementalDecoder
from glmv.errors import ContextLengthError, RequestError
from glmv.media import load_image
from glmv.prompts import Message, user_message

pytestmark = pytest.mark.slow


def req(backend, prompt="describe this image", images=1, **sampling):
    imgs = [load_image(Image.new("RGB", (280, 196), (i * 40, 100, 200))) for i in range(images)]
    sampling.setdefault("max_new_tokens", 16)
    return GenerationRequest([user_message(prompt, imgs)], sampling=backend.default_sampling.merged(**sampling))


def test_defaults_come_from_the_checkpoint(tiny_backend):
    s = tiny_backend.default_sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.7, 0.65, 3, 1.05)


def test_stream_chunks_agree_with_result(tiny_backend):
    chunks = list(tiny_backend.generate(req(tiny_backend, seed=0, max_new_tokens=24)))
    assert chunks[-1].type == "done"
    done = chunks[-1]
    answer = "".join(c.text for c in chunks if c.type == "answer")
    thinking = "".join(c.text for c in chunks if c.type == "thinking")
    assert answer.strip() == done.result.answer and thinking.strip() == done.result.thinking
    assert done.usage.completion_tokens == 24 and done.finish_reason == "length"
    assert done.timings.ttft_s > 0 and done.timings.prefill_s > 0 and done.timings.total_s >= done.timings.ttft_s


def test_greedy_is_deterministic_and_seed_reproduces(tiny_backend):
    a = collect(tiny_backend.generate(req(tiny_backend, temperature=0)))
    b = collect(tiny_backend.generate(req(tiny_backend, temperature=0)))
    assert a.raw_text == b.raw_text
    c = collect(tiny_backend.generate(req(tiny_backend, seed=7)))
    d = collect(tiny_backend.generate(req(tiny_backend, seed=7)))
    assert c.raw_text == d.raw_text


def test_cancel_stops_within_a_token_or_two(tiny_backend):
    cancel = threading.Event()
    n = 0
    done = None
    for chunk in tiny_backend.generate(req(tiny_backend, max_new_tokens=2000, temperature=0), cancel):
        if chunk.type == "answer":
            n += 1
            if n == 3:
                cancel.set()
        if chunk.type == "done":
            done = chunk
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens < 20
    # The inference thread is free again: the next request runs normally.
    after = collect(tiny_backend.generate(req(tiny_backend, max_new_tokens=4)))
    assert after.usage.completion_tokens == 4


def test_closing_the_iterator_frees_the_thread(tiny_backend):
    it = tiny_backend.generate(req(tiny_backend, max_new_tokens=4000, temperature=0))
    next(it)
    it.close()
    t0 = time.perf_counter()
    r = collect(tiny_backend.generate(req(tiny_backend, max_new_tokens=3)))
    assert r.usage.completion_tokens == 3
    assert time.perf_counter() - t0 < 10


def test_stop_string_cuts_the_answer(tiny_backend):
    full = collect(tiny_backend.generate(req(tiny_backend, temperature=0, max_new_tokens=30)))
    words = full.output.answer.split()
    assert len(words) > 3
    stop = words[2]
    cut = collect(tiny_backend.generate(req(tiny_backend, temperature=0, max_new_tokens=30, stop=(stop,))))
    assert cut.output.answer == full.raw_text.split(stop)[0].strip()
    assert cut.finish_reason == "stop"


def test_concurrent_requests_are_served_one_at_a_time(tiny_backend):
    results = []

    def worker():
        results.append(collect(tiny_backend.generate(req(tiny_backend, max_new_tokens=20))))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.usage.completion_tokens for r in results] == [20, 20, 20]


def test_context_length_checked_before_generation(tiny_backend, monkeypatch):
    monkeypatch.setattr(type(tiny_backend), "context_length", property(lambda self: 40))
    with pytest.raises(ContextLengthError, match="--max-pixels"):
        tiny_backend.generate(req(tiny_backend))


def test_invalid_conversation_refused(tiny_backend):
    with pytest.raises(RequestError):
        tiny_backend.generate(GenerationRequest([Message("assistant", ["hi"])]))
    with pytest.raises(RequestError, match="empty"):
        tiny_backend.generate(GenerationRequest([user_message("")]))


def test_incremental_decoder_equals_full_decode(tiny_backend):
    tok = tiny_backend.processor.tokenizer
    text = "<think>a b</think> Hello wörld — ünïcode ✓ 😀 <|begin_of_box|>42<|end_of_box|>"
    ids = tok.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(tok)
    out = "".join(dec.push([i]) for i in ids) + dec.flush()
    assert out == tok.decode(ids, skip_special_tokens=False)


def test_queued_requests_are_batched_and_match_single_runs(tiny_backend):
    def r(i, n=20):
        img = [load_image(Image.new("RGB", (280 + 56 * i, 196), (i * 40, 100, 200)))] if i != 2 else []
        return GenerationRequest([user_message("describe this image" + " please" * i, img)],
                                 sampling=tiny_backend.default_sampling.merged(max_new_tokens=n, temperature=0))

    singles = [collect(tiny_backend.generate(r(i))).raw_text for i in range(4)]
    blocker = tiny_backend.generate(r(0, 400))
    next(blocker)  # the worker is busy: the next four requests queue up together
    results = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, collect(tiny_backend.generate(r(i))).raw_text))
               for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while tiny_backend.queue_depth < 5 and time.time() < deadline:
        time.sleep(0.01)
    tiny_backend.batch_sizes.clear()
    blocker.close()  # cancel the blocker; the four waiting requests now run as one batch
    for t in threads:
        t.join(60)
    assert 4 in tiny_backend.batch_sizes
    assert results == singles  # greedy: batching (left padding, mixed images) changes nothing


def test_queued_requests_cancelled_leave_the_queue(tiny_backend):
    """A request cancelled (or abandoned) while it waits leaves the queue at once and never reaches the model."""
    blocker = tiny_backend.generate(req(tiny_backend, max_new_tokens=4000, temperature=0))
    next(blocker)  # the worker is busy
    cancel = threading.Event()
    done = []
    waiter = threading.Thread(target=lambda: done.append(collect(tiny_backend.generate(req(tiny_backend, seed=1), cancel))))
    waiter.start()
    abandoned = tiny_backend.generate(req(tiny_backend, seed=2))
    assert next(abandoned).type == "status"  # "waiting: ... ahead"
    deadline = time.time() + 10
    while tiny_backend.queue_depth < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert tiny_backend.queue_depth == 3
    abandoned.close()
    assert tiny_backend.queue_depth == 2
    t0 = time.perf_counter()
    cancel.set()
    waiter.join(5)
    assert time.perf_counter() - t0 < 1.0 and tiny_backend.queue_depth == 1
    assert done[0].finish_reason == "cancelled" and done[0].usage.completion_tokens == 0
    tiny_backend.batch_sizes.clear()
    blocker.close()
    time.sleep(0.3)
    assert tiny_backend.queue_depth == 0 and list(tiny_backend.batch_sizes) == []  # nothing else ran


def test_max_tokens_asked_past_the_context_is_refused_not_cut(tiny_backend):
    limit = tiny_backend.context_length
    asked = GenerationRequest([user_message("hi")], sampling=tiny_backend.default_sampling.merged(max_new_tokens=limit - 2),
                              exact_max_tokens=True)
    with pytest.raises(ContextLengthError, match=r"max_tokens is too large: the prompt is \d+ tokens"):
        tiny_backend.generate(asked)
    asked.exact_max_tokens = False  # a default, not asked for: cut to what the context leaves
    tiny_backend.generate(asked).close()


def test_backend_around_a_model_in_memory(tiny_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from glmv.backends.local import LocalBackend
    from glmv.settings import Settings

    model = AutoModelForImageTextToText.from_pretrained(tiny_path).eval()
    backend = LocalBackend.from_model(model, AutoProcessor.from_pretrained(tiny_path), Settings(model="in-memory"),
                                      log=lambda m: None)
    try:
        r = collect(backend.generate(req(backend, max_new_tokens=3)))
        assert r.usage.completion_tokens == 3
    finally:
        backend.close()
