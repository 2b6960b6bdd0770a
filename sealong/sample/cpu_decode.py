"""The sampler's decode step on the CPU: `kv_cache.decode_step` with the prefix attention of
`sealong.model.sdpa.prefix_decode_sdpa`, its per-step bookkeeping done once per step rather than once per layer."""

import torch

from sealong.model.sdpa import prefix_rows
from sealong_kernels.reference import merge_attention_partials

from .kv_cache import SUFFIX_CHUNK, run_layers


@torch.no_grad()
def decode_step_sdpa(model, batch, prefix, suffix, chunk=None):
    """The CPU decode step: `sealong.sample.kv_cache.decode_step` with the prefix attention of `prefix_decode_sdpa`,
    its per-step work done once per step rather than once per layer -> hidden [S, H].

    Once per step, on the host: the prompts' row and prefix offsets (no `.tolist()` per layer), whether the rows
    are the slots in order (every sample decoding: no gather of query rows, no scatter of the prefix result), the
    suffix write index and the suffix masks (additive 0 / -inf per key chunk, shared by all layers). Per layer: the
    suffix write (one `index_copy_` per cache), one product pair per prompt against its prefix, the suffix chunks,
    and the log-sum-exp merge. Row results depend on their own prompt's rows and their own suffix only, with the
    chunks of `suffix_attention` (fixed size), so the batch invariance of `decode_step` holds.
    """
    chunk = chunk or SUFFIX_CHUNK
    slots, cap = suffix.k[0].shape[:2]
    rows = batch.rows.tolist()
    identity = rows == list(range(slots))
    cq = batch.cu_q.tolist()
    cp = (prefix.cu_prefix if batch.cu_prefix is None else batch.cu_prefix).tolist()
    where = torch.arange(slots, device=batch.write.device) * cap + batch.write  # flat suffix row of each slot
    lengths = batch.write + 1
    masks = []
    for c0 in range(0, batch.span, chunk):
        pos = torch.arange(c0, min(c0 + chunk, cap), device=lengths.device)
        past = pos[None, :] >= lengths[:, None]
        masks.append((c0, torch.zeros(past.shape, device=past.device).masked_fill_(past, float("-inf"))[:, None, None, :]))

    def attend(i, q, k, v, scale):
        hkv, d = k.shape[1:]
        suffix.k[i].view(slots * cap, hkv, d).index_copy_(0, where, k)
        suffix.v[i].view(slots * cap, hkv, d).index_copy_(0, where, v)
        if identity:
            out_p, lse_p = prefix_rows(q, prefix.k[i], prefix.v[i], cq, cp, scale)
        else:
            q_rows = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[batch.rows]  # row S: a sample not decoding
            part, lse_part = prefix_rows(q_rows, prefix.k[i], prefix.v[i], cq, cp, scale)
            out_p = q.new_zeros((q.shape[0] + 1, *q.shape[1:]), dtype=part.dtype)
            lse_p = lse_part.new_full((q.shape[1], q.shape[0] + 1), float("-inf"))
            out_p[batch.rows], lse_p[:, batch.rows] = part, lse_part  # row S written many times: dropped
            out_p, lse_p = out_p[:-1], lse_p[:, :-1]
        out, lse = out_p.float(), lse_p
        qg = q.reshape(slots, hkv, q.shape[1] // hkv, d)
        for c0, mask in masks:  # each slot against its own suffix, chunk by chunk (kv_cache.suffix_attention)
            kc, vc = suffix.k[i][:, c0 : c0 + chunk], suffix.v[i][:, c0 : c0 + chunk]
            s = torch.einsum("mhgd,mshd->mhgs", qg, kc).float().mul_(scale).add_(mask)
            lse_c = torch.logsumexp(s, dim=-1)  # [S, Hkv, G]; -inf where the chunk is past the slot's length
            p = s.sub_(lse_c[..., None] if c0 == 0 else lse_c.masked_fill(torch.isinf(lse_c), 0.0)[..., None]).exp_()
            out_c = torch.einsum("mhgs,mshd->mhgd", p.to(vc.dtype), vc).float().reshape(q.shape)
            out, lse = merge_attention_partials(out, lse, out_c, lse_c.reshape(slots, -1).transpose(0, 1))
        return out.to(q.dtype)

    return run_layers(model, model.model.embed_tokens(batch.tokens), batch.positions, attend)
