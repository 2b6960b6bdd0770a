"""One ORPO training step (forward + backward, LoRA r=128 on all linears, activation checkpointing) on one
device: ours (shared-prompt packing, fused loss, our attention) vs what a TRL user runs (transformers with
SDPA + peft + the plain ORPO loss on full logits, chosen and rejected as two rows that repeat the prompt).

GPU: Llama-3.1-8B shapes with random bf16 weights (one copy shared by both models), prompts of 16K and 31K
tokens with 1K-token chosen and rejected answers. CPU: a tiny Llama, float32 (times mean nothing for GPUs;
token counts are exact).

Counts and formulas (P prompt, C chosen, R rejected tokens; L layers, H hidden, Hq heads of size D, V vocab):
    tokens through the model     ours P + C + R + 1 (one repeated prompt token)   baseline 2 (P + max(C, R))
    useful FLOPs of the step     6 N T + 12 L Hq D A + 6 H V (C + R)
        N = weights of the decoder layers, T = P + C + R, A = causally visible (query, key) pairs of the
        pair = P(P+1)/2 + C P + C(C+1)/2 + R P + R(R+1)/2   (the same work for both: MFU counts useful work)
    MFU = useful FLOPs / step time / bf16 matmul peak measured in this run
    tokens/s = T / step time (the pair's tokens, for both)

    python -m bench.bench_train          # GPU if present, else the small CPU run
"""

import sys

import torch

from bench.common import cpu_note, is_oom, matmul_peak_tflops, time_ms
from sealong.model import ModelConfig, Transformer
from sealong.train.pairs import Pair
from sealong.train.parallel import ParallelDims
from sealong.train.micro import build_micro_batch, micro_step_loss
from sealong.train.config import LORA_TARGETS, make_config
from sealong.train.mesh import TrainMesh
from sealong_kernels import reference

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=131072,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
GPU_CASE = dict(prompts=[16384, 31744], answer=1024, dtype=torch.bfloat16, lora_r=128, repeat=3)
CPU_CASE = dict(prompts=[256, 496], answer=32, dtype=torch.float32, lora_r=8, repeat=3)


def build_models(cfg, device, dtype, lora_r):
    """transformers' LlamaForCausalLM (SDPA) and our Transformer on the same weight tensors, each with LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the 8B weights directly in 16 bits
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False, attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(default)
    with torch.device("meta"):
        ours = Transformer(ModelConfig(architecture="LlamaForCausalLM", **cfg))
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    for model in (hf, ours):
        model.requires_grad_(False)
    lora = dict(r=lora_r, lora_alpha=lora_r, lora_dropout=0.05, target_modules=list(LORA_TARGETS))
    hf = get_peft_model(hf, LoraConfig(**lora))
    base = hf.get_base_model()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours.gradient_checkpointing = True
    return hf.train(), get_peft_model(ours, LoraConfig(**lora)).train(), ours.lm_head


def useful_flops(cfg, p, c, r):
    h, hq, hkv, d, layers = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                             cfg["head_dim"], cfg["num_hidden_layers"])
    n = layers * (2 * h * hq * d + 2 * h * hkv * d + 3 * h * cfg["intermediate_size"])
    visible = p * (p + 1) // 2 + c * p + c * (c + 1) // 2 + r * p + r * (r + 1) // 2
    return 6 * n * (p + c + r) + 12 * layers * hq * d * visible + 6 * h * cfg["vocab_size"] * (c + r)


def ours_step(model, lm_head, pair, device):
    cfg = make_config({"model": "-", "data": "-"})  # layout "packed", default loss chunk
    mesh = TrainMesh(ParallelDims())

    def step():
        model.zero_grad(set_to_none=True)
        micro = build_micro_batch([pair], cfg, mesh, device, lm_head)  # the loop builds it before the forward
        loss, _ = micro_step_loss(model, lm_head, micro, cfg, mesh, pair.chosen.numel(), 1)
        loss.backward()
    return step


def baseline_step(hf, pair, device):
    """TRL-style: two rows [prompt + chosen, prompt + rejected], full logits, ORPO on log_softmax (float32)."""
    p, c, r = pair.prompt, pair.chosen, pair.rejected
    width = p.numel() + max(c.numel(), r.numel())
    ids = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), -100)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, answer in enumerate((c, r)):
        n = p.numel() + answer.numel()
        ids[i, :n], mask[i, :n] = torch.cat([p, answer]), 1
        labels[i, p.numel() - 1:n - 1] = answer  # labels[t] is predicted from position t
    ids, labels = ids.to(device), labels.to(device)
    mask = None if bool(mask.all()) else mask.to(device)  # no padding: plain causal SDPA
    counts = torch.tensor([c.numel(), r.numel()], device=device)

    def step():
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=ids, attention_mask=mask).logits.float()  # [2, T, V]: every position
        logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        sums = (logp * (labels != -100)).sum(-1)
        loss, _ = reference.orpo_objective(sums, counts, mode="orpo", beta=0.1)
        loss.backward()
    return step


def measure(step, device, repeat):
    """(median ms, peak bytes allocated during the step or None on CPU); raises OOM to the caller."""
    peak = None
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    ms = time_ms(step, device, warmup=1, repeat=repeat)
    return ms, peak


def run(device: str, small: bool) -> dict:
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)  # tiny matrices on shared cores
    try:
        return _run(device, CPU_CASE if small else GPU_CASE, TINY if small else LLAMA31_8B, small)
    finally:
        torch.set_num_threads(threads)


def _run(device, case, cfg, small):
    peak_tflops = matmul_peak_tflops(device, torch.bfloat16)
    hf, ours, lm_head = build_models(cfg, device, case["dtype"], case["lora_r"])
    gen = torch.Generator().manual_seed(0)
    rows, summary = [], []
    for p in case["prompts"]:
        a = case["answer"]
        draw = lambda n: torch.randint(0, cfg["vocab_size"], (n,), generator=gen)  # noqa: E731
        pair = Pair("bench", draw(p), draw(a), draw(a))
        flops = useful_flops(cfg, p, a, a)
        got = {}
        for name, step, tokens in (("ours (packed, fused)", ours_step(ours, lm_head, pair, device), p + 2 * a + 1),
                                   ("transformers+SDPA+peft, plain ORPO", baseline_step(hf, pair, device), 2 * (p + a))):
            row = {"prompt": p, "answers": a, "impl": name, "tokens in model": tokens}
            try:
                ms, peak = measure(step, device, case["repeat"])
                row.update({"ms": round(ms, 1), "tokens/s": round((p + 2 * a) / (ms * 1e-3)),
                            "MFU %": round(100 * flops / (ms * 1e-3) / (peak_tflops * 1e12), 1)})
                if peak is not None:
                    row["peak GB"] = round(peak / 1e9, 1)
            except Exception as err:  # noqa: BLE001 - an OOM is a result, anything else is re-raised
                if not is_oom(err):
                    raise
                row["ms"] = "OOM"
                torch.cuda.empty_cache()
            got[name] = row
            rows.append(row)
        mine, base = got.values()
        speedup = base["ms"] / mine["ms"] if isinstance(base["ms"], float) and isinstance(mine["ms"], float) else None
        summary.append({"prompt": p, "ours tok/s": mine.get("tokens/s", "OOM"), "ours MFU %": mine.get("MFU %"),
                        "ours peak GB": mine.get("peak GB"), "baseline tok/s": base.get("tokens/s", "OOM"),
                        "speedup": round(speedup, 2) if speedup else None})
    notes = cpu_note(device) + [
        f"model: {'tiny Llama' if small else 'Llama-3.1-8B shapes'} with random weights, {str(case['dtype'])[6:]}, "
        f"LoRA r={case['lora_r']} on {', '.join(LORA_TARGETS)}, activation checkpointing in both",
        f"measured matmul peak: {peak_tflops:.3g} TFLOP/s ({'bf16' if not small else 'float32 on CPU'})",
        "useful FLOPs = 6 N T + 12 L Hq D A + 6 H V (C + R) (module docstring); tokens/s = (P + C + R) / step time",
        "6 N T and 6 H V count the weight gradients of the frozen base and LM head, which LoRA never computes: the "
        "work really done is about 4 N T + 4 H V (C + R) (+ LoRA + recomputation), so hardware use is ~2/3 of MFU %",
        "tokens in model: ours P + C + R + 1 (packed, prompt once); baseline 2 (P + max(C, R)) (prompt twice)",
        "peak GB: torch.cuda.max_memory_allocated during one step, weights included",
    ] + (["on a CPU ours runs the plain-torch reference attention (a dense mask) and loss twins, so the CPU "
          "times compare Python overheads of tiny matrices, not the method"] if small else [])
    return {"name": "train", "rows": rows, "notes": notes, "summary": summary}


if __name__ == "__main__":
    from bench.run_all import main

    sys.exit(main(["--only", "train"]))
