"""The prefix cache: keys/values of prompts already computed, reused by later requests that start the same way.

A prompt is cut into blocks of ``block`` tokens. Each block's key hashes the previous block's key, the
block's token ids and the content of every image (or video) whose placeholder tokens fall inside it, so a
key stands for the whole prefix up to the end of its block: two different images behind the same text never
share an entry, and a block is only ever reused after the exact same prefix (multimodal rope positions
included, since they depend only on what comes before). Blocks live in memory on the engine's device, at
most ``budget_bytes`` of them, the least recently used going first.

A follow-up question on the same screenshot shares the chat template, the image and the first question
with the earlier turn: those blocks are copied into the new request's cache row and neither the vision
tower nor those tokens run again.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one block
    prompt_tokens: int = 0  # tokens of the prompts looked up
    cached_tokens: int = 0  # of those, tokens served from the cache
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens that came from the cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


_HASH_WEIGHTS: dict[str, torch.Tensor] = {}
FEATURE_BYTES = 256 * 2**20  # at most this much of the budget holds vision features (a screenshot's: ~10 MB)


def _hash_weights(n: int, device: torch.device) -> torch.Tensor:
    """Two rows of secret random 64-bit multipliers, at least ``n`` long, kept per device."""
    w = _HASH_WEIGHTS.get(str(device))
    if w is None or w.shape[1] < n:
        gen = torch.Generator(device).manual_seed(secrets.randbits(63))  # drawn where they are used: fast on a GPU
        w = torch.randint(-(2**62), 2**62, (2, max(n, 1 << 20)), dtype=torch.int64, generator=gen, device=device)
        _HASH_WEIGHTS[str(device)] = w
    return w


def tensor_digest(t: torch.Tensor) -> bytes:
    """A 128-bit digest of a tensor's bytes, computed where the tensor lives (on the GPU: well under a
    millisecond for a screenshot's 22 MB of pixels, where hashlib takes tens): two dot products, wrapping
    modulo 2**64, with random multipliers drawn per process (so nobody can build a colliding image). On the
    CPU, where hashlib is faster, SHA-1."""
    meta = repr((tuple(t.shape), str(t.dtype))).encode()
    if t.device.type == "cpu":
        return hashlib.sha1(meta + t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).digest()
    return linear_digest(t, meta)


def linear_digest(t: torch.Tensor, meta: bytes = b"") -> bytes:
    """The device-side digest of :func:`tensor_digest` (runs on any device)."""
    raw = t.detach().contiguous().view(-1).view(torch.uint8)
    raw = torch.nn.functional.pad(raw, (0, (-raw.numel()) % 4))
    x = raw.view(torch.int32).to(torch.int64)
    w = _hash_weights(x.numel(), x.device)
    sums = torch.stack([(x * w[i, : x.numel()]).sum() for i in range(2)])
    h = hashlib.blake2b(meta, digest_size=16)
    h.update(sums.cpu().numpy().tobytes())
    return h.digest()


def media_digests(inputs: dict[str, Any]) -> list[bytes]:
    """One digest per image (then per video) of a processed prompt: pixels and grid, in prompt order."""
    out: list[bytes] = []
    for pix_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        pixels, grids = inputs.get(pix_key), inputs.get(grid_key)
        if pixels is None or grids is None:
            continue
        start = 0
        for grid in grids.tolist():
            n = grid[0] * grid[1] * grid[2]  # patches of this image
            out.append(hashlib.blake2b(repr(grid).encode() + tensor_digest(pixels[start : start + n]),
                                       digest_size=16).digest())
            start += n
    return out


def media_spans(ids: list[int], media_token: int | None) -> list[tuple[int, int]]:
    """(start, end) of each run of media placeholder tokens, in order."""
    spans: list[tuple[int, int]] = []
    i = 0
    while media_token is not None and i < len(ids):
        if ids[i] == media_token:
            j = i
            while j < len(ids) and ids[j] == media_token:
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return spans


class PrefixCache:
    def __init__(self, block: int, budget_bytes: int, bytes_per_token: int) -> None:
        self.block = block
        self.budget_bytes = budget_bytes
        self.block_bytes = block * bytes_per_token
        self._blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.stats = PrefixStats()
        # the vision tower's output per image (by content digest): a follow-up whose cached blocks end inside
        # the image (blocks are whole; the answer that follows differs) takes the image's features from here
        self._features: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self._feature_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes >= self.block_bytes

    @property
    def cached_blocks(self) -> int:
        return len(self._blocks)

    @property
    def used_bytes(self) -> int:
        return len(self._blocks) * self.block_bytes

    def keys(self, ids: list[int], spans: list[tuple[int, int]], digests: list[bytes]) -> list[bytes]:
        """Keys of the full blocks of ``ids``; ``spans[i]`` holds the tokens of the media ``digests[i]``
        (a video's frames are several runs: all of them get the video's digest)."""
        keys, prev = [], b""
        if len(digests) != len(spans):  # videos: runs per frame; salt every block with all media instead
            spans, digests = [(0, len(ids))], [b"".join(digests)]
        for b in range(len(ids) // self.block):
            s, e = b * self.block, (b + 1) * self.block
            h = hashlib.blake2b(prev, digest_size=16)
            h.update(torch.tensor(ids[s:e], dtype=torch.int64).numpy().tobytes())
            for (ms, me), d in zip(spans, digests):
                if ms < e and me > s:
                    h.update(d)
            prev = h.digest()
            keys.append(prev)
        return keys

    def match(self, keys: list[bytes], limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cached blocks of the longest cached prefix of ``keys``, at most ``limit`` tokens long."""
        found = []
        for key in keys[: limit // self.block]:
            kv = self._blocks.get(key)
            if kv is None:
                break
            self._blocks.move_to_end(key)
            found.append(kv)
        return found

    def record(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.stats.lookups += 1
        self.stats.hits += cached_tokens > 0
        self.stats.prompt_tokens += prompt_tokens
        self.stats.cached_tokens += cached_tokens

    def insert(self, keys: list[bytes], k_row: torch.Tensor, v_row: torch.Tensor) -> int:
        """Store the blocks of ``keys`` not cached yet, copied from a cache row (``k_row[layer, head, pos, dim]``).
        Returns how many were added."""
        if not self.enabled:
            return 0
        added = 0
        for b, key in enumerate(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            while self._blocks and self.used_bytes + self.block_bytes > self.budget_bytes:
                self._blocks.popitem(last=False)
                self.stats.evicted_blocks += 1
            s, e = b * self.block, (b + 1) * self.block
            self._blocks[key] = (k_row[:, :, s:e].clone(), v_row[:, :, s:e].clone())
            added += 1
        return added

    @property
    def feature_budget(self) -> int:
        return min(FEATURE_BYTES, self.budget_bytes // 8)

    def features(self, key: Any) -> torch.Tensor | None:
        """Vision features stored under ``key`` (the media's kind and content digests), or None."""
        t = self._features.get(key)
        if t is not None:
            self._features.move_to_end(key)
        return t

    def keep_features(self, key: Any, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if not self.enabled or size > self.feature_budget or key in self._features:
            return
        while self._features and self._feature_bytes + size > self.feature_budget:
            _, old = self._features.popitem(last=False)
            self._feature_bytes -= old.numel() * old.element_size()
        self._features[key] = feats
        self._feature_bytes += size

    def clear(self) -> None:
        self._blocks.clear()
        self._features.clear()
        self._feature_bytes = 0
