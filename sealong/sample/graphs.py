"""CUDA graphs of the sampler's decode step: one capture per shape bucket, replayed with new inputs.

A decode step launches a few kernels per layer for a handful of tokens, so on a GPU its time is mostly
launch overhead unless the whole step (decoder stack and lm_head) is replayed as one CUDA graph. A graph
fixes its tensors' shapes and addresses, so the step's inputs live in static buffers per bucket:

    slots S            fixed for the whole run (idle slots are padded by the sampler already)
    rows, prompts      sum N_b and B rounded up to powers of two: padded prompts have no rows and an empty
                       prefix (cu_q, cu_prefix repeat their last value), padded rows point at the zero row S
    max rows           max N_b (the prefix kernel's row tiles)
    max prefix         the longest active prompt rounded up to a power of two (the kernel's key splits;
                       each program still stops at its own prompt's end, so a larger bound is only slower)
    span               suffix keys read: the longest sample rounded up to whole SUFFIX_CHUNKs (masked per slot)
    prefix pool        its storage address: a pool that grows drops every graph

The first step of a bucket runs eagerly twice (Triton compiles and caches its kernels; the step writes the
same suffix keys and values again, so repeating it is harmless), is captured, and replayed; later steps
of the bucket copy their inputs into the buffers and replay. All graphs share one memory pool; the logits
are cloned out before the next replay. CUDA only; `SamplingParams.cuda_graphs` turns it on.
"""

from dataclasses import dataclass, replace

import torch

from .kv_cache import SUFFIX_CHUNK, DecodeBatch, decode_step


def bucket(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least)."""
    n = max(n, least)
    return 1 << (n - 1).bit_length()


def padded(t: torch.Tensor, size: int, value=None) -> torch.Tensor:
    """t [n] extended to [size] with `value` (default: its last element)."""
    if len(t) == size:
        return t
    fill = t[-1:] if value is None else torch.full((1,), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, fill.expand(size - len(t))])


def pad_batch(batch: DecodeBatch, prefix, max_len: int) -> tuple:
    """(bucket key, `batch` padded to its bucket) for a decode step over the prefix pool `prefix`; the padded
    batch gives the same result as `batch` (padded prompts and rows are empty or dropped, padded suffix keys
    masked). max_len: the suffix cache's length."""
    slots = len(batch.tokens)
    n_rows, n_prompts = bucket(len(batch.rows)), bucket(len(batch.cu_q) - 1)
    span = min(-(-batch.span // SUFFIX_CHUNK) * SUFFIX_CHUNK, max_len)
    max_prefix = bucket(max(prefix.lengths), 16)
    key = (n_rows, n_prompts, batch.max_rows, max_prefix, span)
    return key, replace(batch, rows=padded(batch.rows, n_rows, slots), cu_q=padded(batch.cu_q, n_prompts + 1),
                        cu_prefix=padded(prefix.cu_prefix, n_prompts + 1), span=span, max_prefix=max_prefix)


@dataclass
class _Graph:
    graph: object
    inputs: DecodeBatch  # static buffers the graph reads
    logits: torch.Tensor  # static output


class DecodeGraphs:
    """Replays the decode step (+ lm_head) of one sampling run from CUDA graphs, one per shape bucket."""

    def __init__(self, model, suffix, prefix_attn, stats: dict):
        self.model, self.suffix, self.prefix_attn = model, suffix, prefix_attn
        self.graphs, self.pool_ptr = {}, None
        self.mempool = torch.cuda.graph_pool_handle()
        self.stats = stats  # counts "graph_captures" and "graph_replays"
        for k in ("graph_captures", "graph_replays"):
            stats.setdefault(k, 0)

    def __call__(self, batch: DecodeBatch, prefix) -> torch.Tensor:
        """logits [S, V] of the decode step (writes the suffix cache like decode_step)."""
        if prefix.k[0].data_ptr() != self.pool_ptr:  # the pool grew: its old storage is gone
            self.graphs, self.pool_ptr = {}, prefix.k[0].data_ptr()
        key, inputs = pad_batch(batch, prefix, self.suffix.k[0].shape[1])
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(inputs, prefix)
        else:
            for name in ("tokens", "positions", "write", "rows", "cu_q", "cu_prefix"):
                getattr(g.inputs, name).copy_(getattr(inputs, name))
        g.graph.replay()
        self.stats["graph_replays"] += 1
        return g.logits.clone()

    def _capture(self, inputs: DecodeBatch, prefix) -> _Graph:
        step = lambda: self.model.lm_head(decode_step(self.model, inputs, prefix, self.suffix, self.prefix_attn))  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            logits = step()
        self.stats["graph_captures"] += 1
        return _Graph(graph, inputs, logits)
