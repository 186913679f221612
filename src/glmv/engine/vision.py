"""The vision tower's transformer blocks as one CUDA graph per image size.

Run eagerly, the 24 blocks of GLM-4.6V's vision tower issue about a thousand small kernel launches for a
screenshot, and the host cannot queue them as fast as the GPU runs them. Their shapes depend only on the
image's patch grid, so :class:`GraphedVision` captures them once per grid (a few grids kept, least recently
used going first) and replays the graph: the GPU then runs the blocks back to back. The rest of the tower
(patch embedding, position interpolation, the merger) still runs through transformers' own code, which keeps
this independent of how that code computes positions.

The captured blocks compute what ``Glm4vVisionBlock.forward`` does with sdpa attention (the same modules, the
same rotary helper), except that the per-image attention split uses lengths read once on the host before
capture, where transformers reads them from the device inside every block (a host synchronisation a graph
cannot hold). Used by :class:`glmv.engine.fast.FastEngine` on CUDA with graphs on and sdpa attention.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

MAX_GRAPHS = 4  # image sizes kept captured at once


def supported(visual: Any) -> bool:
    """Whether the blocks of this vision tower can be graphed (GLM-4.xV blocks with sdpa attention)."""
    blocks = getattr(visual, "blocks", None)
    if not blocks:
        return False
    attn = getattr(blocks[0], "attn", None)
    impl = getattr(getattr(visual, "config", None), "_attn_implementation", None)
    return (impl == "sdpa" and attn is not None
            and all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "scaling"))
            and all(hasattr(blocks[0], a) for a in ("norm1", "norm2", "mlp")))


class _Runner(torch.nn.Module):
    """Stands in for the block list during one call of the tower: the tower's loop calls it once."""

    def __init__(self, run: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self._run = run

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        return self._run(hidden_states, cu_seqlens, position_embeddings)


class GraphedVision:
    def __init__(self, visual: Any, get_pool: Callable[[], Any], set_pool: Callable[[Any], None]) -> None:
        from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb_vision

        self.visual = visual
        self.blocks = list(visual.blocks)
        self._rotary = apply_rotary_pos_emb_vision
        self._get_pool, self._set_pool = get_pool, set_pool
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.failed = False  # a capture failed once: run eagerly from then on

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within this block, the tower's forward runs its blocks through the graphs."""
        if self.failed:
            yield
            return
        mods = self.visual._modules
        saved = mods["blocks"]
        mods["blocks"] = torch.nn.ModuleList([_Runner(self._run)])
        try:
            yield
        finally:
            mods["blocks"] = saved

    # -- the blocks, as transformers computes them (sdpa), with host-side split lengths -------------
    def _attention(self, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   lengths: list[int]) -> torch.Tensor:
        s = x.shape[0]
        q, k, v = attn.qkv(x).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self._rotary(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if len(lengths) == 1:
            o = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        else:
            parts = [F.scaled_dot_product_attention(a, b, c, scale=attn.scaling)
                     for a, b, c in zip(*(torch.split(t, lengths, dim=2) for t in (q, k, v)))]
            o = torch.cat(parts, dim=2)
        return attn.proj(o.transpose(1, 2).reshape(s, -1))

    def _eager(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        for blk in self.blocks:
            h = h + self._attention(blk.attn, blk.norm1(h), cos, sin, lengths)
            h = h + blk.mlp(blk.norm2(h))
        return h

    def _run(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor | None,
             pos: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if pos is None:
            raise ValueError("the vision blocks were called without position embeddings")
        cos, sin = pos
        n = hidden.shape[0]
        lengths = [n] if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        key = (n, tuple(lengths), hidden.dtype, cos.dtype)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key, hidden, cos, sin, lengths)
            except Exception:  # e.g. out of memory while capturing: the eager blocks compute the same
                self.failed = True
                return self._eager(hidden, cos, sin, lengths)
        self.graphs.move_to_end(key)
        graph, h_in, cos_in, sin_in, out = entry
        h_in.copy_(hidden)
        cos_in.copy_(cos)
        sin_in.copy_(sin)
        graph.replay()
        return out.clone()  # the next replay (or another graph in the pool) reuses this memory

    def _capture(self, key: tuple, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 lengths: list[int]) -> tuple:
        while len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        h_in, cos_in, sin_in = hidden.clone(), cos.clone(), sin.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._eager(h_in, cos_in, sin_in, lengths)  # warm-up: kernel selection happens outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._get_pool()):
            out = self._eager(h_in, cos_in, sin_in, lengths)
        self._set_pool(graph.pool())
        entry = (graph, h_in, cos_in, sin_in, out)
        self.graphs[key] = entry
        return entry
