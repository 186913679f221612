"""GLM-4.6V (106B MoE) spread over every visible GPU: full-size architecture, random weights.

    PYTHONPATH=src python scripts/moe_multi_gpu.py [--tokens 16]

The real checkpoint (about 216 GB in bf16) cannot be downloaded here, and writing a random one to disk
would need as much disk again, so the model is built on the meta device, given a device map by
accelerate (what ``device_map="auto"`` does when loading), filled with random bf16 weights in place on
each GPU, and dispatched. The text and vision configs are transformers' ``Glm4vMoeConfig`` defaults,
which mirror GLM-4.5V/4.6V (46 layers, hidden 4096, 128 routed experts of 1408, 8 per token, one
shared expert). Then a real request (the 1288x728 screenshot) goes through glmv's own LocalBackend,
which routes the MoE model to transformers' generate, and decode speed is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoProcessor, Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    from glmv.backends.base import GenerationRequest, collect
    from glmv.backends.local import LocalBackend
    from glmv.media import load_image
    from glmv.prompts import user_message
    from glmv.settings import Settings
    from glmv.tiny import ensure_tiny_checkpoint

    n_gpu = torch.cuda.device_count()
    processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint())
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>",
                                                     "<|begin_of_video|>", "<|end_of_video|>", "<|endoftext|>")}
    cfg = Glm4vMoeConfig(
        text_config={"pad_token_id": ids["<|endoftext|>"], "head_dim": 128},
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    cfg._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    with init_empty_weights():
        model = Glm4vMoeForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    free = [torch.cuda.mem_get_info(i)[0] for i in range(n_gpu)]
    max_memory = {i: int(f * 0.9) for i, f in enumerate(free)}
    device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=torch.bfloat16,
                                       no_split_module_classes=model._no_split_modules)

    def device_of(name: str):
        best = ""
        for prefix in device_map:
            if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) >= len(best):
                best = prefix
        return device_map[best]

    g = torch.Generator(device="cpu").manual_seed(0)
    for name, p in list(model.named_parameters()):
        dev = device_of(name)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            value = torch.ones(p.shape, dtype=torch.bfloat16, device=dev)
        else:
            value = torch.empty(p.shape, dtype=torch.bfloat16, device=dev).normal_(0, 0.02)
        set_module_tensor_to_device(model, name, dev, value=value)
    for name, b in list(model.named_buffers()):
        set_module_tensor_to_device(model, name, device_of(name), value=b.to(device_of(name)) if b.device.type != "meta" else None)
    model = dispatch_model(model, device_map=device_map)
    model.eval()
    build_s = time.perf_counter() - t0
    per_gpu = [torch.cuda.memory_allocated(i) / 1e9 for i in range(n_gpu)]
    print(f"built {n_params / 1e9:.1f}B params over {n_gpu} GPUs in {build_s:.0f}s; GB per GPU {[round(x, 1) for x in per_gpu]}")

    backend = LocalBackend.from_model(model, processor, Settings(model="glm-4.6v-random"))
    img = load_image(Path("input/image_3.png"))
    req = GenerationRequest([user_message("describe this image", [img])],
                            sampling=backend.default_sampling.merged(max_new_tokens=4, temperature=0))
    collect(backend.generate(req))  # warm-up
    req = GenerationRequest([user_message("describe this image", [img])],
                            sampling=backend.default_sampling.merged(max_new_tokens=args.tokens, temperature=0))
    r = collect(backend.generate(req))
    result = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(n_gpu)],
        "params_B": round(n_params / 1e9, 1), "GB_per_gpu": [round(x, 1) for x in per_gpu],
        "engine": "transformers generate (MoE)" if backend.engine is None else "fast",
        "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
        "ttft_s": round(r.timings.ttft_s, 3), "decode_tok_s": round(r.timings.tokens_per_s(r.usage.completion_tokens) or 0, 2),
        "devices_in_map": sorted({str(v) for v in device_map.values()}),
    }
    print(json.dumps(result))
    Path(args.out, "moe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
