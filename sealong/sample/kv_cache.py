"""KV caches of the shared-prefix sampler, and the two forward passes that fill and read them.

    prefix pool    k, v [P_total, Hkv, D] per layer: each decoding prompt's tokens once (packed, cu_prefix)
    suffix cache   k, v [S, L, Hkv, D] per layer: each decode slot's own generated tokens (S slots, L = max new)

`prefill` runs the prompts through the model chunk by chunk (a chunk's queries see the cache so far and
themselves, causally) and returns the last token's hidden state. `decode_step` runs one token per slot:
attention of all samples against their prompt's prefix is one matrix product per (prompt, kv head)
(`sealong_kernels.prefix_decode_attention`), attention against each sample's suffix is a batched product,
and the two partial results are merged by log-sum-exp, which is exact. With the Triton kernels all of that
and the suffix cache write are one kernel per layer (`sealong_kernels.cascade_decode_attention`).
"""

from dataclasses import dataclass

import torch

from sealong_kernels import reference
from sealong_kernels.decode import cascade_compiles_clean, cascade_decode_attention, prefix_decode_attention


def uses_kernels(device, backend="auto") -> bool:
    """Triton kernels when asked, or by default on CUDA; the plain-torch reference otherwise."""
    return backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda")


def prefill_attention_fn(device, backend="auto"):
    """Causal attention of a chunk against the cache so far: (q, k, v, q_start, scale) -> out."""
    if uses_kernels(device, backend):
        from sealong_kernels import flash_attention

        def attend(q, k, v, q_start, scale):
            return flash_attention(q, k, v, causal=True, softmax_scale=scale, q_start=q_start, k_start=0,
                                   backend="triton" if backend == "triton" else "auto")[0]
    elif backend == "reference":

        def attend(q, k, v, q_start, scale):
            return reference.attention_forward(q, k, v, causal=True, softmax_scale=scale, q_start=q_start, k_start=0)[0]
    else:  # the CPU: fused SDPA, the chunk's queries being the last keys (causal_block_sdpa)
        from sealong.model.sdpa import causal_block_sdpa

        def attend(q, k, v, q_start, scale):
            return causal_block_sdpa(q, k, v, scale)

    return attend


def prefix_attention_fn(device, backend="auto"):
    """Decode queries against the prompts' prefixes: the Triton kernel on CUDA (or when asked), the reference when
    asked, else (the CPU) one matrix product per prompt and kv head (sealong.model.sdpa.prefix_decode_sdpa)."""
    if uses_kernels(device, backend):
        return prefix_decode_attention
    if backend == "auto":
        from sealong.model.sdpa import prefix_decode_sdpa

        return prefix_decode_sdpa
    return lambda q, k, v, cu_q, cu_p, scale, **kw: reference.prefix_decode_attention(q, k, v, cu_q, cu_p, scale)


SUFFIX_CHUNK = 256  # suffix keys per attention chunk (see suffix_attention)


def suffix_attention(q, k, v, lengths, span, scale, chunk=SUFFIX_CHUNK):
    """Each slot's query against the first lengths[m] keys of its own suffix -> (out [M, Hq, D], lse [Hq, M] float32).

    q [M, Hq, D], k, v [M, L, Hkv, D] (slot-major cache), lengths [M] int64 on the device, all >= 1;
    span = max(lengths) (host int). As transformers' eager attention: the products run in the cache's dtype
    (float32 accumulation inside the matmul), the softmax and log-sum-exp in float32.

    Batch invariance: keys are taken in fixed chunks of `chunk` (the last one cut at L), each chunk's
    (out_c, lse_c) is computed over exactly those positions (masked past lengths[m]) and the chunks are merged
    in order by log-sum-exp. A chunk wholly past a row's length has lse -inf and out 0, and merging it is exact
    (weights 1 and 0), so a row's result depends on its own keys only, not on how far the other slots of the
    batch reach. (Unwritten cache rows are zeros or an earlier sample's finite values, so 0 * v = 0.)
    """
    m, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(m, hkv, hq // hkv, d)
    out = lse = None
    for c0 in range(0, span, chunk):
        kc, vc = k[:, c0 : c0 + chunk], v[:, c0 : c0 + chunk]
        pos = torch.arange(c0, c0 + kc.shape[1], device=q.device)
        s = torch.einsum("mhgd,mshd->mhgs", qg, kc).float() * scale
        s = s.masked_fill((pos[None, :] >= lengths[:, None])[:, None, None, :], float("-inf"))
        lse_c = torch.logsumexp(s, dim=-1)  # [M, Hkv, G]; -inf where the chunk is past the row's length
        p = torch.exp(s - lse_c.masked_fill(torch.isinf(lse_c), 0.0)[..., None])
        out_c = torch.einsum("mhgs,mshd->mhgd", p.to(v.dtype), vc).float().reshape(m, hq, d)
        lse_c = lse_c.reshape(m, hq).transpose(0, 1)
        if out is None:
            out, lse = out_c, lse_c
        else:
            out, lse = reference.merge_attention_partials(out, lse, out_c, lse_c)
    return out.to(q.dtype), lse


@dataclass
class PrefixCache:
    k: list  # per layer [P_total, Hkv, D]
    v: list
    cu_prefix: torch.Tensor  # [B+1] int32 on the device
    lengths: list  # [B] prompt lengths (host)

    @classmethod
    def allocate(cls, model, lengths, device, dtype):
        c = model.config
        total = sum(lengths)
        shape = (total, c.num_key_value_heads, c.head_dim)
        cu = torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
        layers = range(c.num_hidden_layers)
        return cls([torch.empty(shape, device=device, dtype=dtype) for _ in layers],
                   [torch.empty(shape, device=device, dtype=dtype) for _ in layers], cu, list(lengths))

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class PrefixPool:
    """The prefix caches of the prompts now decoding, packed in admission order: k, v [capacity, Hkv, D] per layer.

    `add(n)` appends room for a prompt of n tokens and returns a PrefixCache view of it to prefill into;
    `remove(j)` drops the j-th prompt and moves the later ones down (one copy of the tail), so the active
    prompts always sit at cu_prefix = cumsum(lengths) as prefix_decode_attention wants. The pool grows by half
    its size when a prompt does not fit.
    """

    def __init__(self, model, device, dtype, capacity=0):
        c = model.config
        self.shape = (c.num_key_value_heads, c.head_dim)
        self.layers, self.device, self.dtype = c.num_hidden_layers, device, dtype
        self.k = self.v = None
        self.lengths = []
        self._grow(max(capacity, 1))

    def _grow(self, capacity):
        total = sum(self.lengths)
        new = lambda: [torch.empty((capacity, *self.shape), device=self.device, dtype=self.dtype) for _ in range(self.layers)]  # noqa: E731
        k, v = new(), new()
        if self.k is not None:
            for i in range(self.layers):
                k[i][:total], v[i][:total] = self.k[i][:total], self.v[i][:total]
        self.k, self.v = k, v

    def add(self, n: int) -> PrefixCache:
        total, capacity = sum(self.lengths), self.k[0].shape[0]
        if total + n > capacity:
            self._grow(max(total + n, capacity + capacity // 2))
        self.lengths.append(n)
        cu = torch.tensor([0, n], dtype=torch.int32, device=self.device)
        return PrefixCache([t[total : total + n] for t in self.k], [t[total : total + n] for t in self.v], cu, [n])

    def remove(self, j: int) -> None:
        start = sum(self.lengths[:j])
        end, total = start + self.lengths[j], sum(self.lengths)
        if end < total:
            for t in self.k + self.v:
                t[start : total - (end - start)] = t[end:total].clone()
        del self.lengths[j]

    @property
    def cu_prefix(self) -> torch.Tensor:
        return torch.tensor([0] + self.lengths, dtype=torch.int64).cumsum(0).to(device=self.device, dtype=torch.int32)


@dataclass
class SuffixCache:
    k: list  # per layer [S, L, Hkv, D]: slot s holds the generated tokens of the sample now in that slot
    v: list

    @classmethod
    def allocate(cls, model, num_slots, max_len, device, dtype):
        """Zeros, so that a masked key never multiplies a NaN (see suffix_attention)."""
        c = model.config
        shape = (num_slots, max_len, c.num_key_value_heads, c.head_dim)
        layers = range(c.num_hidden_layers)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in layers],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in layers])


@dataclass
class DecodeBatch:
    """One decode step over all S slots (idle slots too: token 0 at position 0, suffix row 0, so shapes never change).

    tokens, positions, write [S] int64 (device): the token fed, its position (prompt length + t) and the
    suffix row it is written to (t); lengths = write + 1. rows [sum N_b] (device): for each prompt of the
    pool, in pool order, its N_b samples' slots in sample order, S for a sample not decoding (a zero query
    whose result is dropped); cu_q [B+1] int32 (device): prompt b owns rows[cu_q[b]:cu_q[b+1]]; max_rows =
    max N_b; span = max(lengths) (host; or more). cu_prefix / max_prefix: set for a CUDA graph's padded batch.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    write: torch.Tensor
    rows: torch.Tensor
    cu_q: torch.Tensor
    max_rows: int
    span: int
    cu_prefix: torch.Tensor = None  # [B+1] int32 (device); None: the pool's
    max_prefix: int = 0  # an upper bound of the prompts' lengths; 0: the pool's longest


def run_layers(model, x, position_ids, attend):
    """The decoder stack with attention(layer index, q, k, v, scale) -> out; returns the final hidden states."""
    cos, sin = model.rope(position_ids, x.dtype)
    for i, layer in enumerate(model.model.layers):
        x = layer(x, cos, sin, lambda q, k, v, softmax_scale=None, _i=i: attend(_i, q, k, v, softmax_scale))
    return model.model.norm(x)


@torch.no_grad()
def prefill(model, prompts, cache: PrefixCache, chunk_size: int, backend="auto") -> torch.Tensor:
    """Fill `cache` with the prompts' keys/values (each prompt once, in chunks) -> last-token hidden [B, H]."""
    device = cache.cu_prefix.device
    attn = prefill_attention_fn(device, backend)
    last = []
    base = 0
    for ids in prompts:
        n = len(ids)
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        chunk = chunk_size
        if backend == "reference" and not uses_kernels(device, backend):  # [Hq, chunk, n] scores: keep them <= 1 GiB
            chunk = max(1, min(chunk, (1 << 28) // (model.config.num_attention_heads * n)))
        for start in range(0, n, chunk):
            end = min(n, start + chunk)

            def attend(i, q, k, v, scale, _lo=base + start, _hi=base + end):
                cache.k[i][_lo:_hi] = k
                cache.v[i][_lo:_hi] = v
                return attn(q, cache.k[i][base:_hi], cache.v[i][base:_hi], start, scale)

            x = model.model.embed_tokens(ids[start:end])
            hidden = run_layers(model, x, torch.arange(start, end, device=device), attend)
        last.append(hidden[-1])
        base += n
    return torch.stack(last)


@torch.no_grad()
def decode_step(model, batch: DecodeBatch, prefix, suffix: SuffixCache, prefix_attn):
    """One token per slot -> hidden [S, H]; writes suffix row batch.write[s] of slot s in every layer.

    `prefix` is a PrefixPool (or PrefixCache) of the active prompts; the live rows attend to their prompt's
    prefix (one matrix product per prompt and kv head) and to their own suffix, merged by log-sum-exp.
    Idle slots compute garbage that stays in their own row (no operation mixes rows but the attention,
    which reads only live rows' prefixes and each slot's own suffix).

    With the Triton kernels (prefix_attn is `prefix_decode_attention`; 16-bit caches, or any under the
    interpreter: `cascade_compiles_clean`) a layer's attention is one launch of
    `cascade_decode_attention` (two when it splits the keys): prefix, suffix, their merge and the suffix cache
    write of the new token (decoding slots only; an idle slot's row is rewritten before it is read). Otherwise
    `prefix_attn` (the CPU's SDPA or the reference), the suffix scatter, `suffix_attention` and the merge in torch.
    """
    max_prefix = batch.max_prefix or max(prefix.lengths)
    cu_prefix = prefix.cu_prefix if batch.cu_prefix is None else batch.cu_prefix
    if prefix_attn is prefix_decode_attention and cascade_compiles_clean(prefix.k[0].dtype):  # one kernel a layer
        def cascade(i, q, k, v, scale):
            return cascade_decode_attention(q, k, v, prefix.k[i], prefix.v[i], suffix.k[i], suffix.v[i], batch.rows,
                                            batch.write, batch.cu_q, cu_prefix, scale, max_rows=batch.max_rows,
                                            max_prefix=max_prefix, span=batch.span)[0]

        return run_layers(model, model.model.embed_tokens(batch.tokens), batch.positions, cascade)
    lengths = batch.write + 1
    slots = torch.arange(len(batch.write), device=batch.write.device)

    def attend(i, q, k, v, scale):
        suffix.k[i][slots, batch.write] = k
        suffix.v[i][slots, batch.write] = v
        q_rows = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[batch.rows]  # row index S: a sample not decoding
        part, lse_part = prefix_attn(q_rows, prefix.k[i], prefix.v[i], batch.cu_q, cu_prefix, scale,
                                     max_rows=batch.max_rows, max_prefix=max_prefix)
        out_p = torch.zeros((q.shape[0] + 1, *q.shape[1:]), dtype=torch.float32, device=q.device)
        lse_p = torch.full((q.shape[1], q.shape[0] + 1), float("-inf"), device=q.device)
        out_p[batch.rows], lse_p[:, batch.rows] = part.float(), lse_part  # row S written many times: dropped
        out_p, lse_p = out_p[:-1], lse_p[:, :-1]
        out_s, lse_s = suffix_attention(q, suffix.k[i], suffix.v[i], lengths, batch.span, scale)
        out, _ = reference.merge_attention_partials(out_p, lse_p, out_s.float(), lse_s)
        return out.to(q.dtype)

    return run_layers(model, model.model.embed_tokens(batch.tokens), batch.positions, attend)
