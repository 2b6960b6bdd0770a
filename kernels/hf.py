"""Adapters that let other trainers use sealong_kernels without the sealong pipeline.

* `FusedLinearORPOLoss`: a TRL-style ORPO / SFT loss module that takes the LM head weight and the last
  hidden states instead of logits (in the spirit of Liger-Kernel's LigerFusedLinearORPOLoss).
"""

import torch

from .orpo import fused_linear_orpo_loss


# ---------------------------------------------------------------------------------------------------------
# TRL-style fused linear ORPO / SFT loss module (owner: kernels/orpo.py)
# ---------------------------------------------------------------------------------------------------------


class FusedLinearORPOLoss(torch.nn.Module):
    """ORPO (or SFT) loss on the final hidden states and the LM head, without [tokens, V] logits.

        loss_fn = FusedLinearORPOLoss(beta=0.1)
        out = model.model(input_ids=ids, attention_mask=mask)          # [2B, T, H] after the final norm
        loss, metrics = loss_fn(model.lm_head.weight, out.last_hidden_state, labels, shift=True)
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
        if shift:
            if _input.dim() != 3 or target.dim() != 2:
                raise ValueError("shift=True needs the classic layout: hidden [2B, T, H] and labels [2B, T]")
            _input, target = _input[:, :-1], target[:, 1:]
        return fused_linear_orpo_loss(
            _input, lin_weight, target, bias=bias, beta=self.beta, nll_weight=self.nll_weight, mode=self.mode,
            ignore_index=self.ignore_index, chunk_size=self.chunk_size, strategy=self.strategy,
            skip_empty=self.skip_empty, group=self.group, **packed)

    def extra_repr(self):
        return f"mode={self.mode!r}, beta={self.beta}, nll_weight={self.nll_weight}, chunk_size={self.chunk_size}"
