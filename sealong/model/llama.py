"""The lean Llama-3.x / Qwen-2.5 decoder (gpt-fast style), written for one device, on packed token streams.

Tokens are one flat stream `input_ids [T]` with explicit `position_ids [T]`, so several packed sequences
(`cu_seqlens`), preference packing (`segment_ids`) and sequence-parallel shards (global position ids) all
use the same forward. Attention goes through one pluggable callable

    attention(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], *, cu_seqlens=None, segment_ids=None, softmax_scale=None)
        -> out [T, Hq, D]

applied after RoPE. Module and parameter names are those of transformers' LlamaForCausalLM /
Qwen2ForCausalLM, so checkpoints load without a key map and peft adapters move between the two.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig

# ---------------------------------------------------------------------------------------------- rotary


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2] in float32, with Llama-3.1's or linear scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(medium, blended, out)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin [T, head_dim] for the half-split layout (angles computed in float32, cast to `dtype`)."""
    angles = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by position: x * cos + rotate_half(x) * sin, halves [x1, x2] -> [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---------------------------------------------------------------------------------------------- attention fallback


def visibility_mask(t: int, device, cu_seqlens=None, segment_ids=None) -> torch.Tensor:
    """Boolean [T, T]: key j visible from query i (causal in stream order, same packed sequence, segment rule)."""
    idx = torch.arange(t, device=device)
    mask = idx[None, :] <= idx[:, None]
    if cu_seqlens is not None:
        cu = getattr(cu_seqlens, "cu_seqlens", cu_seqlens)  # a sealong_kernels VarlenPlan or the tensor
        seq = torch.bucketize(idx, cu[1:].to(device=device, dtype=torch.long), right=True)
        mask &= seq[None, :] == seq[:, None]
    if segment_ids is not None:
        seg = segment_ids.to(device)
        mask &= (seg[None, :] == 0) | (seg[None, :] == seg[:, None])
    return mask


def masked_sdpa_attention(q, k, v, *, cu_seqlens=None, segment_ids=None, softmax_scale=None):
    """Differentiable reference attention with an explicit [T, T] mask (torch SDPA, GQA without repeating K/V)."""
    mask = visibility_mask(q.shape[0], q.device, cu_seqlens, segment_ids)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=softmax_scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # [Hq, T, D]
    return out.transpose(0, 1)


def flash_attention_callable(q, k, v, *, cu_seqlens=None, segment_ids=None, softmax_scale=None, block_plan=None):
    """Our Triton flash attention (sealong_kernels.flash_attention), output only. block_plan: the batch's block
    plan (`plan_blocks`, built once per forward by the model and passed to every layer)."""
    import sealong_kernels

    out, _ = sealong_kernels.flash_attention(
        q, k, v, causal=True, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale, segment_ids=segment_ids,
        block_plan=block_plan,
    )
    return out


def _flash_block_plan(t, device, *, cu_seqlens=None, segment_ids=None):
    """The block plan of a causal self-attention over T tokens with these sequences / segments, for every layer
    of one forward (and its backward); None when the Triton kernel will not run or has nothing to plan."""
    from sealong_kernels.attention import block_plan
    from sealong_kernels.runtime import triton_available

    probe = segment_ids if segment_ids is not None else getattr(cu_seqlens, "seq_idx", cu_seqlens)
    if probe is None or not triton_available(probe):
        return None
    return block_plan(t, causal=True, cu_seqlens=cu_seqlens, segment_ids=segment_ids, device=device)


# an attention callable with a `plan_blocks` attribute gets `block_plan=` from the model: built once per forward
flash_attention_callable.plan_blocks = _flash_block_plan


def default_attention(device) -> callable:
    """The Triton kernel on CUDA when sealong_kernels provides it; elsewhere fused SDPA without [T, T] masks
    (sealong/model/sdpa.py). `masked_sdpa_attention` stays the readable reference."""
    if torch.device(device).type == "cuda":
        import sealong_kernels

        if hasattr(sealong_kernels, "flash_attention"):
            return flash_attention_callable
        return masked_sdpa_attention
    from .sdpa import sdpa_attention

    return sdpa_attention


# ---------------------------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_out_bias)

    def qkv(self, x, cos, sin):
        """x [T, hidden] -> rotated q [T, Hq, D], rotated k [T, Hkv, D], v [T, Hkv, D]."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, attention, **attn_kwargs):
        q, k, v = self.qkv(x, cos, sin)
        out = attention(q, k, v, softmax_scale=self.head_dim**-0.5, **attn_kwargs)  # [T, Hq, D]
        return self.o_proj(out.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, attention, **attn_kwargs):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention, **attn_kwargs)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Hugging Face's `model.` sub-tree: embed_tokens, layers, norm."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM. `model(input_ids [T], position_ids [T])` -> final hidden states [T, hidden] (after the norm)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self._inv_freq = {}  # device -> float32 rotary frequencies (not a buffer: survives meta-device loading)

    def inv_freq(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(self.config, device)
        return self._inv_freq[key]

    def rope(self, position_ids, dtype):
        return rope_cos_sin(position_ids, self.inv_freq(position_ids.device), dtype)

    def forward(self, input_ids, position_ids, *, attention=None, cu_seqlens=None, segment_ids=None, return_logits=False):
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and position_ids must both be 1-D [T] (packed tokens), got {tuple(input_ids.shape)} and {tuple(position_ids.shape)}"
            )
        attention = attention or default_attention(input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        kwargs = {}
        if cu_seqlens is not None:  # validated once per batch, not in every layer's forward and backward
            from sealong_kernels.attention import varlen_plan

            kwargs["cu_seqlens"] = varlen_plan(cu_seqlens, input_ids.shape[0], device=input_ids.device)
        if segment_ids is not None:
            kwargs["segment_ids"] = segment_ids
        plan_blocks = getattr(attention, "plan_blocks", None)
        if plan_blocks is not None and kwargs:  # one block plan per batch, passed to every layer
            plan = plan_blocks(input_ids.shape[0], input_ids.device, **kwargs)
            if plan is not None:
                kwargs["block_plan"] = plan
        for layer in self.model.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attention, use_reentrant=False, **kwargs)
            else:
                x = layer(x, cos, sin, attention, **kwargs)
        hidden = self.model.norm(x)
        return self.lm_head(hidden) if return_logits else hidden
