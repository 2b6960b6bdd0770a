"""Shared helpers of the training tests: a tiny Llama checkpoint folder with a word-level tokenizer and
chat template (built in code, nothing downloaded) and a small random pairs file."""

import json
import os
import random

import torch
from tiny_checkpoint import one_thread  # noqa: F401 (autouse fixture: one intra-op thread for tiny models)

WORDS = [f"w{i}" for i in range(90)]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "user:", "assistant:"]
CHAT_TEMPLATE = ("<s>{% for m in messages %}user: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model_folder(folder, seed=0, layers=2, tie=False, hidden=32, heads=4):
    """Save a tiny random LlamaForCausalLM (float32) and the tokenizer into `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # larger weights than the default init so that losses move visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_pairs(path, n, seed=0, prompt_len=(12, 30), answer_len=(3, 9), extra=()):
    """n pairs records with a ready `prompt` message; `extra` lines are appended verbatim."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            record = {"id": f"q{i}", "prompt": sentence(rng, *prompt_len),
                      "chosen_text": sentence(rng, *answer_len), "rejected_text": sentence(rng, *answer_len)}
            f.write(json.dumps(record) + "\n")
        for line in extra:
            f.write(line + "\n")
    return path


def tiny_setup(tmp, n_pairs=8, seed=0, layers=2, tie=False, hidden=32, heads=4):
    model = make_model_folder(os.path.join(tmp, "model"), seed=seed, layers=layers, tie=tie, hidden=hidden, heads=heads)
    data = write_pairs(os.path.join(tmp, "pairs.jsonl"), n_pairs, seed=seed)
    return model, data
