"""sealong_kernels: fused GPU kernels for long-context self-improvement training.

Standalone: needs only torch and triton, never imports the `sealong` pipeline. Every kernel has a
plain-torch twin in `sealong_kernels.reference` (the test oracle and the CPU fallback).

    import sealong_kernels as sk
    sk.mbr_scores(emb, mask=None, normalize=True)        # emb [B, N, D] -> scores [B, N]
    sk.select_pairs(scores, generator=None)               # -> (chosen [B], rejected [B])
    sk.flash_attention(q, k, v, causal=True, cu_seqlens=None, softmax_scale=None)  # -> (out, lse)
    sk.ring_attention(q, k, v, group, causal=True)        # zigzag-sharded inputs -> (out, lse)
    sk.ulysses_attention(q, k, v, group, causal=True)     # sequence-sharded inputs -> out
    sk.fused_linear_orpo_loss(hidden, weight, labels, ...)   # -> (loss, metrics)
    sk.trl.ORPOTrainer / sk.trl.LigerORPOLoss                # TRL integration (TRL itself imported on first use)
"""

from . import reference
from .attention import flash_attention
from .decode import prefix_decode_attention
from .mbr import mbr_scores, select_pairs
from .orpo import fused_linear_orpo_loss, sequence_logp_sums, shared_prompt_targets
from .ring import merge_partials_, ring_attention, ring_schedule, shard_ranges
from .ulysses import hybrid_attention, sequence_index, ulysses_attention

__version__ = "0.1.0"


def __getattr__(name):
    """`sk.trl` on first access: the package never imports the optional TRL integration by itself."""
    if name == "trl":
        import importlib

        return importlib.import_module(".trl", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
