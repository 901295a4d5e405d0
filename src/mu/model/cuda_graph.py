"""CUDA graphs of the fixed-shape decode step: what `generate(compile=True)` and `generate(cuda_graph=True)` replay
on a GPU.

At batch 1 a GPU decode step is bound by kernel launches, not by the GPU: the 330m encoder-decoder's eager bf16
step took 8.6 ms on an H200 that reads its 260 MiB of decoder and head weights in ~0.1 ms (docs/efficiency.md,
"On one GPU"). A static cache (`KVCache.static`) gives every step the same shapes and the same buffers (the K/V
written at a slot held in a tensor, the mask read from `valid`, RoPE's row picked by `positions`), so one step
can be recorded as a CUDA graph and every later step replayed with one launch: only the token ids and the slot
are copied in first. The step recorded is the compiled one under compile=True (`compile_decode_`: inductor's fused
kernels; 1083 tokens/s to eager's 200 in `generate` there), else the eager one (760 tokens/s, no compile to wait
for).

A graph belongs to one cache (it holds that cache's buffer addresses) and lives as long as it does: a cache whose
rows are reordered (beam search) gets none, and RoPE scaled by the length (NTK) keeps the eager static step.
The logits a replay returns are a copy (the graph's own output is overwritten by the next replay).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


class DecodeGraph:
    """One static decode step of `model` over `cache`, recorded as a CUDA graph; `replay` runs the next step."""

    def __init__(self, model, tokens: Tensor, cache):
        self.tokens = tokens.clone()  # the graph's inputs: the step's token ids and the cache slot it writes
        self.slot = torch.full((1,), cache.length, dtype=torch.long, device=tokens.device)
        self.graph = torch.cuda.CUDAGraph()
        self.logits: Tensor | None = None
        self.model = model

    def run(self, cache) -> Tensor:
        """This step, run as usual but on a side stream: the warm-up that recording needs. Returns its logits."""
        cache.slot = self.slot
        with torch.cuda.device(self.slot.device):  # (the model's GPU, whichever is current)
            main, side = torch.cuda.current_stream(), torch.cuda.Stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                logits = self.model._static_body(self.tokens, cache, cache.max_len)
            main.wait_stream(side)
        return logits

    def record(self, cache) -> None:
        """Record the step (nothing runs: the cache is left as `run` left it)."""
        with torch.cuda.device(self.slot.device), torch.cuda.graph(self.graph):
            self.logits = self.model._static_body(self.tokens, cache, cache.max_len)

    def replay(self, tokens: Tensor, cache) -> Tensor:
        self.tokens.copy_(tokens)
        self.slot.fill_(cache.length)
        self.graph.replay()
        return self.logits.clone()


def graph_step(model, tokens: Tensor, cache) -> Tensor:
    """A static step through `cache.graph`, which the first such step records (that step runs as usual). If
    recording fails, a warning says why and the cache's later steps run without a graph."""
    graph = cache.graph
    if graph is not None:
        return graph.replay(tokens, cache)
    graph = DecodeGraph(model, tokens, cache)
    logits = graph.run(cache)
    try:
        graph.record(cache)
    except RuntimeError as e:
        warnings.warn(f"generate: recording the decode step as a CUDA graph failed ({e}); "
                      "the remaining steps run without one", RuntimeWarning, stacklevel=2)
        cache.graph = False
        return logits
    cache.graph = graph
    return logits
