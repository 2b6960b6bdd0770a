"""A quick probe of the tiny model's warm-up on one world shape, greedy-only dev checks (no sampler, no MBR): the
answer-token loss, dev greedy final-answer accuracy and copy rate every --check steps. Used to find which form of
the reading world a CPU-sized model learns at all (bench/results/warmup_probe_cpu-x86-64-x2_2026-12-07.json):

    python bench/bench_warmup_probe.py --hops 1 --paras 4 --steps 1500            # 1-hop, 4 passages
    python bench/bench_warmup_probe.py --hops 1 --paras 4 --steps 1500 --fullloss 0.5   # + loss on the prompt

Dev questions: indices 0-63 of the probed world; training questions: 1000 onwards (disjoint).
"""
import argparse, math, random, time, os
import torch
from sealong.tiny import TinyConfig, build_tokenizer, demo_texts, warmup_examples, demo_prompts
from sealong.data.fresh_world import FreshWorld, FreshWorldConfig
from sealong.data.prompts import prompt_token_ids
from sealong.evaluate.metrics import final_answer, normalize_answer
from sealong.diagnosis import context_entities
from transformers import LlamaConfig, LlamaForCausalLM
ap = argparse.ArgumentParser()
ap.add_argument("--hops", default="1"); ap.add_argument("--paras", type=int, default=4)
ap.add_argument("--minTok", type=int, default=30); ap.add_argument("--maxTok", type=int, default=60)
ap.add_argument("--layers", type=int, default=4); ap.add_argument("--hidden", type=int, default=128)
ap.add_argument("--inter", type=int, default=384); ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--kv", type=int, default=2)
ap.add_argument("--tied", type=int, default=1); ap.add_argument("--steps", type=int, default=1500)
ap.add_argument("--batch", type=int, default=16); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--fullloss", type=float, default=0.0, help="weight of loss on prompt tokens")
ap.add_argument("--check", type=int, default=250); ap.add_argument("--nq", type=int, default=20000)
ap.add_argument("--devhops", default=None)
a = ap.parse_args()
hops = tuple(int(h) for h in a.hops.split("+")); devhops = tuple(int(h) for h in (a.devhops or a.hops).split("+"))
cfg = TinyConfig(min_tokens=a.minTok, max_tokens=a.maxTok)
tok = build_tokenizer(demo_texts())
W = FreshWorld(FreshWorldConfig(hops=hops, paragraphs_per_record=a.paras, seed=0))
Wd = FreshWorld(FreshWorldConfig(hops=devhops, paragraphs_per_record=a.paras, seed=0))
t0 = time.perf_counter()
train = W.questions(a.nq, 1000); dev = Wd.questions(64, 0)
ex = warmup_examples(tok, train, cfg, "plan_and_solve")
drec = demo_prompts(tok, dev, cfg)
dprompts = [prompt_token_ids(tok, r["context"], q.text, "plan_and_solve") for q, r in zip(dev, drec)]
print("data", time.perf_counter() - t0, "len", max(len(p)+len(x) for p,x in ex), flush=True)
lc = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
    num_attention_heads=a.heads, num_key_value_heads=a.kv, max_position_embeddings=1024, tie_word_embeddings=bool(a.tied),
    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0); model = LlamaForCausalLM(lc)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
ramp = max(1, a.steps // 20)
f = lambda s: min(1, (s+1)/ramp) if s+1 < ramp else 0.1 + 0.45*(1+math.cos(math.pi*min(1,(s+1-ramp)/max(1,a.steps-ramp))))
sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
rng = random.Random(0)
def evaluate():
    model.eval(); right = copy = 0; outs = []
    with torch.no_grad():
        for q, r, p in zip(dev, drec, dprompts):
            out = model.generate(torch.tensor([p]), max_new_tokens=56, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, len(p):], skip_special_tokens=True)
            ans = normalize_answer(final_answer(text)); right += ans == normalize_answer(q.answer)
            copy += ans in {normalize_answer(e) for e in context_entities(r["context"])}; outs.append(text)
    model.train(); return 100*right/len(dev), 100*copy/len(dev), outs
start = time.perf_counter(); losses = []; aloss = []
for step in range(a.steps):
    batch = rng.sample(ex, a.batch); L = max(len(p)+len(x) for p, x in batch)
    ids = torch.full((len(batch), L), tok.pad_token_id); w = torch.zeros((len(batch), L)); mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, (p, x) in enumerate(batch):
        s = p + x; ids[i, :len(s)] = torch.tensor(s); mask[i, :len(s)] = 1; w[i, 1:len(p)] = a.fullloss; w[i, len(p):len(s)] = 1.0
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none").view(len(batch), -1)
    ww = w[:, 1:]; loss = (nll*ww).sum()/ww.sum()
    ansl = (nll*(ww == 1)).sum()/(ww == 1).sum()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    aloss.append(ansl.item())
    if (step+1) % 100 == 0:
        print(f"step {step+1} ans_loss {sum(aloss[-50:])/50:.3f} s/step {(time.perf_counter()-start)/(step+1):.3f} load {os.getloadavg()[0]:.1f}", flush=True)
    if (step+1) % a.check == 0:
        g, c, outs = evaluate()
        print(f"CHECK step {step+1} greedy {g:.1f} copy {c:.1f} wall {time.perf_counter()-start:.0f} | {outs[0]!r} gold {dev[0].answer}", flush=True)
