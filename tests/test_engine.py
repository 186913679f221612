"""The fast engine's logic on the CPU (reference kernels), its Triton kernels under Triton's interpreter,
the int4 mode, and `glmv bench` on the tiny model. GPU speed is measured by `glmv bench` on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from conftest import REPO, glmv_in_process
from glmv.backends.base import GenerationRequest, collect
from glmv.backends.local import LocalBackend
from glmv.media import load_image
from glmv.prompts import user_message
from glmv.settings import Settings

pytestmark = pytest.mark.slow


def req(backend, i, **kw):
    img = [load_image(Image.new("RGB", (280 + 56 * i, 196), (i * 40, 100, 200)))] if i != 2 else []
    kw.setdefault("max_new_tokens", 24)
    kw.setdefault("temperature", 0)
    return GenerationRequest([user_message("describe this image" + " please" * i, img)],
                             sampling=backend.default_sampling.merged(**kw))


@pytest.fixture(scope="module")
def pair(tiny_path):
    hf = LocalBackend(Settings(model=str(tiny_path), engine="hf"), log=lambda m: None).load()
    fast = LocalBackend(Settings(model=str(tiny_path), engine="fast"), log=lambda m: None).load()
    yield hf, fast
    hf.close()
    fast.close()


def test_engine_is_used_and_matches_generate(pair):
    hf, fast = pair
    assert hf.engine is None and fast.engine is not None
    for i in range(4):  # images of several sizes (multimodal rope offsets) and a text-only prompt
        a = collect(hf.generate(req(hf, i)))
        b = collect(fast.generate(req(fast, i)))
        assert a.raw_text == b.raw_text
        assert a.usage.completion_tokens == b.usage.completion_tokens


def test_engine_batches_and_matches_single_runs(pair):
    _, fast = pair
    singles = [collect(fast.generate(req(fast, i))).raw_text for i in range(4)]
    blocker = fast.generate(req(fast, 0, max_new_tokens=3000))
    next(blocker)
    results = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, collect(fast.generate(req(fast, i))).raw_text))
               for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while fast.queue_depth < 5 and time.time() < deadline:
        time.sleep(0.01)
    for t in threads:  # continuous batching: they join the running blocker instead of waiting for it
        t.join(60)
    assert max(fast.batch_sizes) >= 5  # all four ran beside the blocker
    blocker.close()
    assert results == singles


def test_engine_sampling_is_seeded_and_respects_stops(pair):
    _, fast = pair
    a = collect(fast.generate(req(fast, 1, seed=5, temperature=0.9, top_k=0, top_p=1.0)))
    b = collect(fast.generate(req(fast, 1, seed=5, temperature=0.9, top_k=0, top_p=1.0)))
    c = collect(fast.generate(req(fast, 1, seed=6, temperature=0.9, top_k=0, top_p=1.0)))
    assert a.raw_text == b.raw_text and a.raw_text != c.raw_text
    full = collect(fast.generate(req(fast, 0, max_new_tokens=30)))
    words = full.output.answer.split()
    assert len(words) > 3
    cut = collect(fast.generate(req(fast, 0, max_new_tokens=30, stop=(words[2],))))
    assert cut.output.answer == full.raw_text.split(words[2])[0].strip() and cut.finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens  # generation ended at the stop string
    cancel = threading.Event()
    n = 0
    for chunk in fast.generate(req(fast, 0, max_new_tokens=5000), cancel):
        n += chunk.type == "answer"
        if n == 2:
            cancel.set()
        if chunk.type == "done":
            assert chunk.finish_reason == "cancelled" and chunk.usage.completion_tokens < 10


def test_engine_settings_come_through_its_config(monkeypatch):
    from glmv.engine.fast import EngineConfig

    monkeypatch.setenv("GLMV_TUNE", "0")
    assert Settings.from_env().tune is False and Settings.from_env(tune=True).tune is True
    assert EngineConfig().tune is True  # the engine itself reads no environment
    monkeypatch.setenv("GLMV_TUNE", "1")
    assert Settings.from_env().tune is True


def test_long_requests_fall_back_to_generate(tiny_path):
    fast = LocalBackend(Settings(model=str(tiny_path), engine="fast", max_seq_len=64, tune=False),
                        log=lambda m: None).load()
    try:
        assert fast.engine.config.tune is False  # Settings reach the engine's config
        r = collect(fast.generate(req(fast, 2, max_new_tokens=100)))  # prompt + answer > 64: transformers path
        assert r.usage.completion_tokens == 100
    finally:
        fast.close()


def test_w4_quantization_and_engine_parity(tiny_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from glmv.engine.w4 import W4Linear, dequantize_w4, pack_codes, quantize_text_decoder, quantize_w4, unpack_codes

    w = torch.randn(64, 256) * 0.02
    packed, scale, mn = quantize_w4(w)
    assert packed.shape == (64, 128) and packed.dtype == torch.uint8 and scale.shape == (64, 2)
    err = (dequantize_w4(packed, scale, mn, torch.float32) - w).norm() / w.norm()
    assert err < 0.12  # 16 levels per group of 128 gaussian weights
    codes = unpack_codes(packed)
    assert torch.equal(pack_codes(codes), packed) and int(codes.max()) == 15 and int(codes.min()) == 0
    # the layout the kernels read: nibble j of 32-bit word t (of group g) is column 128 g + 16 j + t
    word = int(packed.view(torch.int32)[5, 16 + 7])
    assert [(word >> (4 * j)) & 15 for j in range(8)] == [int(codes[5, 128 + 16 * j + 7]) for j in range(8)]

    processor = AutoProcessor.from_pretrained(tiny_path)
    backends = []
    for engine in ("hf", "fast"):
        model = AutoModelForImageTextToText.from_pretrained(tiny_path).eval()
        assert quantize_text_decoder(model, "cpu") == 2 * 6
        assert isinstance(model.model.language_model.layers[0].mlp.down_proj, W4Linear)
        backends.append(LocalBackend.from_model(model, processor, Settings(model="w4", engine=engine), log=lambda m: None))
    hf, fast = backends
    try:
        assert hf.engine is None and fast.engine is not None
        for i in (0, 2):
            assert collect(hf.generate(req(hf, i))).raw_text == collect(fast.generate(req(fast, i))).raw_text
    finally:
        hf.close()
        fast.close()


KERNEL_CHECK = r"""
import torch
from glmv.engine.kernels import (Kernels, add_rmsnorm2_ref, decode_attention_ref, rmsnorm_ref, rope_cache_ref,
                                 silu_mul_ref)
from glmv.engine.w4 import quantize_w4, dequantize_w4, w4_linear
torch.manual_seed(0)
K = Kernels(use_triton=True)
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
errs = {}
x = torch.randn(3, 256); w = torch.randn(256); a = torch.randn(3, 256); w2 = torch.randn(256)
errs["rmsnorm"] = rel(K.rmsnorm(x, w, 1e-5), rmsnorm_ref(x, w, 1e-5))
h1, y1 = K.add_rmsnorm2(x, a, w, w2, 1e-5); h2, y2 = add_rmsnorm2_ref(x, a, w, w2, 1e-5)
errs["add_rmsnorm2"] = max(rel(h1, h2), rel(y1, y2))
for H, KV, D, HALF in [(4, 2, 32, 8), (32, 2, 128, 32)]:
    B, S = 3, 64
    qkv = torch.randn(B, (H + 2 * KV) * D)
    kc1 = torch.zeros(B, KV, S, D); vc1 = torch.zeros_like(kc1); kc2 = kc1.clone(); vc2 = vc1.clone()
    pos = torch.tensor([5, 100, 7]); widx = torch.tensor([1, 2, 3], dtype=torch.int32)
    invf = 1.0 / (500000 ** (torch.arange(0, 2 * HALF, 2).float() / (2 * HALF)))
    q1 = K.rope_cache(qkv, kc1, vc1, pos, widx, invf, H, KV, D); q2 = rope_cache_ref(qkv, kc2, vc2, pos, widx, invf, H, KV, D)
    errs[f"rope_{H}"] = max(rel(q1, q2), rel(kc1, kc2), rel(vc1, vc2))
    gu = torch.randn(B, 600)
    errs[f"silu_{H}"] = rel(K.silu_mul(gu), silu_mul_ref(gu))
    kc = torch.randn(B, KV, S, D); vc = torch.randn(B, KV, S, D); q = torch.randn(B, H, D)
    lens = torch.tensor([1, 37, 64], dtype=torch.int32)
    for ns in (1, 4, 16):
        errs[f"attn_{H}_{ns}"] = rel(K.decode_attention(q, kc, vc, lens, D ** -0.5, n_splits=ns),
                                     decode_attention_ref(q, kc, vc, lens, D ** -0.5))
wq = torch.randn(40, 256) * 0.02
p, s, m = quantize_w4(wq); wd = dequantize_w4(p, s, m, torch.float32); xb = torch.randn(1, 256); bias = torch.randn(40)
errs["w4_gemv"] = rel(w4_linear(xb, p, s, m, bias), xb @ wd.T + bias)
x3 = torch.randn(3, 256)
errs["w4_gemm"] = rel(w4_linear(x3, p, s, m, bias), x3 @ wd.T + bias)
print("ERRS", __import__("json").dumps(errs))
"""


def test_triton_kernels_match_references_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    errs = json.loads(p.stdout.split("ERRS", 1)[1])
    bad = {k: v for k, v in errs.items() if not v < (1e-2 if k.startswith("w4_") else 1e-5)}
    assert not bad, bad


def test_bench_runs_on_the_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    p = glmv_in_process("bench", "--model", "tiny", "--device", "cpu", "--tokens", "6", "--batches", "1,2",
                        "--max-batch", "2", "--json", "--json-out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["configs"]) == {"tutorial-bf16", "tutorial-nf4", "glmv-bf16", "glmv-4bit"}
    for name in ("tutorial-bf16", "glmv-bf16", "glmv-4bit"):
        e = report["configs"][name]
        assert e["decode_tok_s_b1"] > 0 and e["aggregate_tok_s_b2"] > 0 and e["prefill_s"] > 0, e
    assert report["configs"]["tutorial-nf4"] == {"skipped": "needs CUDA", "peak_gpu_GB": None, "ratio_b1": None}
    assert report["prompt_tokens"] == 1207  # the real 1288x728 screenshot through the real processor (1196 visual tokens)
    assert json.loads(p.stdout) == report  # --json: one object on stdout, the same as --json-out's file


def test_bench_never_reports_a_negative_prompt_prefill():
    """Prefill and the vision tower are timed in separate passes: under load the tower alone can take longer
    than the whole prefill did. That difference is not measurable (None in JSON, "-" in the table)."""
    from glmv.bench import format_table, prompt_prefill_seconds

    assert prompt_prefill_seconds(0.010, 0.012) is None and prompt_prefill_seconds(0.010, None) is None
    assert prompt_prefill_seconds(0.020, 0.005) == pytest.approx(0.015) and prompt_prefill_seconds(0.01, 0.01) == 0
    report = {"gpu": "g", "torch": "t", "transformers": "x", "date": "d", "copy_bandwidth_GBps": 1.0,
              "text_weight_GB": 1.0, "batch1_limit_tok_s": 1.0, "prompt_tokens": 1, "processor_s": 0.003,
              "batches": [1], "configs": {
                  "old": {"ttft_with_processor_s": 0.05, "processor_s": 0.003, "vision_s": 0.012,
                          "prompt_prefill_s": -0.002, "first_step_s": 0.004},  # a report written before the fix
                  "new": {"ttft_with_processor_s": 0.05, "processor_s": 0.003, "vision_s": 0.012,
                          "prompt_prefill_s": prompt_prefill_seconds(0.010, 0.012), "first_step_s": 0.004}}}
    table = format_table(report)
    assert "| old | 50.0 | 3.0 / 12.0 / - / 4.0 |" in table and "| new | 50.0 | 3.0 / 12.0 / - / 4.0 |" in table
    assert "-2.0" not in table


def test_cli_quant_needs_cuda_and_engine_flag(tiny_path):
    for flags in (["--quant", "w4"], ["--int4"]):
        p = glmv_in_process("ask", "-p", "hi", "--model", "tiny", *flags)
        assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr
    p = glmv_in_process("ask", "input/image_1.png", "--model", "tiny", "--engine", "fast", "--max-new-tokens", "5",
                        "--json")
    assert p.returncode == 0, p.stderr
    assert "fast engine ready" in p.stderr
    usage = json.loads(p.stdout)["usage"]
    assert usage["completion_tokens"] == 5 and usage["cached_tokens"] == 0  # a fresh backend: nothing cached yet


def test_fused_norms_patch_every_rmsnorm_and_leave_cpu_outputs_alone(tiny_path):
    pytest.importorskip("triton")
    from transformers import AutoModelForImageTextToText

    from glmv.engine.kernels import install_fused_norms

    model = AutoModelForImageTextToText.from_pretrained(tiny_path).eval()
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    x = torch.randn(3, norms[0].weight.shape[0])
    before = norms[0](x)
    changed = install_fused_norms(model)
    assert changed == len(norms) > 0
    assert install_fused_norms(model) == 0  # once only
    assert torch.equal(norms[0](x), before)  # fp32 CPU input: the original code path
