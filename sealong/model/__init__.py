"""The lean Llama-3.x / Qwen-2.5 decoder, loaded from Hugging Face checkpoint folders.

    from sealong.model import load_model, load_tokenizer
    model = load_model(folder, dtype=torch.bfloat16, device="cuda")
    hidden = model(input_ids, position_ids)          # [T] -> [T, hidden] after the final norm
    logits = model.lm_head(hidden)
"""

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .llama import Transformer, apply_rope, default_attention, masked_sdpa_attention, rope_cos_sin, rope_inv_freq
from .load import eos_token_ids, load_model, load_tokenizer, safetensors_files

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "Transformer",
    "apply_rope",
    "default_attention",
    "eos_token_ids",
    "load_model",
    "load_tokenizer",
    "masked_sdpa_attention",
    "rope_cos_sin",
    "rope_inv_freq",
    "safetensors_files",
]
