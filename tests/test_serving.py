"""Serving on the fast engine (CPU, tiny model): continuous batching, the prefix cache, prompt-lookup
speculation, and what the server reports about them. Every output is compared with the same request run
alone through the same engine, greedy, so any cross-talk between rows or cached blocks shows up as text."""

from __future__ import annotations

import re
import threading
import time

import pytest
from PIL import Image

from glmv.backends.base import GenerationRequest, collect
from glmv.backends.local import LocalBackend
from glmv.media import load_image
from glmv.prompts import Message, user_message
from glmv.settings import Settings

pytestmark = pytest.mark.slow


def image(color: tuple[int, int, int], size: tuple[int, int] = (336, 196)):
    return load_image(Image.new("RGB", size, color))


def request(backend, text, images=(), history=(), **kw) -> GenerationRequest:
    kw.setdefault("max_new_tokens", 24)
    kw.setdefault("temperature", 0)
    speculate = kw.pop("speculate", False)
    messages = [*history, user_message(text, list(images))]
    return GenerationRequest(messages, sampling=backend.default_sampling.merged(**kw), speculate=speculate)


@pytest.fixture(scope="module")
def fast(tiny_path):
    backend = LocalBackend(Settings(model=str(tiny_path), engine="fast"), log=lambda m: None).load()
    backend.engine.config.prefill_chunk = 16  # prompts of ~100 tokens prefill in several chunks between decode steps
    yield backend
    backend.close()


def alone(backend, req) -> str:
    """The request's output with nothing else running and an empty prefix cache."""
    backend.batcher.cache.clear()
    return collect(backend.generate(req)).raw_text


def stream_in_thread(backend, req, out: dict, key, cancel=None):
    def run():
        events = []
        for chunk in backend.generate(req, cancel):
            events.append((time.perf_counter(), chunk.type))
            if chunk.type == "done":
                out[key] = (chunk, events)

    t = threading.Thread(target=run)
    t.start()
    return t


def wait_for(cond, timeout=30.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.002)


def test_rows_join_and_leave_mid_generation_with_the_same_output(fast):
    reqs = {
        "long": request(fast, "describe this image", [image((200, 30, 30))], max_new_tokens=500),
        "short": request(fast, "what colour is it?", [image((30, 200, 30), (280, 280))], max_new_tokens=6),
        "text": request(fast, "say something about pages", max_new_tokens=40),
    }
    singles = {k: alone(fast, r) for k, r in reqs.items()}
    fast.batcher.cache.clear()
    out: dict = {}
    steps0 = fast.batcher.steps
    threads = [stream_in_thread(fast, reqs["long"], out, "long")]
    wait_for(lambda: fast.batcher.steps >= steps0 + 5)  # the long request is decoding
    threads.append(stream_in_thread(fast, reqs["short"], out, "short"))
    wait_for(lambda: "short" in out)
    threads.append(stream_in_thread(fast, reqs["text"], out, "text"))
    for t in threads:
        t.join(120)
    assert {k: v[0].raw_text for k, v in out.items()} == singles
    long_done = out["long"][1][-1][0]
    short_first = min(t for t, kind in out["short"][1] if kind in ("thinking", "answer"))
    # the short request joined and left while the long one was generating, instead of waiting for it
    assert out["short"][1][-1][0] < long_done and short_first < long_done
    assert out["long"][0].usage.completion_tokens == 500
    assert max(fast.batch_sizes) >= 2


def test_cancelling_one_row_leaves_the_others_untouched(fast):
    a = request(fast, "describe this image", [image((10, 20, 200))], max_new_tokens=60)
    b = request(fast, "and this one?", [image((200, 200, 10))], max_new_tokens=3000)
    single = alone(fast, a)
    fast.batcher.cache.clear()
    out: dict = {}
    cancel = threading.Event()
    tb = stream_in_thread(fast, b, out, "b", cancel)
    wait_for(lambda: fast.batcher.running)
    ta = stream_in_thread(fast, a, out, "a")
    wait_for(lambda: len(fast.batcher.running) == 2)
    cancel.set()
    ta.join(120)
    tb.join(120)
    assert out["b"][0].finish_reason == "cancelled" and out["b"][0].usage.completion_tokens < 3000
    assert out["a"][0].raw_text == single


def test_a_request_that_fails_in_prefill_leaves_the_others_running(fast):
    """Driven through the engine's batcher directly (the backend is idle meanwhile): a prompt with image
    placeholders but no image fails on its own; the request decoding beside it finishes unchanged."""
    import torch

    from glmv.engine.scheduler import Batcher, RowParams, Sequence

    good, _ = fast.prepare(request(fast, "describe this image", [image((1, 2, 3))]))
    bad = {"input_ids": torch.tensor([[fast.engine.image_token_id] * 8])}
    eos = frozenset(fast.eos_ids())

    def run(inputs_list):
        batcher = Batcher(fast.engine)
        got = {i: [] for i in range(len(inputs_list))}
        errors, done = {}, {}
        for i, inputs in enumerate(inputs_list):
            batcher.add(Sequence(inputs=dict(inputs), params=RowParams(max_new_tokens=20), emit=got[i].extend,
                                 finish=lambda info, i=i: done.__setitem__(i, info), cancelled=lambda: False, eos=eos,
                                 fail=lambda exc, i=i: errors.__setitem__(i, str(exc))))
            batcher.step()
        while batcher.busy:
            batcher.step()
        return got, errors, done, batcher

    alone_ids, _, _, _ = run([good])
    got, errors, done, batcher = run([good, bad])
    assert got[0] == alone_ids[0] and 0 in done
    assert "no image or video inputs" in errors[1] and 1 not in done
    assert sorted(batcher.free) == list(range(fast.engine.config.max_batch))  # every row is free again


def test_a_long_prefill_runs_in_chunks_between_decode_steps(fast):
    """Driven through the engine's batcher directly: while a newcomer's prompt is prefilled, the decoding
    request gets a token at every step, and the newcomer's prompt takes one step per 16-token chunk."""
    from glmv.engine.scheduler import Batcher, RowParams, Sequence

    eos = frozenset()
    got = {"old": [], "new": []}
    batcher = Batcher(fast.engine)

    def seq(name, inputs, n):
        return Sequence(inputs=dict(inputs), params=RowParams(max_new_tokens=n), emit=got[name].extend,
                        finish=lambda info: None, cancelled=lambda: False, eos=eos)

    old, _ = fast.prepare(request(fast, "hi"))
    new, _ = fast.prepare(request(fast, "describe this image", [image((9, 9, 9))]))
    batcher.add(seq("old", old, 200))
    while not got["old"]:
        batcher.step()
    batcher.add(seq("new", new, 5))
    steps, before = 0, len(got["old"])
    while not got["new"]:
        batcher.step()
        steps += 1
    n = int(new["input_ids"].shape[1])
    assert n > 3 * fast.engine.config.prefill_chunk
    assert steps == -(-n // fast.engine.config.prefill_chunk) and len(got["old"]) - before == steps


def test_a_reused_row_is_not_overwritten_by_other_rows_steps_during_its_prefill(fast):
    """A row freed by a short request is taken by a long prompt while another request decodes: the decode
    steps (which compute every row up to the highest one) must not write into the prompt's keys/values."""
    import torch

    from glmv.engine.scheduler import Batcher

    eos = frozenset()
    decoder, _ = fast.prepare(request(fast, "hi"))
    short, _ = fast.prepare(request(fast, "a"))
    newcomer, _ = fast.prepare(request(fast, "describe this image", [image((70, 7, 7))]))

    def run(with_company: bool) -> list[int]:
        batcher = Batcher(fast.engine)
        got: dict[str, list[int]] = {"d": [], "s": [], "n": []}
        if with_company:
            # row 0: its last decode step leaves the row's write slot in the middle of a later prefill chunk
            n_short = int(short["input_ids"].shape[1])
            k = 16 + (8 - (n_short - 1)) % 16
            batcher.add(chunked_seq(got["s"], short, k, eos))
            batcher.add(chunked_seq(got["d"], decoder, 300, eos))  # row 1, decoding throughout
            while len(got["s"]) < k:
                batcher.step()
        seq = chunked_seq(got["n"], newcomer, 12, eos)
        batcher.add(seq)  # row 0: a decode step of row 1 computes it too
        while not got["n"]:
            batcher.step()
        n = int(newcomer["input_ids"].shape[1])
        kv = fast.engine.k_cache[:, seq.row, :, :n].clone()
        while len(got["n"]) < 12:
            batcher.step()
        return got["n"], kv

    (ids_a, kv_a), (ids_b, kv_b) = run(True), run(False)
    assert ids_a == ids_b and torch.equal(kv_a, kv_b)


def chunked_seq(sink: list[int], inputs: dict, n: int, eos: frozenset):
    from glmv.engine.scheduler import RowParams, Sequence

    return Sequence(inputs=dict(inputs), params=RowParams(max_new_tokens=n, repetition_penalty=1.3), emit=sink.extend,
                    finish=lambda info: None, cancelled=lambda: False, eos=eos)


def prompt_ids(backend, req) -> list[int]:
    return backend.prepare(req)[0]["input_ids"][0].tolist()


def test_rows_keep_their_own_sampling_parameters_and_stops(fast):
    greedy = request(fast, "describe this image", [image((40, 40, 40))], max_new_tokens=50, repetition_penalty=1.0)
    penalised = request(fast, "describe this image", [image((40, 40, 40))], max_new_tokens=30, repetition_penalty=1.5)
    expected = {"greedy": alone(fast, greedy), "penalised": alone(fast, penalised)}
    text = expected["penalised"]
    stop_at = next(w for w in re.findall("[A-Za-z]{3,}", text) if text.index(w) > 3)  # a word a few tokens in
    stopped = request(fast, "describe this image", [image((40, 40, 40))], max_new_tokens=30, repetition_penalty=1.5,
                      stop=[stop_at])
    sampled = request(fast, "tell me a story", max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0)
    fast.batcher.cache.clear()
    out: dict = {}
    steps0 = fast.batcher.steps
    threads = [stream_in_thread(fast, greedy, out, "greedy")]
    wait_for(lambda: fast.batcher.steps >= steps0 + 2)
    threads += [stream_in_thread(fast, r, out, k) for k, r in (("sampled", sampled), ("penalised", penalised),
                                                                ("stopped", stopped))]
    for t in threads:
        t.join(120)
    assert out["greedy"][0].raw_text == expected["greedy"] and out["penalised"][0].raw_text == expected["penalised"]
    answer = out["stopped"][0].result.answer
    assert out["stopped"][0].finish_reason == "stop" and stop_at not in answer and text.startswith(answer)
    assert out["stopped"][0].usage.completion_tokens < out["penalised"][0].usage.completion_tokens
    assert out["sampled"][0].usage.completion_tokens > 0


def count_vision_calls(backend):
    calls = []
    handle = backend.model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_prefix_cache_follow_up_skips_the_vision_tower(fast):
    img = image((120, 40, 160))
    first = request(fast, "describe this image", [img])
    fast.batcher.cache.clear()
    r1 = collect(fast.generate(first))
    assert r1.usage.cached_tokens == 0
    history = [*first.messages, Message("assistant", [r1.output.answer])]
    follow = request(fast, "what is the title?", history=history)
    expected = alone(fast, follow)
    collect(fast.generate(first))  # the first turn again, into a cleared cache
    calls, handle = count_vision_calls(fast)
    try:
        r2 = collect(fast.generate(follow))
    finally:
        handle.remove()
    assert r2.raw_text == expected
    assert calls == []  # the image's keys/values came from the cache
    ids = prompt_ids(fast, follow)
    last_image_token = len(ids) - 1 - ids[::-1].index(fast.engine.image_token_id)
    assert r2.usage.cached_tokens > last_image_token and r2.usage.cached_tokens % fast.batcher.cache.block == 0
    assert fast.serving_stats()["prefix_hit_rate"] > 0


def test_cached_prefix_ending_inside_the_image_reuses_its_vision_features(fast):
    # blocks are whole, so a new question right after the image leaves the image's last tokens to run again:
    # their features come from the prefix cache's feature store, not from a second pass of the vision tower
    img = image((30, 140, 90))
    first, second = request(fast, "describe this image", [img]), request(fast, "list the colours", [img])
    expected = alone(fast, second)
    fast.batcher.cache.clear()
    collect(fast.generate(first))
    calls, handle = count_vision_calls(fast)
    try:
        r = collect(fast.generate(second))
    finally:
        handle.remove()
    ids = prompt_ids(fast, second)
    last_image_token = len(ids) - 1 - ids[::-1].index(fast.engine.image_token_id)
    assert 0 < r.usage.cached_tokens <= last_image_token  # the cached blocks end inside the image
    assert calls == [] and r.raw_text == expected


def test_prefix_cache_never_shares_between_different_images(fast):
    red, blue = image((250, 0, 0)), image((0, 0, 250))
    q_blue = request(fast, "describe this image", [blue])
    expected = alone(fast, q_blue)
    fast.batcher.cache.clear()
    collect(fast.generate(request(fast, "describe this image", [red])))  # same text, same size, other pixels
    calls, handle = count_vision_calls(fast)
    try:
        r = collect(fast.generate(q_blue))
    finally:
        handle.remove()
    assert r.raw_text == expected and calls == [1]
    ids = prompt_ids(fast, q_blue)
    assert r.usage.cached_tokens <= ids.index(fast.engine.image_token_id)  # at most the text before the image


def test_prefix_cache_evicts_least_recently_used_under_its_budget(fast):
    cache = fast.batcher.cache
    budget = cache.budget_bytes
    cache.clear()
    cache.budget_bytes = 3 * cache.block_bytes
    evicted = cache.stats.evicted_blocks
    try:
        reqs = [request(fast, "describe this image", [image((c, 90, 90))]) for c in (10, 60, 110)]
        outs = [collect(fast.generate(r)).raw_text for r in reqs]
        assert cache.cached_blocks <= 3 and cache.stats.evicted_blocks > evicted
        assert collect(fast.generate(reqs[0])).raw_text == outs[0]  # evicted: recomputed, same answer
    finally:
        cache.budget_bytes = budget
        cache.clear()


def test_speculation_gives_the_same_greedy_output_in_fewer_passes(fast):
    page = "<html><body><h1>Orders</h1><ul>" + "".join(f"<li>item {i}: {i * 7} units</li>" for i in range(30)) + "</ul>"
    reqs = [request(fast, f"Change the title of this page to Sales.\n{page}", max_new_tokens=120, repetition_penalty=1.0),
            request(fast, "describe this image", [image((90, 160, 30))], max_new_tokens=80)]
    for r in reqs:
        plain = alone(fast, r)
        r.speculate = True
        fast.batcher.cache.clear()
        res = collect(fast.generate(r))
        assert res.raw_text == plain
        u = res.usage
        assert u.speculative_steps > 0 and u.accepted_prediction_tokens > 0
        assert u.accepted_prediction_tokens + u.rejected_prediction_tokens >= u.speculative_steps
    assert fast.serving_stats()["spec_tokens_per_step"] > 1.0


def test_the_inference_thread_runs_with_a_short_gil_switch_interval(fast):
    """The inference thread lets go of the GIL at every device call; with Python's default 5 ms switch interval
    a thread busy in Python (detokenizing, parsing a request with an image, client threads) could keep it
    waiting up to 5 ms each time. (A timing test of the effect was too noisy on a shared 2-core machine: from
    2x to 75x slower per token at 5 ms; scripts/host_overhead.py --busy shows it.)"""
    import sys

    from glmv.backends.scheduler import SWITCH_INTERVAL_S

    assert fast.scheduler._thread is not None and fast.scheduler._thread.is_alive()
    assert sys.getswitchinterval() == SWITCH_INTERVAL_S <= 0.001


def test_the_switch_interval_is_restored_when_the_last_inference_thread_stops():
    import sys

    from glmv.backends.scheduler import SWITCH_INTERVAL_S, _SwitchInterval

    before = sys.getswitchinterval()
    guard = _SwitchInterval()
    try:
        sys.setswitchinterval(0.004)
        with guard:
            with guard:  # two backends' inference threads
                assert sys.getswitchinterval() == SWITCH_INTERVAL_S
            assert sys.getswitchinterval() == SWITCH_INTERVAL_S  # one still runs
        assert sys.getswitchinterval() == 0.004
    finally:
        sys.setswitchinterval(before)


def test_speculation_pauses_while_more_requests_decode(fast):
    """Driven through the engine's batcher directly: a speculating request alone verifies drafts; with more
    than SPEC_MAX_ROWS requests decoding, none are verified (each verification is a pass the others wait for)."""
    from glmv.engine.scheduler import SPEC_MAX_ROWS, Batcher, RowParams, Sequence

    page = "<html><body><h1>Orders</h1><ul>" + "".join(f"<li>item {i}: {i * 7} units</li>" for i in range(30)) + "</ul>"
    inputs, _ = fast.prepare(request(fast, f"Change the title of this page to Sales.\n{page}"))

    def run(n: int) -> tuple[int, int]:
        batcher = Batcher(fast.engine)
        for _ in range(n):
            batcher.add(Sequence(inputs=dict(inputs), params=RowParams(max_new_tokens=60, repetition_penalty=1.0),
                                 emit=lambda ids: None, finish=lambda info: None, cancelled=lambda: False,
                                 eos=frozenset(), speculate=True))
        crowded_verifications = 0
        while batcher.busy:
            before, crowded = batcher.spec_steps, len(batcher.running) > SPEC_MAX_ROWS
            batcher.step()
            crowded_verifications += (batcher.spec_steps - before) if crowded else 0
        return batcher.spec_steps, crowded_verifications

    chunk = fast.engine.config.prefill_chunk
    fast.engine.config.prefill_chunk = 4096  # each prompt in one step: the requests decode side by side at once
    try:
        alone, _ = run(1)
        _, crowded = run(SPEC_MAX_ROWS + 1)
    finally:
        fast.engine.config.prefill_chunk = chunk
    assert alone > 0 and crowded == 0


def test_speculation_with_sampling_and_a_seed_is_reproducible(fast):
    r = request(fast, "describe this image", [image((5, 5, 5))], max_new_tokens=60, temperature=0.9, top_k=0,
                top_p=1.0, seed=3, speculate=True)
    a, b = collect(fast.generate(r)), collect(fast.generate(r))
    assert a.raw_text == b.raw_text and a.usage.completion_tokens > 0


def test_speculation_is_on_by_default_for_edits(fast):
    page = "<html>" + "<p>x</p>" * 80 + "</html>"
    assert fast._speculate(GenerationRequest([user_message(f"make it blue\n{page}")]))
    assert not fast._speculate(GenerationRequest([user_message("describe this image")]))
    ocr_rerun = [user_message("read the text"), Message("assistant", ["Hello"]), user_message("again, carefully")]
    assert fast._speculate(GenerationRequest(ocr_rerun))


def test_server_reports_cached_tokens_and_cache_metrics(fast):
    import base64
    import io

    import httpx
    import openai

    from test_server import serve_in_thread

    buf = io.BytesIO()
    Image.new("RGB", (336, 196), (70, 140, 210)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    fast.batcher.cache.clear()
    with serve_in_thread(fast) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                              {"type": "text", "text": "describe this image"}]}]
        r1 = client.chat.completions.create(model="tiny", messages=first, max_tokens=8, temperature=0)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        follow = [*first, {"role": "assistant", "content": r1.choices[0].message.content},
                  {"role": "user", "content": "what is the title?"}]
        r2 = client.chat.completions.create(model="tiny", messages=follow, max_tokens=8, temperature=0)
        cached = r2.usage.prompt_tokens_details.cached_tokens
        assert 64 <= cached < r2.usage.prompt_tokens  # the image and the first question came from the cache
        stream = client.chat.completions.create(model="tiny", messages=follow, max_tokens=8, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        usage = [ev.usage for ev in stream if ev.usage][-1]
        assert usage.prompt_tokens_details.cached_tokens >= cached
        metrics = httpx.get(f"{url}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and line[0] != "#"}
    assert values["glmv_cached_prompt_tokens_total"] >= 2 * cached
    assert 0 < values["glmv_prefix_cache_hit_rate"] < 1 and values["glmv_prefix_cache_blocks"] > 0


def test_device_side_image_digest_tells_nearly_equal_pixels_apart():
    import torch

    from glmv.engine.prefix_cache import linear_digest

    x = torch.randn(300, 1176)
    y = x.clone()
    y[17, 3] = torch.nextafter(y[17, 3], torch.tensor(10.0))  # one pixel value, one ulp
    assert linear_digest(x) == linear_digest(x.clone())
    assert len({linear_digest(x), linear_digest(y), linear_digest(x.flip(0)), linear_digest(x[:299])}) == 4


def test_speculative_sampling_keeps_the_target_distribution():
    """The rejection rule: whatever the draft, the first token is distributed as plain sampling would draw it
    (temperature, top-k and repetition penalty applied), here over 1200 draws of a 6-token vocabulary."""
    import torch

    from glmv.engine.speculate import verify

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0], [0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    seen = torch.tensor([False, True, False, False, False, False])
    x = torch.where(seen, logits[0] / 1.3, logits[0])  # repetition penalty 1.3 on token 1
    vals, idx = (x / 0.7).topk(4)  # temperature 0.7, top-k 4
    target = torch.zeros(6)
    target[idx] = vals.softmax(-1)
    for draft in ([1], [4]):  # a likely draft and an impossible one (outside the top-k)
        counts = torch.zeros(6)
        for _ in range(1200):
            new, kept = verify(logits, draft, seen, False, 0.7, 4, 1.0, 1.3)
            counts[new[0]] += 1
            assert kept in (0, 1) and len(new) == kept + 1
        assert (counts / 1200 - target).abs().max() < 0.05, (draft, counts / 1200, target)  # 3.5 sigma


def test_bench_serve_runs_the_server_under_load(tmp_path):
    import json

    from conftest import REPO, glmv_in_process

    out = tmp_path / "serve.json"
    # --max-batch 2: the warm-up burst (one request per row) stays small; 4 requests at 8/s still share the batch
    p = glmv_in_process("bench", "--serve", "--model", "tiny", "--device", "cpu", "--rates", "8", "--requests", "4",
                        "--tokens", "4", "--max-batch", "2", "--image", str(REPO / "input" / "image_1.png"),
                        "--mix", "question:1,follow_up:1,edit:1", "--users", "2", "--rounds", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["idle_ttft_s"] > 0 and report["follow_up_cached_tokens"] > 500  # the screenshot came from the cache
    (rate,) = report["rates"]
    assert rate["requests"] == 4 and 0 < rate["p50_ttft_s"] <= rate["p99_ttft_s"] and rate["aggregate_tok_s"] > 0
    assert 0 < rate["prefix_hit_rate"] < 1
    assert "| 8.0 | 4 |" in p.stdout
    loop = report["closed_loop"]  # 2 users, one request each, arriving within --spread seconds
    assert loop["requests"] == 2 and loop["aggregate_tok_s"] > 0 and loop["p99_over_idle_ttft"] > 0


VERIFY_CHECK = r"""
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from glmv.tiny import ensure_tiny_checkpoint
from glmv.engine.fast import EngineConfig, FastEngine
from glmv.engine.kernels import Kernels
from glmv.engine.scheduler import Segment
torch.manual_seed(0)
model = AutoModelForImageTextToText.from_pretrained(ensure_tiny_checkpoint()).eval()
eng = FastEngine(model, EngineConfig(max_batch=3, max_seq_len=128, spec_tokens=4))
ids = torch.randint(0, 500, (1, 40))
inputs = {"input_ids": ids}
pos3, _ = eng.prompt_positions(inputs)
for row in (0, 2):
    eng.prefill(row, inputs, 0, pos3)
draft = [5, 77, 301]
ref = eng.extend([Segment(2, torch.nn.functional.embedding(torch.tensor([9] + draft), eng.embed),
                          (torch.arange(4) + 40).expand(3, -1), 40, "all")])[0]
k_ref = eng.k_cache[:, 2, :, :44].clone()
eng.k_cache[:, 2, :, 40:].zero_()
eng.kernels = Kernels(use_triton=True)  # the CUDA path's kernels, interpreted on the CPU
got = eng.verify_logits(2, [9] + draft, 40, 40)
err = ((got - ref).abs().max() / ref.abs().max()).item()
kerr = (eng.k_cache[:, 2, :, :44] - k_ref).abs().max().item()
other = eng.k_cache[:, 0, :, :44].abs().sum().item() > 0 and eng.k_cache[:, 1].abs().sum().item() == 0
print("VERIFY", err, kerr, other, got.shape)
"""


def test_cuda_verification_path_matches_the_multi_token_forward():
    """On CUDA a draft is verified by the decode step's kernels, its positions as virtual rows sharing one
    cache row (stride 0); here those Triton kernels run in Triton's interpreter on the CPU, against
    :meth:`FastEngine.extend`: same logits, same keys written, other rows untouched."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", VERIFY_CHECK], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    err, kerr, others_ok, _ = p.stdout.split("VERIFY", 1)[1].split(None, 3)
    assert float(err) < 1e-5 and float(kerr) < 1e-5 and others_ok == "True"


def test_processed_images_are_reused_and_identical_to_the_processor(fast):
    import torch

    from glmv.prompts import to_template_messages

    a, b = image((1, 2, 3), (300, 200)), image((200, 100, 0), (448, 280))
    req = GenerationRequest([user_message("compare", [a, b]), Message("assistant", ["ok"]),
                             user_message("and this one?", [a])])
    got, prompt = fast.prepare(req)
    again, _ = fast.prepare(req)
    _, images = to_template_messages(req.messages)
    ref = dict(fast.processor(text=[prompt], images=images, return_tensors="pt"))
    ref.pop("token_type_ids", None)
    assert sorted(got) == sorted(ref) == sorted(again)
    assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype and torch.equal(again[k], ref[k]) for k in ref)
    assert ref["image_grid_thw"].shape[0] == 3  # the first image twice, the second between


def test_chunked_prefill_matches_the_model_forward_for_an_image_and_a_video(fast, tmp_path):
    """The engine's own multi-token forward (vision features placed by token type, multimodal rope, chunks
    attending to earlier chunks) against the model's own forward, on a prompt holding an image and a video."""
    import torch

    from glmv.documents import load_video
    from test_documents import make_video

    clip = load_video(make_video(tmp_path / "clip.mp4", seconds=1.0), max_pixels=20_000)
    for media in ([image((200, 40, 40), (112, 84)), clip], [clip, image((200, 40, 40), (112, 84))]):
        inputs, _ = fast.prepare(GenerationRequest([user_message("what changes?", media)]))
        eng = fast.engine
        whole = eng.prefill_whole(0, inputs)
        k_whole = eng.k_cache[:, 0, :, : inputs["input_ids"].shape[1]].clone()
        pos3, _ = eng.prompt_positions(inputs)
        chunk = eng.config.prefill_chunk
        eng.config.prefill_chunk = 4  # passes of 4 * ALONE_CHUNKS = 16 tokens
        try:
            chunked = eng.prefill(1, inputs, 0, pos3)
        finally:
            eng.config.prefill_chunk = chunk
        k_chunked = eng.k_cache[:, 1, :, : inputs["input_ids"].shape[1]]
        assert inputs["input_ids"].shape[1] > 3 * 16
        assert torch.allclose(whole, chunked, atol=1e-4) and torch.allclose(k_whole, k_chunked, atol=1e-4)


def test_host_overhead_script_times_decode_steps(capsys):
    """scripts/host_overhead.py through the real scheduler, in-process and through the HTTP server."""
    import importlib.util
    import json

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("host_overhead", REPO / "scripts" / "host_overhead.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--rows", "2", "--tokens", "16", "--server", "--clients-in-server", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    modes = [r["mode"] for r in report["results"]]
    assert modes == ["in-process", "server (clients in-process)"]
    for r in report["results"]:
        assert r["rows"] == 2 and r["steps"] >= 3, r
        assert 0 < r["forward_ms"] <= r["period_ms"] and r["host_ms"] >= 0
        assert r["cpu_ms_per_token"]["inference"] > 0 and r["cpu_ms_per_token"]["consumer"] > 0
    assert report["results"][1]["cpu_ms_per_token"]["event loop"] > 0
