"""KV caches of the shared-prefix sampler, and the two forward passes that fill and read them.

    prefix cache   k, v [P_total, Hkv, D] per layer: each prompt's tokens once (prompts packed, cu_prefix)
    suffix cache   k, v [M, L, Hkv, D] per layer: each sample's own generated tokens (M samples, L <= max new)

`prefill` runs the prompts through the model chunk by chunk (a chunk's queries see the cache so far and
themselves, causally) and returns the last token's hidden state. `decode_step` runs one token per sample:
attention of all samples against their prompt's prefix is one matrix product per (prompt, kv head)
(`sealong_kernels.prefix_decode_attention`), attention against each sample's suffix is a batched product,
and the two partial results are merged by log-sum-exp, which is exact.
"""

from dataclasses import dataclass

import torch

from sealong_kernels import reference
from sealong_kernels.decode import prefix_decode_attention


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
    else:

        def attend(q, k, v, q_start, scale):
            return reference.attention_forward(q, k, v, causal=True, softmax_scale=scale, q_start=q_start, k_start=0)[0]

    return attend


def prefix_attention_fn(device, backend="auto"):
    """Decode queries against the prompts' prefixes: the Triton kernel on CUDA (or when asked), else the reference."""
    if uses_kernels(device, backend):
        return prefix_decode_attention
    return lambda q, k, v, cu_q, cu_p, scale, **kw: reference.prefix_decode_attention(q, k, v, cu_q, cu_p, scale)


def suffix_attention(q, k, v, scale):
    """Each sample's query against its own suffix keys, no mask -> (out [M, Hq, D], lse [Hq, M] float32).

    q [M, Hq, D], k, v [M, S, Hkv, D] with S >= 1. As transformers' eager attention: the products run in the
    cache's dtype (float32 accumulation inside the matmul), the softmax and log-sum-exp in float32; the suffix
    cache is never copied to float32 (it is read once per step, like the prefix).
    """
    m, hq, d = q.shape
    hkv = k.shape[2]
    s = torch.einsum("mhgd,mshd->mhgs", q.reshape(m, hkv, hq // hkv, d), k).float() * scale
    lse = torch.logsumexp(s, dim=-1)  # [M, Hkv, G]
    out = torch.einsum("mhgs,mshd->mhgd", torch.exp(s - lse[..., None]).to(v.dtype), v)
    return out.reshape(m, hq, d), lse.reshape(m, hq).transpose(0, 1)


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


@dataclass
class SuffixCache:
    k: list  # per layer [M, L, Hkv, D]
    v: list

    @classmethod
    def allocate(cls, model, num_samples, max_len, device, dtype):
        c = model.config
        shape = (num_samples, max_len, c.num_key_value_heads, c.head_dim)
        layers = range(c.num_hidden_layers)
        return cls([torch.empty(shape, device=device, dtype=dtype) for _ in layers],
                   [torch.empty(shape, device=device, dtype=dtype) for _ in layers])

    def select(self, keep: torch.Tensor) -> "SuffixCache":
        """Keep only the samples `keep` (indices into the current rows), e.g. after some finished."""
        return SuffixCache([k.index_select(0, keep) for k in self.k], [v.index_select(0, keep) for v in self.v])


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
        if not uses_kernels(device, backend):  # the reference holds [Hq, chunk, n] float32 scores: keep them <= 1 GiB
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
def decode_step(model, tokens, positions, step, prefix: PrefixCache, suffix: SuffixCache, cu_q, max_rows, prefix_attn):
    """One token per sample: tokens, positions [M] -> hidden [M, H]; writes suffix row `step` of every layer.

    cu_q [B+1] int32 (device): samples of prompt b are rows cu_q[b]:cu_q[b+1]; max_rows = max samples per prompt.
    """
    max_prefix = max(prefix.lengths)

    def attend(i, q, k, v, scale):
        suffix.k[i][:, step] = k
        suffix.v[i][:, step] = v
        out_p, lse_p = prefix_attn(q, prefix.k[i], prefix.v[i], cu_q, prefix.cu_prefix, scale,
                                   max_rows=max_rows, max_prefix=max_prefix)
        out_s, lse_s = suffix_attention(q, suffix.k[i][:, : step + 1], suffix.v[i][:, : step + 1], scale)
        out, _ = reference.merge_attention_partials(out_p.float(), lse_p, out_s.float(), lse_s)
        return out.to(q.dtype)

    return run_layers(model, model.model.embed_tokens(tokens), positions, attend)
