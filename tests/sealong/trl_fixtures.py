"""Shared setup of the TRL / transformers / peft integration tests: a tiny transformers Llama whose vocabulary
(256) dominates every other dimension, so a [B, T, V] tensor is the largest a training step could make, the
word-level tokenizer of train_fixtures, a small preference dataset, and TRL's ORPO classes (skip without TRL)."""

import random

import pytest
import torch
from train_fixtures import WORDS, build_tokenizer

VOCAB = 256


def require_trl():
    """TRL's ORPOConfig and ORPOTrainer, or a skip that says why (TRL is the optional `trl` extra)."""
    try:
        import trl  # noqa: F401
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    except ImportError as err:
        pytest.skip(f"TRL is not installed or has no ORPO trainer ({err}); install the extra: pip install 'sealong[trl]'")
    return ORPOConfig, ORPOTrainer


def tiny_llama(seed=0, vocab=VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def tiny_lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def preference_rows(n=4, seed=0):
    """n records of TRL's standard format: prompt, chosen, rejected strings of different lengths."""
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"prompt": words(4, 9), "chosen": words(2, 6), "rejected": words(2, 6)} for _ in range(n)]


def orpo_args(ORPOConfig, out, steps=3, **extra):
    return ORPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, logging_steps=1,
                      report_to=[], bf16=False, gradient_checkpointing=False, max_length=64, use_cpu=True,
                      save_strategy="no", learning_rate=1e-3, beta=0.1, seed=0, disable_tqdm=True, **extra)


__all__ = ["VOCAB", "build_tokenizer", "orpo_args", "preference_rows", "require_trl", "tiny_llama", "tiny_lora"]
