"""A tiny base model for the offline demo: a word-level tokenizer and a small Llama built in code, then a
LABELLED warm-up on the built-in reading world (`sealong.data.fresh_world`: fresh facts per question).

The warm-up is the base model's own training (what pretraining and instruction tuning are for a real model),
NOT part of SEALONG: it teaches a randomly initialised model to answer (`The mother of X is Y. ... The answer is
Z.`, in paraphrased forms) on labelled questions disjoint from the method's training and held-out questions.
With `check_every`, a labelled dev slice of the warm-up world decides when to stop (greedy accuracy in
`stop_greedy` and oracle@n at least `stop_oracle_gap` points above it: a model whose consensus can teach it
something) and records,
at the end, whether the embedding consensus beats greedy there (`dev_check`). Measured on a shared 2-core CPU,
1500 steps of the default shape did not yet teach the model to copy names from its context (README); the
demo-gain preset's copy-gated learning rate (`lr_schedule=copy_gated`) keeps the peak rate until the dev check
sees the model copy, since when that phase comes depends on the question draw. The method
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
    tie_embeddings: bool = False  # lm_head shares the input embedding (makes copying a name easier to learn)
    warmup_questions: int = 4096  # labelled questions of the reading world, disjoint from the method's questions
    warmup_steps: int = 3000  # the most gradient steps; the dev check below may stop earlier
    warmup_batch: int = 8
    warmup_lr: float = 2e-3
    min_tokens: int = 110  # context lengths of the warm-up prompts (the demo's range: 8-12 passages)
    max_tokens: int = 150
    dev_questions: int = 64  # labelled dev slice of the warm-up world (never trained on, never the eval questions)
    check_every: int = 0  # steps between dev checks (0: no check, run all warmup_steps)
    stop_greedy: tuple = (30.0, 60.0)  # stop once dev greedy accuracy (%) is in this range ...
    stop_oracle_gap: float = 25.0  # ... and oracle@dev_samples (%) at least this many points above it
    dev_samples: int = 16
    temperature: float = 1.0  # sampling temperature of the dev check (the demo samples at this temperature)
    max_new_tokens: int = 64
    keep_checks: str = ""  # folder to keep the model of every dev check in (step_N/), "" keeps none
    warmup_hops: tuple = (2, 3)  # hop counts of the warm-up questions, cycled (the dev slice keeps world_hops)
    world_hops: tuple = (2, 3)  # the method's world (synth.world_hops): the dev slice's hop counts
    world_passages: int = 10  # ... and its passages per question (synth.world_passages), warm-up and dev alike
    prompt_loss: float = 0.0  # weight of next-token loss on the prompt's tokens (0: the answer's tokens only)
    curriculum_steps: int = 0  # the first this many steps draw only the warm-up questions of the fewest hops
    lr_schedule: str = "constant"  # after the linear ramp: "constant", "cosine" (down to 10% at warmup_steps) or
    # "copy_gated": constant until a dev check's copy rate reaches copy_gate, then cosine down to 10% over
    # decay_steps and stop (at most warmup_steps in all): the decay never starts on the plateau before the copy phase
    copy_gate: float = 50.0  # copy_gated: dev copy rate (%) that opens the decay
    decay_steps: int = 500  # copy_gated: steps of the cosine decay once the gate opened
    seed: int = 0


def build_tokenizer(texts: list[str]):
    """A closed-vocabulary word-level tokenizer over `texts` (words and punctuation), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(t)}
    words |= {str(i) for i in range(64)}  # passage numbers
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(words - set(SPECIAL)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20
    return fast


def demo_texts() -> list[str]:
    """Everything the demo's tokenizer must cover: the reading world's words, the prompt strategies."""
    from .data.fresh_world import FreshWorld
    from .data.prompts import STRATEGIES

    return list(STRATEGIES.values()) + ["Passage : What is the answer ?"] + FreshWorld.corpus()


def build_base_model(folder: str | Path, cfg: TinyConfig, skip_questions: int, strategy: str = "plan_and_solve",
                     log=print) -> dict:
    """Write the warmed-up tiny base model to `folder` (atomically: built in `folder.tmp`, then renamed).

    The warm-up and dev questions come from the reading world `cfg.seed` after its first `skip_questions` (the
    method's training and held-out questions, `sealong.data.fresh_world.fresh_questions`), so they never overlap
    them; every question has its own facts anyway.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from .data.fresh_world import FreshWorld, fresh_questions, world_config
    from .diagnosis import hop_counts
    from .jsonl import write_jsonl_atomic

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_tokenizer(demo_texts())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    world = world_config(cfg.world_hops, cfg.world_passages)
    sets = fresh_questions(cfg.seed, skip_questions, 0, cfg.warmup_questions, cfg.dev_questions if cfg.check_every else 0,
                           config=world)
    if tuple(cfg.warmup_hops) != tuple(world.hops):  # the same indices, another hop mix
        sets["warmup"] = FreshWorld(world_config(cfg.warmup_hops, cfg.world_passages, cfg.seed)).questions(
            cfg.warmup_questions, skip_questions)

    def save(path):
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(path)

    stats = warm_up(model, tokenizer, sets["warmup"], cfg, strategy, log, dev=sets["dev"], save=save, scratch=tmp)
    save(tmp)
    if cfg.check_every and sets["dev"]:  # the diagnosis before any round (labelled dev data only)
        rows: list = []
        stats["final_dev_check"] = res = dev_check(tmp, tokenizer, sets["dev"], cfg, strategy, mbr=True, rows_out=rows)
        write_jsonl_atomic(str(tmp / "dev_outputs.jsonl"), rows)
        log(f"warm-up diagnosis (labelled dev slice, {res['questions']} questions, hops {hop_counts(rows)}; "
            f"{folder.name}/dev_outputs.jsonl): " + ", ".join(
                f"{k} {v:.1f}" for k, v in res.items() if k != "questions"))
    (tmp / "warmup.json").write_text(json.dumps({"tiny_config": asdict(cfg), **stats}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return stats


def warmup_examples(tokenizer, questions, cfg: TinyConfig, strategy: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + EOS) per labelled question: the same prompt layout the sampler uses, the trace
    in the question's own paraphrased form."""
    from .data.prompts import prompt_token_ids

    out = []
    for q, rec in zip(questions, demo_prompts(tokenizer, questions, cfg)):
        prompt = prompt_token_ids(tokenizer, rec["context"], q.text, strategy)
        answer = tokenizer(q.reasoning(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt, answer))
    return out


def demo_prompts(tokenizer, questions, cfg: TinyConfig) -> list[dict]:
    """Prompt records (context built as the synth stage builds it, own distractors first) for `questions`."""
    from .data.context import ContextBuilder, ContextConfig

    records = [q.record() for q in questions]
    builder = ContextBuilder(records, tokenizer,
                             ContextConfig(min_tokens=cfg.min_tokens, max_tokens=cfg.max_tokens, seed=cfg.seed))
    return [builder.build(r) for r in records]


def dev_check(folder, tokenizer, questions, cfg: TinyConfig, strategy: str, embed_model=None, mbr=True,
              rows_out: list | None = None) -> dict:
    """The diagnosis (`sealong.diagnosis`) of the model in `folder` on labelled dev questions: greedy final-answer
    accuracy overall and per hop count, copy and confuser rates, oracle@n, MBR@n, random@n, majority@n (%).

    The model is sampled by the pipeline's own sampler (greedy and `cfg.dev_samples` samples at
    `cfg.temperature`). MBR@n is the embedding-consensus pick (`sealong.score.embed`), so this says, on labelled
    warm-up data only, whether the method's consensus beats greedy before the method is run. The per-question
    outputs the numbers are counted from go to `rows_out` (`sealong.diagnosis.dev_row`) when given.
    """
    import sealong_kernels as sk

    from .data.prompts import prompt_token_ids
    from .diagnosis import dev_row, diagnose
    from .model import eos_token_ids, load_model
    from .sample.sampler import SamplingParams, generate, sample_seed
    from .score.embed import embed

    model = load_model(str(folder), dtype=torch.float32)
    records = demo_prompts(tokenizer, questions, cfg)
    prompts = [prompt_token_ids(tokenizer, r["context"], q.text, strategy) for q, r in zip(questions, records)]
    eos = tuple(eos_token_ids(str(folder), tokenizer))
    n = cfg.dev_samples

    def run(temperature, count):
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature, eos_token_ids=eos)
        outs = []
        for b in range(0, len(prompts), 8):
            seeds = [[sample_seed(cfg.seed, q.id, i) for i in range(count)] for q in questions[b:b + 8]]
            for comps in generate(model, prompts[b:b + 8], seeds, params):
                outs.append([(tokenizer.decode(c.tokens, skip_special_tokens=True), c.finish_reason == "length")
                             for c in comps])
        return outs

    greedy, sampled = run(0.0, 1), run(cfg.temperature, n)
    picks = [None] * len(questions)
    if mbr:
        emb = embed([o for outs in sampled for o, _ in outs], embed_model, "cpu", 64).view(len(questions), n, -1)
        picks = [int(i) for i in sk.select_pairs(sk.mbr_scores(emb))[0]]
    rows = [dev_row(q, r["context"], g[0][0], [o for o, _ in outs], pick, [c for _, c in outs])
            for q, r, g, outs, pick in zip(questions, records, greedy, sampled, picks)]
    if rows_out is not None:
        rows_out[:] = rows
    return diagnose(rows)


def warm_up(model, tokenizer, questions, cfg: TinyConfig, strategy: str, log=print, dev=(), save=None,
            scratch=None) -> dict:
    """Plain next-token cross-entropy on the gold reasoning (answer tokens only), AdamW, linear warmup then a
    constant, cosine-decaying or copy-gated learning rate (`cfg.lr_schedule`, `lr_factor`), the first `cfg.curriculum_steps` steps on the
    questions of the fewest hops only; every `cfg.check_every` steps a dev check (`dev_check`) on the labelled dev slice,
    stopping once its greedy accuracy is in `cfg.stop_greedy` and its oracle@n at least `cfg.stop_oracle_gap` points above it.

    Every batch is padded to one length (the longest example): a new shape per step would re-plan the CPU kernels.
    """
    examples = warmup_examples(tokenizer, questions, cfg, strategy)
    length = max(len(p) + len(a) for p, a in examples)
    fewest = min(len(q.chain) for q in questions)  # once: inside the comprehension it was quadratic
    easy = [e for e, q in zip(examples, questions) if len(q.chain) == fewest]
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.01)
    ramp = max(1, cfg.warmup_steps // 20)
    if cfg.lr_schedule not in ("constant", "cosine", "copy_gated"):
        raise ValueError(f"lr_schedule: expected 'constant', 'cosine' or 'copy_gated', got {cfg.lr_schedule!r}")
    if cfg.lr_schedule == "copy_gated" and not (cfg.check_every and dev):
        raise ValueError("lr_schedule copy_gated: needs dev checks (check_every > 0 and dev questions)")
    gate = None  # copy_gated: the step after which the decay started (the dev check that reached copy_gate)

    def factor(step):
        return lr_factor(step, cfg, ramp, gate)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    start, losses, checks, stopped = time.perf_counter(), [], [], None
    for step in range(cfg.warmup_steps):
        pool = easy if step < cfg.curriculum_steps else examples
        batch = rng.sample(pool, min(cfg.warmup_batch, len(pool)))
        ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            seq = p + a
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor(a)
            mask[i, :len(seq)] = 1
        if cfg.prompt_loss:  # the prompt's tokens too, at weight prompt_loss (copying the passages' names is
            # practice for copying them into the answer)
            weight = (labels != -100).float()
            for i, (p, _) in enumerate(batch):
                weight[i, 1:len(p)] = cfg.prompt_loss
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                    reduction="none").view(ids.shape[0], -1)
            loss = (nll * weight[:, 1:]).sum() / weight[:, 1:].sum()
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, min(100, cfg.warmup_steps // 5)) == 0:
            log(f"warm-up (labelled, the base model's training): step {step + 1}/{cfg.warmup_steps} "
                f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if cfg.check_every and dev and (step + 1) % cfg.check_every == 0:
            model.eval()
            check = Path(cfg.keep_checks, f"step_{step + 1}") if cfg.keep_checks else Path(str(scratch) + ".check")
            save(check)
            # no embedding MBR here (the slow part): the final diagnosis has it
            rows: list = []
            res = dev_check(check, tokenizer, dev, cfg, strategy, mbr=False, rows_out=rows)
            if cfg.keep_checks:  # the outputs this check's numbers are counted from, beside its model
                from .jsonl import write_jsonl_atomic

                write_jsonl_atomic(str(check / "dev_outputs.jsonl"), rows)
            else:
                shutil.rmtree(check, ignore_errors=True)
            model.train()
            checks.append({"step": step + 1, **res})
            log(f"warm-up dev check (labelled dev slice, {res['questions']} questions) at step {step + 1}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in res.items() if k != "questions"))
            lo, hi = cfg.stop_greedy
            gap = res[f"oracle@{cfg.dev_samples}"] - res["greedy"]
            if (lo <= res["greedy"] <= hi and gap >= cfg.stop_oracle_gap) or res["greedy"] > hi:
                stopped = step + 1
                break
            if cfg.lr_schedule == "copy_gated" and gate is None and res["copy_rate"] >= cfg.copy_gate:
                gate = step + 1
                log(f"warm-up: dev copy rate {res['copy_rate']:.1f} >= {cfg.copy_gate:g} at step {gate}: the copy "
                    f"phase; the learning rate decays over the next {cfg.decay_steps} steps, then the warm-up ends")
        if gate is not None and step + 1 >= gate + cfg.decay_steps:
            break
    model.eval()
    last = sum(losses[-10:]) / len(losses[-10:]) if losses else None  # warmup_steps 0: an untrained model
    return {"warmup_loss_first": losses[0] if losses else None, "warmup_loss_last": last,
            "warmup_seconds": time.perf_counter() - start, "warmup_examples": len(examples),
            "warmup_steps_run": len(losses), "stopped_at": stopped, "copy_gate_at": gate, "dev_checks": checks}


def lr_factor(step: int, cfg: TinyConfig, ramp: int, gate: int | None = None) -> float:
    """The warm-up's learning rate at optimizer step `step` (0-based) as a share of `cfg.warmup_lr`: a linear ramp
    over `ramp` steps, then `cfg.lr_schedule`; for "copy_gated", `gate` is the step count at which the dev copy rate
    reached `cfg.copy_gate` (None: not yet, the rate stays at its peak)."""
    import math

    if step + 1 < ramp or cfg.lr_schedule == "constant":
        return min(1.0, (step + 1) / ramp)
    if cfg.lr_schedule == "copy_gated":
        if gate is None:
            return 1.0
        done = min(1.0, max(0, step - gate) / max(1, cfg.decay_steps))
    else:
        done = min(1.0, (step + 1 - ramp) / max(1, cfg.warmup_steps - ramp))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * done))


def parse_overrides(text: str) -> dict:
    """`field=value,field=value` -> TinyConfig field values, each parsed by its field's default's type (a tuple
    field takes `a+b+c`, a bool `true`/`false`); "" -> {}."""
    fields = asdict(TinyConfig())
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"tiny shape: expected field=value with a TinyConfig field ({', '.join(fields)}), "
                             f"got {item!r}")
        kind = type(fields[key])
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"tiny shape: {key} takes true or false, got {value!r}")
            out[key] = value.lower() == "true"
        elif kind is tuple:
            out[key] = tuple(type(fields[key][0])(v) for v in value.split("+"))
        else:
            out[key] = kind(value)
    return out
