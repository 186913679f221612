"""Prompt-lookup speculative decoding: drafts copied from the context, verified in one forward pass.

An HTML edit, a refine round or an OCR re-run mostly repeats text that is already in the prompt. When the
last few generated tokens (an n-gram) occurred earlier in the prompt or the answer, the tokens that followed
that occurrence are a cheap guess for what comes next. The engine runs the pending token and the guess
through the model at once (:meth:`FastEngine.extend`) and keeps the longest part the model agrees with, plus
one token of its own, so every verification yields at least one token and usually several.

Verification is exact. Greedy: a drafted token is kept only if it is the argmax at its position, so the
output is the same as plain decoding. Sampling: the draft is a point mass, so the standard rejection rule
(accept draft ``d`` with probability ``p(d)``; on rejection sample from ``p`` with ``d`` removed) draws
every token from exactly the distribution plain sampling would, with the same temperature, top-k, top-p
and repetition penalty.
"""

from __future__ import annotations

import torch

from .fast import TOPK_CAP


class NgramIndex:
    """Where each n-gram of a token sequence last occurred, updated as tokens are appended."""

    def __init__(self, ids: list[int], max_n: int = 3, min_n: int = 2) -> None:
        self.ids: list[int] = []
        self.max_n, self.min_n = max_n, min_n
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it
        self.extend(ids)

    def extend(self, ids: list[int]) -> None:
        for t in ids:
            end = len(self.ids)  # the n-grams ending just before the new token now have a continuation
            for n in range(self.min_n, self.max_n + 1):
                if end >= n:
                    self._last[tuple(self.ids[end - n : end])] = end
            self.ids.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest earlier occurrence of the current suffix."""
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(self.ids) < n:
                continue
            at = self._last.get(tuple(self.ids[-n:]))
            if at is not None:
                return self.ids[at : at + k]
        return []


def _penalized(logits: torch.Tensor, seen: torch.Tensor, rep: float) -> torch.Tensor:
    return torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)


def verify(logits: torch.Tensor, draft: list[int], seen: torch.Tensor, greedy: bool, temperature: float,
           top_k: int, top_p: float, rep: float) -> tuple[list[int], int]:
    """Accept a prefix of ``draft`` given the model's logits at the pending token and at each drafted token
    ([len(draft) + 1, vocab]); ``seen`` is the row's repetition-penalty history before the draft.
    Returns the new tokens (accepted drafts, then one token from the model) and how many drafts were kept."""
    n = len(draft)
    hist = seen[None].repeat(n + 1, 1)
    for t, d in enumerate(draft):  # position t+1 has seen drafts 0..t
        hist[t + 1 :, d] = True
    x = _penalized(logits.float(), hist, rep)
    if greedy:
        best = x.argmax(-1).tolist()
        j = 0
        while j < n and best[j] == draft[j]:
            j += 1
        return draft[:j] + [best[j]], j
    vals, idx = x.topk(min(TOPK_CAP, x.shape[-1]), dim=-1)
    vals = vals / max(temperature, 1e-5)
    ar = torch.arange(vals.shape[-1], device=vals.device)
    kk = top_k if top_k > 0 else vals.shape[-1]
    vals = torch.where(ar[None, :] < kk, vals, float("-inf"))
    probs = vals.softmax(-1)
    before = probs.cumsum(-1) - probs
    probs = torch.where(before < top_p, probs, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    for t, d in enumerate(draft):
        hit = (idx[t] == d).nonzero()
        p = float(probs[t, hit[0, 0]]) if hit.numel() else 0.0
        if torch.rand(()).item() < p:
            continue
        residual = probs[t].clone()
        if hit.numel():
            residual[hit[0, 0]] = 0.0
        pick = int(torch.multinomial(residual / residual.sum(), 1))
        return draft[:t] + [int(idx[t, pick])], t
    pick = int(torch.multinomial(probs[n], 1))
    return draft + [int(idx[n, pick])], n
