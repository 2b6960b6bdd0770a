"""A tiny base model for the offline demo: a word-level tokenizer and a small Llama built in code, then a short
LABELLED warm-up on the built-in world.

The warm-up is the base model's own training (what pretraining and instruction tuning are for a real model),
NOT part of SEALONG: it teaches a randomly initialised model the answer format (`The mother of X is Y. ...
The answer is Z.`) on labelled questions of the built-in world that are disjoint from the method's training and
held-out questions, so that its samples on those are not noise. A model this small learns the world's facts
rather than how to read a long context: it shows the mechanics of the loop, not the paper's gains. The method
that follows uses no label.

The folder written is an ordinary Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json with a
chat template, generation_config.json) that `sealong.model.load_model` and transformers both read.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class TinyConfig:
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 1024
    warmup_questions: int = 256  # labelled questions of the same world, disjoint from the method's questions
    warmup_steps: int = 300
    warmup_batch: int = 8
    warmup_lr: float = 3e-3
    min_tokens: int = 96  # context lengths of the warm-up prompts (the demo's range)
    max_tokens: int = 192
    seed: int = 0


def build_tokenizer(texts: list[str]):
    """A closed-vocabulary word-level tokenizer over `texts` (words and punctuation), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(t)}
    words |= {str(i) for i in range(1000)}
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(words - set(SPECIAL)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20
    return fast


def demo_texts(world) -> list[str]:
    """Everything the demo's tokenizer must cover: the world's passages and questions, the prompt strategies."""
    from .data.prompts import STRATEGIES

    return list(STRATEGIES.values()) + ["Passage : What is the answer ?"] + world.corpus()


def build_base_model(folder: str | Path, cfg: TinyConfig, skip_questions: int, strategy: str = "plan_and_solve",
                     log=print) -> dict:
    """Write the warmed-up tiny base model to `folder` (atomically: built in `folder.tmp`, then renamed).

    The warm-up questions come from the world `cfg.seed` after its first `skip_questions` (the method's training
    and held-out questions, `sealong.data.synthetic.world_questions`), so they never overlap them; the facts are
    the same world's.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from .data.synthetic import World, WorldConfig, world_questions

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_tokenizer(demo_texts(World(WorldConfig(seed=cfg.seed))))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    questions = world_questions(cfg.seed, skip_questions, 0, cfg.warmup_questions)["warmup"]
    stats = warm_up(model, tokenizer, questions, cfg, strategy, log)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
    (tmp / "warmup.json").write_text(json.dumps({"tiny_config": asdict(cfg), **stats}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return stats


def warmup_examples(tokenizer, questions, cfg: TinyConfig, strategy: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + EOS) per labelled question: the same prompt layout the sampler uses."""
    from .data.context import ContextBuilder, ContextConfig
    from .data.prompts import prompt_token_ids

    records = [q.record() for q in questions]
    builder = ContextBuilder(records, tokenizer,
                             ContextConfig(min_tokens=cfg.min_tokens, max_tokens=cfg.max_tokens, seed=cfg.seed))
    out = []
    for q, rec in zip(questions, records):
        prompt = prompt_token_ids(tokenizer, builder.build(rec)["context"], q.text, strategy)
        answer = tokenizer(q.reasoning(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt, answer))
    return out


def warm_up(model, tokenizer, questions, cfg: TinyConfig, strategy: str, log=print) -> dict:
    """Plain next-token cross-entropy on the gold reasoning (answer tokens only), AdamW, one-cycle schedule.

    Every batch is padded to one length (the longest example): a new shape per step would re-plan the CPU kernels.
    """
    examples = warmup_examples(tokenizer, questions, cfg, strategy)
    length = max(len(p) + len(a) for p, a in examples)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.warmup_lr, total_steps=cfg.warmup_steps,
                                                pct_start=0.1)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(cfg.warmup_steps):
        batch = rng.sample(examples, min(cfg.warmup_batch, len(examples)))
        ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            seq = p + a
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor(a)
            mask[i, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, cfg.warmup_steps // 5) == 0:
            log(f"warm-up (labelled, the base model's training): step {step + 1}/{cfg.warmup_steps} "
                f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return {"warmup_loss_first": losses[0], "warmup_loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "warmup_seconds": time.perf_counter() - start, "warmup_examples": len(examples)}
