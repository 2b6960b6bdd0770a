"""Adapters that let other trainers use sealong_kernels without the sealong pipeline.

* `FusedLinearORPOLoss`: a TRL-style ORPO / SFT loss module that takes the LM head weight and the last
  hidden states instead of logits (in the spirit of Liger-Kernel's LigerFusedLinearORPOLoss).
* `register_transformers_attention()`: makes `attn_implementation="sealong"` run transformers models on
  `sealong_kernels.flash_attention` (GQA without repeating K/V, padding packed away with cu_seqlens).
"""

import torch

from .attention import block_plan, content_version, flash_attention, flash_attention_backend, varlen_plan
from .orpo import fused_linear_orpo_loss


# ---------------------------------------------------------------------------------------------------------
# TRL-style fused linear ORPO / SFT loss module (owner: kernels/sealong_kernels/orpo.py)
# ---------------------------------------------------------------------------------------------------------


class FusedLinearORPOLoss(torch.nn.Module):
    """ORPO (or SFT) loss on the final hidden states and the LM head, without [tokens, V] logits.

        loss_fn = FusedLinearORPOLoss(beta=0.1)
        out = model.model(input_ids=ids, attention_mask=mask)          # [2B, T, H] after the final norm
        loss, metrics = loss_fn(model.lm_head, out.last_hidden_state, labels, shift=True)  # or lm_head.weight
        loss.backward(); trainer.log({k: v.item() for k, v in metrics.items()})

    Batch: the B chosen rows first, then the B rejected rows (TRL's concatenated batch); labels -100 on the
    prompt and padding. `shift=True` takes labels aligned with input_ids (Hugging Face convention) and
    predicts labels[:, 1:] from hidden[:, :-1]; `shift=False` (default, as Liger) means labels[t] is already
    the target of hidden[t]. Packed batches: pass sequence_ids / segment_ids / hidden_index as keyword
    arguments (see sealong_kernels.fused_linear_orpo_loss). Returns (loss, metrics with TRL's names).
    """

    def __init__(self, beta=0.1, nll_weight=1.0, ignore_index=-100, mode="orpo", chunk_size=None,
                 strategy="auto", skip_empty=False, group=None):
        super().__init__()
        self.beta, self.nll_weight, self.ignore_index, self.mode = beta, nll_weight, ignore_index, mode
        self.chunk_size, self.strategy, self.skip_empty, self.group = chunk_size, strategy, skip_empty, group

    def forward(self, lin_weight, _input, target, bias=None, *, shift=False, **packed):
        if isinstance(lin_weight, torch.nn.Linear):  # the lm_head module itself: its weight and bias
            lin_weight, bias = lin_weight.weight, lin_weight.bias if bias is None else bias
        if shift:
            if _input.dim() != 3 or target.dim() != 2:
                raise ValueError("shift=True needs the classic layout: hidden [2B, T, H] and labels [2B, T]")
            # labels[:, t + 1] is the target of hidden[:, t]; the last position predicts nothing (no hidden copy)
            target = torch.cat([target[:, 1:], torch.full_like(target[:, :1], self.ignore_index)], dim=1)
        return fused_linear_orpo_loss(
            _input, lin_weight, target, bias=bias, beta=self.beta, nll_weight=self.nll_weight, mode=self.mode,
            ignore_index=self.ignore_index, chunk_size=self.chunk_size, strategy=self.strategy,
            skip_empty=self.skip_empty, group=self.group, **packed)

    def extra_repr(self):
        return f"mode={self.mode!r}, beta={self.beta}, nll_weight={self.nll_weight}, chunk_size={self.chunk_size}"


# ---------------------------------------------------------------------------------------------------------
# transformers attention interface: attn_implementation="sealong" (owner: kernels/sealong_kernels/attention.py)
# ---------------------------------------------------------------------------------------------------------


def _assert_on_device(cond, message):
    """Check a device bool without a host sync (an asynchronous assert on CUDA; on the CPU it raises at once)."""
    torch._assert_async(cond, message)


def _cached_on(tensor, build):
    """build() once per batch: the result rides on the tensor every layer receives (the mask, the position ids,
    the collator's cu_seqlens), so later layers and the backward reuse it without reading the host again. It
    is keyed by the tensor's content version (`attention_plan.content_version`): a buffer refilled in place
    (a preallocated collate buffer, a CUDA-graph static input) gets a new plan; a tensor without a version (an
    inference tensor) gets none cached."""
    version = content_version(tensor)
    cached = getattr(tensor, "_sealong_varlen_plan", None)
    if cached is None or version is None or cached[0] != version:
        cached = (version, build())
        if version is not None:
            tensor._sealong_varlen_plan = cached
    return cached[1]


def _with_blocks(q, k, causal, plan):
    """(varlen plan, its block plan): the block lists built once per batch with the varlen plan (when the
    Triton kernel runs the call) and passed to every layer."""
    blocks = None
    if flash_attention_backend(q, k, causal) == "triton":
        blocks = block_plan(q.shape[0], k.shape[0], causal=causal, cu_seqlens=plan, device=q.device)
    return plan, blocks


def cu_seqlens_from_position_ids(position_ids):
    """cu_seqlens [T + 1] int32 of a flattened batch from its position ids, without a host sync.

    A sequence starts wherever the position id equals the batch's smallest one (transformers' rule for packed
    flash-attention batches, e.g. DataCollatorWithFlattening without return_flash_attn_kwargs); token 0 always
    starts one. Fixed size: the entries after the last real boundary are T (zero-length sequences), which the
    kernel treats as empty.
        position_ids [0 1 2 0 1 0 1 2 3] -> cu_seqlens [0 3 5 9 9 9 9 9 9 9]
    """
    pos = position_ids.reshape(-1)
    t = pos.numel()
    start = pos == pos.min()
    start[0] = True
    seq = torch.cumsum(start, 0) - 1  # sequence index of every token
    slot = torch.where(start, seq, t + 1)  # starts go to their sequence's slot, other tokens to a discarded one
    cu = torch.full((t + 2,), t, dtype=torch.int64, device=pos.device)
    cu.scatter_(0, slot, torch.arange(t, device=pos.device))
    return cu[: t + 1].to(torch.int32)


def _pack_valid(valid, q=None, k=None, causal=True):
    """Order of the B * S tokens putting every row's valid tokens first (rows in order, tokens in order), padding
    last, and the varlen plan of that order (cu_seqlens [B + 2]: one sequence per row, then all padding as one
    sequence, whose rows are zeroed afterwards). Fixed shapes: no host sync, any padding pattern."""
    flat = valid.reshape(-1)
    order = torch.argsort((~flat).to(torch.int8), stable=True)
    counts = valid.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=counts.dtype, device=valid.device), torch.cumsum(counts, 0),
                    torch.full((1,), flat.numel(), dtype=counts.dtype, device=valid.device)])
    plan = varlen_plan(cu, flat.numel(), validate=False)
    if q is None:
        return order, plan
    flat_q = q.reshape(-1, *q.shape[2:])
    return (order, *_with_blocks(flat_q, k.reshape(-1, *k.shape[2:]), causal, plan))


def sealong_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                              sliding_window=None, softcap=None, **kwargs):
    """transformers attention function running `sealong_kernels.flash_attention`, without host syncs.

    query [B, Hq, Sq, D], key / value [B, Hkv, Sk, D] (K/V heads not repeated: GQA happens in the kernel).
    attention_mask: None or the 2D padding mask [B, Sk] (our mask function hands it through unchanged).
    * Padding (Sq == Sk): the tokens are reordered (every row's valid tokens first, padding last, fixed size) and
      run as one packed call with cu_seqlens; padded query rows get 0.
    * Packed batches from DataCollatorWithFlattening (B == 1, no mask): cu_seqlens from the kwargs cu_seq_lens_q
      (== cu_seq_lens_k) when given, else from position_ids resets (`cu_seqlens_from_position_ids`).
    * With a KV cache (Sq < Sk) the queries are the last Sq positions: Sq == 1 runs all rows in one call (row and
      padding as segment ids); Sq > 1 one call per row with q_start = Sk - Sq.
    Returns (out [B, Sq, Hq, D], None).
    """
    if dropout:
        raise ValueError(f"attn_implementation='sealong' has no attention dropout (got dropout={dropout})")
    if sliding_window is not None or softcap is not None:
        raise ValueError("attn_implementation='sealong' supports neither sliding_window nor softcap")
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"attn_implementation='sealong' takes a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    b, hq, sq, d = query.shape
    sk = key.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D]
    kw = dict(causal=causal, softmax_scale=scaling)

    if b == 1 and sq == sk and attention_mask is None:
        cu, plan = kwargs.get("cu_seq_lens_q"), None
        if cu is not None:  # the collator's boundaries: validated once (one host sync per batch, first layer)
            cu_k = kwargs.get("cu_seq_lens_k")
            if cu_k is not None and cu_k is not cu:
                if cu_k.shape != cu.shape:
                    raise ValueError("attn_implementation='sealong' needs cu_seq_lens_q == cu_seq_lens_k")
                _assert_on_device((cu_k == cu).all(), "attn_implementation='sealong' needs cu_seq_lens_q == cu_seq_lens_k")
            plan = _cached_on(cu, lambda: _with_blocks(q[0], k[0], causal, varlen_plan(cu, sq, device=q.device)))
        elif kwargs.get("position_ids") is not None:  # boundaries built here are valid by construction
            pos = kwargs["position_ids"]
            plan = _cached_on(pos, lambda: _with_blocks(q[0], k[0], causal, varlen_plan(
                cu_seqlens_from_position_ids(pos), sq, validate=False)))
        if plan is not None:
            return flash_attention(q[0], k[0], v[0], cu_seqlens=plan[0], block_plan=plan[1], **kw)[0][None], None

    valid = torch.ones(b, sk, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask.bool()
    if sq == sk:  # training / prefill: every row's valid tokens packed into one call
        pack = lambda t: t.reshape(b * sk, t.shape[2], d)[order]  # noqa: E731
        order, plan, blocks = _cached_on(valid if attention_mask is None else attention_mask,
                                         lambda: _pack_valid(valid, q, k, causal))
        out_packed, _ = flash_attention(pack(q), pack(k), pack(v), cu_seqlens=plan, block_plan=blocks, **kw)
        out = q.new_zeros(b * sq, hq, d).index_copy(0, order, out_packed)
        return (out * valid.reshape(-1, 1, 1).to(out.dtype)).reshape(b, sq, hq, d), None

    # decoding with a cache: query i of a row sits at position Sk - Sq + i; padded keys get segment -1 (seen by no
    # query), the row's valid keys segment row + 1 (seen by that row's queries only)
    rows = torch.arange(1, b + 1, dtype=torch.int32, device=q.device)[:, None]
    kseg = torch.where(valid, rows, -1).to(torch.int32)
    q_valid = valid[:, -sq:]
    if sq == 1:  # every key is at or before the query: one call, rows told apart by segment ids
        out, _ = flash_attention(q.reshape(b, hq, d), k.reshape(b * sk, -1, d), v.reshape(b * sk, -1, d),
                                 causal=False, softmax_scale=scaling, segment_ids=rows.reshape(-1),
                                 k_segment_ids=kseg.reshape(-1))
        out = out.reshape(b, 1, hq, d)
    else:
        out = torch.stack([flash_attention(q[r], k[r], v[r], q_start=sk - sq, segment_ids=rows[r].expand(sq),
                                           k_segment_ids=kseg[r], **kw)[0] for r in range(b)])
    return out * q_valid[..., None, None].to(out.dtype), None


def register_transformers_attention(name="sealong"):
    """Register `sealong_attention_forward` (and a pass-through 2D padding mask) under `name`, then:

        sealong_kernels.hf.register_transformers_attention()
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sealong")   # or from_pretrained
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(name, sealong_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)  # the 2D padding mask, or None when there is none
    return name
