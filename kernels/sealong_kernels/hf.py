"""Adapters that let other trainers use sealong_kernels without the sealong pipeline.

* `FusedLinearORPOLoss`: a TRL-style ORPO / SFT loss module that takes the LM head weight and the last
  hidden states instead of logits (in the spirit of Liger-Kernel's LigerFusedLinearORPOLoss).
* `register_transformers_attention()`: makes `attn_implementation="sealong"` run transformers models on
  `sealong_kernels.flash_attention` (GQA without repeating K/V, padding packed away with cu_seqlens).
"""

import torch

from .attention import flash_attention
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


def sealong_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                              sliding_window=None, softcap=None, **kwargs):
    """transformers attention function running `sealong_kernels.flash_attention`.

    query [B, Hq, Sq, D], key / value [B, Hkv, Sk, D] (K/V heads not repeated: GQA happens in the kernel).
    attention_mask: None or the 2D padding mask [B, Sk] (our mask function hands it through unchanged);
    padded tokens are dropped and the rows packed into one call with cu_seqlens (padded query rows get 0).
    Packed batches from DataCollatorWithFlattening (kwargs cu_seq_lens_q == cu_seq_lens_k, B == 1) run as
    one call too. With a KV cache (Sq < Sk) each row is one call with q_start = Sk_valid - Sq_valid.
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

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and b == 1 and sq == sk and attention_mask is None:
        if kwargs.get("cu_seq_lens_k") is not None and not torch.equal(kwargs["cu_seq_lens_k"], cu):
            raise ValueError("attn_implementation='sealong' needs cu_seq_lens_q == cu_seq_lens_k")
        return flash_attention(q[0], k[0], v[0], cu_seqlens=cu.to(torch.int32), **kw)[0][None], None

    valid = torch.ones(b, sk, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask.bool()
    if sq == sk:  # training / prefill: every row's valid tokens packed into one call
        counts = valid.sum(1)
        cu_seqlens = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
        flat = valid.reshape(-1).nonzero().squeeze(1)
        pack = lambda t: t.reshape(b * sk, t.shape[2], d)[flat]  # noqa: E731
        out_packed, _ = flash_attention(pack(q), pack(k), pack(v), cu_seqlens=cu_seqlens, **kw)
        out = q.new_zeros(b * sq, hq, d).index_copy(0, flat, out_packed)
        return out.reshape(b, sq, hq, d), None

    out = q.new_zeros(b, sq, hq, d)  # decoding with a cache: the queries are the last Sq positions
    for row in range(b):
        qi, ki = valid[row, -sq:].nonzero().squeeze(1), valid[row].nonzero().squeeze(1)
        o, _ = flash_attention(q[row, qi], k[row, ki], v[row, ki], q_start=len(ki) - len(qi), **kw)
        out[row, qi] = o
    return out, None


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
