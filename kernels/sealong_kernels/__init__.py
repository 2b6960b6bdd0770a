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
    sk.hf.register_transformers_attention()               # attn_implementation="sealong" in transformers

Imports are lazy (PEP 562 module __getattr__): `import sealong_kernels` and `sealong_kernels.reference` need
torch only, so the references run where triton is not installed (macOS); the first use of a kernel (or of a
submodule such as `sealong_kernels.hf`) imports its module, and with it triton.
    sk.trl.ORPOTrainer / sk.trl.LigerORPOLoss             # TRL integration (TRL imported on first use only)
"""

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "flash_attention": "attention", "VarlenPlan": "attention_plan", "varlen_plan": "attention_plan",
    "prefix_decode_attention": "decode", "cascade_decode_attention": "decode",
    "mbr_scores": "mbr", "select_pairs": "mbr",
    "fused_linear_orpo_loss": "orpo", "sequence_logp_sums": "orpo", "shared_prompt_targets": "orpo",
    "merge_partials_": "ring", "ring_attention": "ring", "ring_schedule": "ring", "shard_ranges": "ring",
    "hybrid_attention": "ulysses", "sequence_index": "ulysses", "ulysses_attention": "ulysses",
}
_SUBMODULES = ("attention", "attention_kernels", "attention_plan", "attention_tiles", "cuda_build",
               "decode", "hf", "mbr", "orpo", "orpo_onepass", "orpo_rows", "reference", "ring", "ring_merge", "runtime", "trl", "ulysses")


def __getattr__(name):
    """`sk.flash_attention`, `sk.hf`, ...: import the defining submodule on first use, then cache the name."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


__all__ = sorted(_EXPORTS) + ["reference", "hf"]
