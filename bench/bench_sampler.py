"""Shared-prefix sampling (ours) against transformers `generate(num_return_sequences=N, do_sample=True)`.

    python -m bench.bench_sampler        # the GPU if there is one, else a small CPU run

GPU: Llama-3.1-8B shapes with random bf16 weights (one copy, shared by both models), prompts of 4K, 16K
and 31K tokens, N = 32, 512 new tokens for ours (no EOS: forced to full length); HF generate runs with
min_new_tokens = max_new_tokens (fewer new tokens, reported per token) and OOM is a result.

Reported per case: prompt tokens prefilled (ours: P once; HF: N·P, counted by a hook on the embedding),
prefill time, decode tokens/s (N·new tokens over decode time), peak memory, and the time of one decode
step against its bandwidth floor:

    floor = (weight bytes + prefix KV bytes + suffix KV bytes) / copy bandwidth
    prefix KV bytes = 2 · layers · P · Hkv · D · bytes   (read once per step, shared by the N samples)
    suffix KV bytes = 2 · layers · N · t · Hkv · D · bytes

with the copy bandwidth measured in the same run (bench.common.copy_bandwidth_gbs).
"""

import sys
import time

import torch

from bench.common import copy_bandwidth_gbs, cpu_note, is_oom, synchronize, time_ms
from sealong.sample import kv_cache
from sealong.model import ModelConfig, Transformer
from sealong.sample.sampler import SamplingParams, generate, sample_seed

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
GPU_CASE = dict(prompts=[4096, 16384, 31744], n=32, new=512, hf_new=64, dtype=torch.bfloat16)
# slot utilization: near-uniform logits (random init), 8 of 256 tokens are EOS: each step ends a sample with
# probability 1/32, so lengths are geometric (mean ~32, many ending early, a few reaching max_new_tokens)
SLOTS_CASE = dict(prompts=256, prompt_tokens=(32, 96), n=8, slots=64, new=128, eos=tuple(range(8)))
CPU_CASE = dict(prompts=[96, 384], n=8, new=8, hf_new=8, dtype=torch.float32)


def build_models(cfg: dict, device, dtype):
    """HF LlamaForCausalLM with random weights and our Transformer sharing the very same tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**cfg, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the 8B weights directly in 16 bits (no float32 copy on the GPU)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(default)
    config = ModelConfig(architecture="LlamaForCausalLM", **cfg)
    with torch.device("meta"):
        ours = Transformer(config)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    return hf, ours.eval()


def kv_bytes_per_token(c: ModelConfig, dtype):
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.tensor([], dtype=dtype).element_size()


def count_tokens(module):
    counter = {"calls": []}
    handle = module.register_forward_hook(lambda m, inp, out: counter["calls"].append(inp[0].numel()))
    return counter, handle


def bench_ours(model, prompt, n, new, dtype, device, copy_gbs):
    params = SamplingParams(max_new_tokens=new, temperature=0.7, eos_token_ids=())
    seeds = [list(range(n))]
    # warm-up: compile (and autotune) the Triton kernels for these shapes outside the timed run
    generate(model, [prompt], seeds, SamplingParams(max_new_tokens=2, temperature=0.7, eos_token_ids=()))
    counter, handle = count_tokens(model.model.embed_tokens)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    generate(model, [prompt], seeds, params)
    synchronize(device)
    total_s = time.perf_counter() - t0
    handle.remove()
    peak = torch.cuda.max_memory_allocated(device) if str(device).startswith("cuda") else None
    pool = kv_cache.PrefixPool(model, device, dtype)
    prefix = pool.add(len(prompt))
    prefill_ms = time_ms(lambda: kv_cache.prefill(model, [prompt], prefix, params.prefill_chunk), device, warmup=1, repeat=3)
    # one decode step late in generation (suffix of t tokens), against its bandwidth floor
    c, t = model.config, new - 1
    suffix = kv_cache.SuffixCache.allocate(model, n, new, device, dtype)
    full = lambda value: torch.full((n,), value, dtype=torch.long, device=device)  # noqa: E731
    batch = kv_cache.DecodeBatch(full(0), full(len(prompt) + t), full(t), torch.arange(n, device=device),
                                 torch.tensor([0, n], dtype=torch.int32, device=device), n, t + 1)
    attn = kv_cache.prefix_attention_fn(device)
    step_ms = time_ms(lambda: model.lm_head(kv_cache.decode_step(model, batch, pool, suffix, attn)), device, warmup=2, repeat=5)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step_bytes = weight_bytes + kv_bytes_per_token(c, dtype) * (len(prompt) + n * (t + 1))
    floor_ms = step_bytes / (copy_gbs * 1e9) * 1e3
    decode_s = max(total_s - prefill_ms / 1e3, 1e-9)
    prefill_calls = -(-len(prompt) // params.prefill_chunk)  # the first forwards are the prompt's chunks
    return {"impl": "ours (shared prefix)", "prefill tokens": sum(counter["calls"][:prefill_calls]),
            "prefill ms": prefill_ms, "decode tok/s": n * new / decode_s, "peak GiB": None if peak is None else peak / 2**30,
            "step ms": step_ms, "floor ms": floor_ms, "% of floor": 100 * floor_ms / step_ms}


def bench_hf(hf, prompt, n, new, device):
    ids = torch.tensor([prompt], device=device)
    counter, handle = count_tokens(hf.model.embed_tokens)
    kwargs = dict(do_sample=True, temperature=0.7, num_return_sequences=n, max_new_tokens=new, min_new_tokens=new,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    try:
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            synchronize(device)
            t0 = time.perf_counter()
            hf.generate(ids, **kwargs)
            synchronize(device)
            total_s = time.perf_counter() - t0
            counter["calls"].clear()
            prefill_ms = time_ms(lambda: hf.generate(ids, **dict(kwargs, max_new_tokens=1, min_new_tokens=1)), device, warmup=0, repeat=1)
    except Exception as exc:
        if not is_oom(exc):
            raise
        return {"impl": "HF generate", "note": "OOM"}
    finally:
        handle.remove()
    peak = torch.cuda.max_memory_allocated(device) if str(device).startswith("cuda") else None
    decode_s = max(total_s - prefill_ms / 1e3, 1e-9)
    return {"impl": "HF generate", "prefill tokens": counter["calls"][0], "prefill ms": prefill_ms,
            "decode tok/s": n * new / decode_s, "peak GiB": None if peak is None else peak / 2**30, "note": f"{new} new tokens"}


def slot_utilization(device, case=SLOTS_CASE) -> tuple:
    """Static batches (before continuous batching: slots / N prompts decode until their longest sample ends)
    against continuous batching on the same number of slots: (rows, identical tokens per (prompt, seed))."""
    torch.manual_seed(0)  # the random weights
    _, model = build_models(TINY, device, torch.float32)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(*case["prompt_tokens"], (case["prompts"],), generator=gen).tolist()
    prompts = [torch.randint(0, TINY["vocab_size"], (p,), generator=gen).tolist() for p in lengths]
    seeds = [[sample_seed(0, b, i) for i in range(case["n"])] for b in range(case["prompts"])]
    per_batch = case["slots"] // case["n"]
    rows, outputs = [], []
    for mode in ("static batches", "continuous"):
        params = SamplingParams(max_new_tokens=case["new"], temperature=1.0, eos_token_ids=case["eos"],
                                decode_slots=0 if mode == "static batches" else case["slots"])
        if mode == "static batches":
            out = [c for b in range(0, len(prompts), per_batch)
                   for c in generate(model, prompts[b : b + per_batch], seeds[b : b + per_batch], params)]
        else:
            out = generate(model, prompts, seeds, params)
        outputs.append([[c.tokens for c in cs] for cs in out])
        st = params.stats
        rows.append({"batching": mode, "slots": case["slots"], "prompts x N": f"{case['prompts']} x {case['n']}",
                     "max new": case["new"], "tokens": st["busy_slot_steps"], "slot-steps": st["slot_steps"],
                     "decode forwards": st["decode_steps"], "slot utilization %": 100 * st["busy_slot_steps"] / st["slot_steps"]})
    all_lengths = [len(t) for cs in outputs[1] for t in cs]
    rows[1]["sample lengths"] = f"min {min(all_lengths)}, median {sorted(all_lengths)[len(all_lengths) // 2]}, max {max(all_lengths)}"
    return rows, outputs[0] == outputs[1]


def run(device: str, small: bool) -> dict:
    case = CPU_CASE if small else GPU_CASE
    cfg = TINY if small else LLAMA31_8B
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)  # tiny matrices on shared cores
    try:
        return _run(device, small, case, cfg)
    finally:
        torch.set_num_threads(threads)


def _run(device, small, case, cfg):
    hf, ours = build_models(cfg, device, case["dtype"])
    copy_gbs = copy_bandwidth_gbs(device)
    rows, summary = [], []
    gen = torch.Generator().manual_seed(0)
    for p in case["prompts"]:
        prompt = torch.randint(0, cfg["vocab_size"], (p,), generator=gen).tolist()
        row = bench_ours(ours, prompt, case["n"], case["new"], case["dtype"], device, copy_gbs)
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
        ref = bench_hf(hf, prompt, case["n"], case["hf_new"], device)
        common = {"prompt": p, "N": case["n"], "new": case["new"]}
        rows += [dict(common, **row), dict(common, **ref)]
        speedup = row["decode tok/s"] / ref["decode tok/s"] if "decode tok/s" in ref else None
        summary.append(dict(common, **{"prefill tokens ours/HF": f"{row['prefill tokens']}/{ref.get('prefill tokens', 'OOM')}",
                                       "decode speedup": speedup, "% of BW floor": row["% of floor"]}))
    slot_rows, same = slot_utilization(device)
    rows += slot_rows
    summary += [{"batching": r["batching"], "slot utilization %": r["slot utilization %"]} for r in slot_rows]
    notes = cpu_note(device) + [
        "slot utilization = busy slot-steps / (slots x steps), a step choosing one token per slot (tiny Llama, random "
        f"init, {SLOTS_CASE['prompts']} prompts x N={SLOTS_CASE['n']}, 8 of 256 tokens are EOS); static batches = "
        f"{SLOTS_CASE['slots'] // SLOTS_CASE['n']} prompts decoding until their longest sample ends (the sampler "
        f"before continuous batching); identical tokens per (prompt, seed) in both: {same}",
        f"model: {'Llama-3.1-8B shapes' if not small else 'tiny Llama'} with random weights, {str(case['dtype'])[6:]}; "
        f"copy bandwidth {copy_gbs:.1f} GB/s",
        "floor = (weight bytes + prefix KV bytes + suffix KV bytes) / copy bandwidth, one decode step of N samples",
        "prefill tokens: ours prefills the prompt once; HF generate repeats it N times (hook on embed_tokens)",
    ] + (["on a CPU our sampler uses the plain-torch reference attention (backend auto); decode tok/s there "
          "measures Python overhead of tiny matrices, not the method"] if small else [])
    return {"name": "sampler", "rows": rows, "notes": notes, "summary": summary}


if __name__ == "__main__":
    from bench.run_all import main

    sys.exit(main(["--only", "sampler"]))
