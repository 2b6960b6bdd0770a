"""Bisect the demo-gain warm-up (sealong.tiny.warm_up, as `sealong pipeline --preset demo-gain` builds it) against
bench/bench_warmup_probe.py's loop, one difference at a time, by the answer-token loss only (no dev check: the copy
phase shows as that loss falling below ~0.4, bench/results/warmup_probe_cpu-x86-64-x2_2026-12-07.json):

    python -m bench.bench_warmup_bisect --loop tiny --questions pipeline --eps 1e-5 --stop 800
    python -m bench.bench_warmup_bisect --loop probe --questions probe --eps 1e-6 --stop 800

--loop tiny: sealong.tiny.warm_up itself (padding to the longest example of the whole set, HF's label loss);
--loop probe: the probe's loop (padding per batch, its own masked loss). --questions pipeline: the warm-up questions
after the preset's 512 + 400 (fresh_questions, index 912 on); probe: index 1000 on. --eps: the model's RMSNorm eps
(sealong.tiny builds 1e-5, the probe LlamaConfig's default 1e-6). The schedule is that of --steps; --stop ends the
run earlier. Prints one line per --every steps (mean answer loss of the last --every steps) and a JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time


class _Stop(Exception):
    pass


def main(argv=None) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sealong.data.fresh_world import FreshWorld, FreshWorldConfig, fresh_questions, world_config
    from sealong.tiny import TinyConfig, build_tokenizer, demo_texts, parse_overrides, warm_up, warmup_examples

    ap = argparse.ArgumentParser(prog="python -m bench.bench_warmup_bisect")
    ap.add_argument("--loop", choices=("tiny", "probe"), default="tiny")
    ap.add_argument("--questions", choices=("pipeline", "probe"), default="pipeline")
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--stop", type=int, default=800)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--set", action="append", default=[], help="TinyConfig field=value (repeatable)")
    a = ap.parse_args(argv)
    shape = ("num_layers=4,hidden_size=128,intermediate_size=384,tie_embeddings=true,warmup_hops=1,warmup_batch=16,"
             "warmup_lr=1e-3,lr_schedule=cosine,warmup_questions=20000,world_hops=1,world_passages=4,"
             "min_tokens=30,max_tokens=60")
    cfg = TinyConfig(**{**parse_overrides(shape), "warmup_steps": a.steps, **parse_overrides(",".join(a.set))})
    tok = build_tokenizer(demo_texts())
    if a.questions == "pipeline":
        qs = fresh_questions(cfg.seed, 912, 0, cfg.warmup_questions, 0,
                             config=world_config(cfg.world_hops, cfg.world_passages))["warmup"]
    else:
        qs = FreshWorld(FreshWorldConfig(hops=cfg.world_hops, paragraphs_per_record=cfg.world_passages,
                                         seed=cfg.seed)).questions(cfg.warmup_questions, 1000)
    lc = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_positions,
                     rms_norm_eps=a.eps, rope_theta=10000.0, tie_word_embeddings=cfg.tie_embeddings,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(lc)
    start = time.perf_counter()
    curve = []

    def report(step, losses):
        m = sum(losses[-a.every:]) / len(losses[-a.every:])
        curve.append((step, round(m, 4)))
        print(f"step {step} loss {m:.3f} s/step {(time.perf_counter() - start) / step:.3f} "
              f"load {os.getloadavg()[0]:.1f}", flush=True)

    if a.loop == "tiny":
        losses = []
        # warm_up logs mean(last 10) every 100 steps; read its per-step losses by wrapping Tensor.backward
        orig_backward = torch.Tensor.backward

        def backward(self, *args, **kw):
            if self.dim() == 0 and self.requires_grad:
                losses.append(self.item())
                if len(losses) % a.every == 0:
                    report(len(losses), losses)
                if len(losses) >= a.stop:
                    orig_backward(self, *args, **kw)
                    raise _Stop
            return orig_backward(self, *args, **kw)

        torch.Tensor.backward = backward
        try:
            warm_up(model, tok, qs, cfg, "plan_and_solve", log=lambda m: None)
        except _Stop:
            pass
        finally:
            torch.Tensor.backward = orig_backward
    else:
        ex = warmup_examples(tok, qs, cfg, "plan_and_solve")
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.01)
        ramp = max(1, a.steps // 20)

        def f(s):
            if s + 1 < ramp:
                return min(1, (s + 1) / ramp)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1, (s + 1 - ramp) / max(1, a.steps - ramp))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        rng = random.Random(cfg.seed)
        losses = []
        model.train()
        for step in range(a.stop):
            batch = rng.sample(ex, cfg.warmup_batch)
            L = max(len(p) + len(x) for p, x in batch)
            ids = torch.full((len(batch), L), tok.pad_token_id)
            w = torch.zeros((len(batch), L))
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for i, (p, x) in enumerate(batch):
                s = p + x
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
                w[i, len(p):len(s)] = 1.0
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                    reduction="none").view(len(batch), -1)
            loss = (nll * w[:, 1:]).sum() / w[:, 1:].sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if (step + 1) % a.every == 0:
                report(step + 1, losses)
    print(json.dumps({"args": vars(a), "first_losses": [round(x, 5) for x in losses[:3]], "curve": curve,
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
