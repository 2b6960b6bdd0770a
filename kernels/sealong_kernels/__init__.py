"""sealong_kernels: fused GPU kernels for long-context self-improvement training.

Standalone: needs only torch and triton, never imports the `sealong` pipeline. Every kernel has a
plain-torch twin in `sealong_kernels.reference` (the test oracle and the CPU fallback).

    import sealong_kernels as sk
    sk.mbr_scores(emb, mask=None, normalize=True)        # emb [B, N, D] -> scores [B, N]
    sk.select_pairs(scores, generator=None)               # -> (chosen [B], rejected [B])
    sk.flash_attention(q, k, v, causal=True, cu_seqlens=None, softmax_scale=None)  # -> (out, lse)
    plan = sk.varlen_plan(cu_seqlens, T)                  # once per batch; cu_seqlens=plan in every layer
    sk.ring_attention(q, k, v, group, causal=True)        # zigzag-sharded inputs -> (out, lse)
    sk.ulysses_attention(q, k, v, group, causal=True)     # sequence-sharded inputs -> out
    sk.fused_linear_orpo_loss(hidden, weight, labels, ...)   # -> (loss, metrics)
"""

from . import reference
from .attention import flash_attention
from .attention_plan import VarlenPlan, varlen_plan
from .decode import prefix_decode_attention
from .mbr import mbr_scores, select_pairs
from .orpo import fused_linear_orpo_loss, sequence_logp_sums, shared_prompt_targets
from .ring import merge_partials_, ring_attention, ring_schedule, shard_ranges
from .ulysses import hybrid_attention, sequence_index, ulysses_attention

__version__ = "0.1.0"
