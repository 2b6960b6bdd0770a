"""A tiny Llama checkpoint folder built in code for the sampler and prompt tests: random float32 weights,
a word-level tokenizer with Llama-3-style special tokens and chat template, and a generation_config.json."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
WORDS = (
    "the a of and to in is was who what where when which how why did does born city river paris london "
    "passage question answer let's first understand problem devise plan solve it then carry out step-by-step "
    "think step by directly identify relevant information from long context list reasoning based on that "
    "finally provide user assistant . , ? : 1 2 3"
).split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is much faster than several fighting over shared cores (import it to use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_tokenizer():
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = vocab["<|begin_of_text|>"]
    # like Llama's: add_special_tokens=True prepends BOS (the double-BOS trap the prompts module avoids)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    return fast


def build_checkpoint(folder, vocab_size=96, max_positions=256, seed=0):
    """Save a tiny random Llama (GQA 4 heads on 2, head_dim 8, 2 layers) + tokenizer to `folder`; returns folder."""
    tokenizer = build_tokenizer()
    assert len(tokenizer) <= vocab_size
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=max_positions, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # larger logits than the default init, so sampling is far from uniform
        model.lm_head.weight.mul_(40.0)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end_of_text|>")]}, f)
    return str(folder)
