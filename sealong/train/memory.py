"""Memory per GPU of sealong's training recipes, computed from a model config's parameter counts.

    python -m sealong.train.memory                      # the README table: Llama-3.1 8B and 70B at 1/8/16 GPUs
    python -m sealong.train.memory --model /models/Llama-3.1-8B-Instruct --gpus 1 8 16 32

Counts (P: every weight of the model; L: the LoRA weights, r (d_in + d_out) per adapted linear; N GPUs):

* full fine-tuning, FSDP2 (sealong/train/fsdp.py): float32 master weights, float32 gradients and two float32
  AdamW moments, sharded over N:  16 P / N bytes.
* LoRA, FSDP2: the frozen base in bfloat16 sharded (2 P / N), the adapters as above (16 L / N).
* QLoRA (not shardable: `data_parallel: replicate`): the adapted linears in NF4 with double quantization
  (4 bits + an 8-bit absmax per 64 weights + a float32 constant per 256 absmax:  (0.5 + (1 + 4 / 256) / 64) bytes
  per weight, as bitsandbytes stores them), every other weight in bfloat16, 16 L for the adapters; the same on
  every GPU whatever N.
* gathered (FSDP only): what FSDP all-gathers for compute on top of the shards: the root (embeddings, lm_head,
  final norm) in bfloat16 for the whole step (its reshard_after_forward is off), two decoder layers in bfloat16
  (the running one and the prefetched one) and one layer's unsharded float32 gradients before reduce-scatter.

Activations are not counted: they depend on the tokens per GPU. With gradient checkpointing each decoder layer
keeps its input, layers x tokens per GPU x hidden x 2 bytes (shown for one 32K-token sequence split over the
N GPUs by sequence parallelism, the paper's setting), plus one layer's recomputation and the loss's chunk.
"""

import argparse

from sealong.model.config import ModelConfig

GB = 1e9
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Meta's published config.json shapes (meta-llama/Llama-3.1-8B-Instruct and -70B-Instruct)
PRESETS = {
    "Llama-3.1-8B": ModelConfig(),  # ModelConfig's defaults are Llama-3.1-8B's
    "Llama-3.1-70B": ModelConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, head_dim=128),
}


def linear_shapes(c: ModelConfig):
    """(d_in, d_out) of every linear of one decoder layer, by module name."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, m = c.hidden_size, c.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}


def param_counts(c: ModelConfig, lora_r=128, lora_targets=LORA_TARGETS):
    """Weights of the model by part: root (embeddings, lm_head, final norm), layer (one decoder layer),
    linears (the adapted linears of all layers), total, and lora (adapters of rank lora_r on lora_targets)."""
    shapes = linear_shapes(c)
    biases = (2 * shapes["k_proj"][1] + shapes["q_proj"][1]) * c.attention_bias + c.hidden_size * c.attention_out_bias
    biases += (2 * c.intermediate_size + c.hidden_size) * c.mlp_bias
    layer = sum(i * o for i, o in shapes.values()) + biases + 2 * c.hidden_size  # + two RMSNorm weights
    embed = c.vocab_size * c.hidden_size
    root = embed * (1 if c.tie_word_embeddings else 2) + c.hidden_size
    linears = c.num_hidden_layers * sum(i * o for name, (i, o) in shapes.items() if name in lora_targets)
    lora = c.num_hidden_layers * sum(lora_r * (i + o) for name, (i, o) in shapes.items() if name in lora_targets)
    return {"root": root, "layer": layer, "linears": linears, "lora": lora, "total": root + c.num_hidden_layers * layer}


NF4_BYTES = 0.5 + (1 + 4 / 256) / 64  # bitsandbytes NF4, blocksize 64, double-quantized absmax


def recipe_bytes(c: ModelConfig, recipe, gpus, lora_r=128, seq_tokens=32768):
    """Bytes per GPU of one recipe ("full", "lora", "qlora") on `gpus` GPUs, by part (module docstring)."""
    n = param_counts(c, lora_r)
    P, L, layer = n["total"], n["lora"], n["layer"]
    lora_layer = L / c.num_hidden_layers
    if recipe == "full":
        parts = {"weights": 4 * P / gpus, "grads": 4 * P / gpus, "optimizer": 8 * P / gpus,
                 "gathered": 2 * n["root"] + 2 * 2 * layer + 4 * layer}
    elif recipe == "lora":
        parts = {"weights": (2 * P + 4 * L) / gpus, "grads": 4 * L / gpus, "optimizer": 8 * L / gpus,
                 "gathered": 2 * n["root"] + 2 * 2 * (layer + lora_layer) + 4 * lora_layer}
    elif recipe == "qlora":
        parts = {"weights": NF4_BYTES * n["linears"] + 2 * (P - n["linears"]) + 4 * L, "grads": 4 * L,
                 "optimizer": 8 * L, "gathered": 0.0}
    else:
        raise ValueError(f"recipe must be full, lora or qlora, got {recipe!r}")
    if gpus == 1 and recipe != "qlora":
        parts["gathered"] = 0.0  # nothing to gather: one process holds everything
    parts["total"] = sum(parts.values())
    parts["activations"] = c.num_hidden_layers * (seq_tokens / gpus) * c.hidden_size * 2
    return parts


RECIPES = {"full": "full FT (bf16 compute, fp32 master + AdamW)", "lora": "LoRA r{r} (bf16 base)",
           "qlora": "QLoRA r{r} (NF4 base, replicated)"}


def memory_table(models=None, gpus=(1, 8, 16), lora_r=128, seq_tokens=32768):
    """A Markdown table of `recipe_bytes` in GB (1e9 bytes) for each model, recipe and GPU count."""
    models = models or PRESETS
    lines = [f"| model | recipe | GPUs | weights | grads | AdamW | gathered | **total / GPU** | ckpt. activations "
             f"({seq_tokens // 1024}K tokens, sp = GPUs) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in models.items():
        billions = param_counts(c, lora_r)["total"] / 1e9
        for recipe, label in RECIPES.items():
            for g in gpus:
                p = recipe_bytes(c, recipe, g, lora_r, seq_tokens)
                cells = [f"{p[k] / GB:.1f}" for k in ("weights", "grads", "optimizer", "gathered")]
                lines.append(f"| {name} ({billions:.2f}B) | {label.format(r=lora_r)} | {g} | " + " | ".join(cells)
                             + f" | **{p['total'] / GB:.1f}** | {p['activations'] / GB:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sealong.train.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", help="checkpoint folder(s) with config.json (default: Llama-3.1 8B, 70B)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--lora_r", type=int, default=128)
    parser.add_argument("--seq_tokens", type=int, default=32768)
    args = parser.parse_args(argv)
    models = {folder: ModelConfig.from_folder(folder) for folder in args.model} if args.model else None
    print(memory_table(models, tuple(args.gpus), args.lora_r, args.seq_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
