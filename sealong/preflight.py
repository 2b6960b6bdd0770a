"""`sealong pipeline`'s checks before its first step: every resource the run will need and every setting of its
stages that can only fail later (after synth, an evaluation pass, sampling and scoring), checked in one go.

A failed check raises ValueError / FileNotFoundError with one line naming the option (the pipeline's caller
prints `error: ...` and exits 2). Checked here:

* model folders: --model's config.json parses (ModelConfig), its weights are safetensors;
* the embedders of scoring (MBR) and evaluation (MBR@N): the folder exists (jina-embeddings-v3: $SEALONG_JINA_V3),
  and a custom-code embedder (jina-embeddings-v3) has --trust-remote-code;
* training's batch: batch_pairs divisible by dp x micro_batch_pairs, dp = --nproc-per-node / sp;
* lengths: the longest context plus the new tokens within the model's positions (the demo's tiny model: 1024);
* a run directory's recorded settings (config.yaml): outputs made with other settings are not continued (`check_rerun`);
* memory, an estimate of the largest need against the device's memory: the tiny model's labelled warm-up (its
  float attention mask, batch x L x L x 4 bytes) in host memory; a real model's sampling (its weights and the KV
  cache of the decode slots) on the GPU, or in host memory without one.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

def size(n: float) -> str:
    """Bytes as GiB, MiB or KiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale / 10:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def host_memory() -> int | None:
    """Bytes of host memory available now (MemAvailable of /proc/meminfo; None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_memory(device: str | None) -> tuple[int | None, str]:
    """(bytes, name) of the memory the sampler will use: the first GPU's when sampling on cuda, else the host's."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"GPU 0 ({props.name})"
    return host_memory(), "host memory (MemAvailable)"


def check_run(args, configs: dict, train_cfg) -> None:
    """Every check of the module docstring for the pipeline's config `args`, its stages' `configs` and the training
    job's config; raises on the first failure."""
    check_batch(train_cfg, args.nproc_per_node)
    if args.model is None:
        check_tiny(args, configs)
    else:
        check_model(args, configs)
    check_embedders(configs["score"], configs["eval"])


def check_batch(train_cfg, nproc: int) -> None:
    """batch_pairs = dp x micro_batch_pairs x accumulation over the pipeline's --nproc-per-node processes."""
    if nproc % train_cfg.sp:
        raise ValueError(f"--nproc-per-node {nproc} is not a multiple of the training job's sp={train_cfg.sp} "
                         "(dp = processes / sp)")
    dp = nproc // train_cfg.sp
    try:
        copy.copy(train_cfg).grad_accum_steps(dp)
    except ValueError as err:
        raise ValueError(f"--batch-pairs: {err} (set --batch-pairs to a multiple of {dp * train_cfg.micro_batch_pairs}"
                         f", or --train-args \"--micro_batch_pairs K\")") from None


def check_embedders(score, evaluate) -> None:
    """The embedder folders exist, and a custom-code one (jina-embeddings-v3) is allowed to run its code."""
    from .score.embed import check_remote_code, resolve_model

    uses = []
    if score.utility == "embedding" and score.scorer != "self-certainty":
        uses.append(("score", score.model, score.trust_remote_code))
    if not evaluate.no_mbr:
        uses.append(("eval", evaluate.embed_model, evaluate.trust_remote_code))
    for stage, model, trusted in uses:
        if model is None:
            continue  # the offline all-MiniLM-L6-v2 package
        folder = resolve_model(model)  # jina-embeddings-v3: the local folder, or FileNotFoundError saying where
        if not os.path.isdir(folder) and (os.sep in str(model) or str(model).startswith(".")):
            raise FileNotFoundError(f"--embedding-model: no folder {folder} ({stage} embedder; nothing is downloaded)")
        check_remote_code(folder, trusted, "--trust-remote-code")


def context_need(configs: dict) -> int:
    """Positions the longest prompt needs: its context and the new tokens (the question and template add more)."""
    return configs["synth"].max_tokens + configs["sample"].max_new_tokens


def check_tiny(args, configs: dict) -> None:
    """The demo's tiny model (sealong.tiny): the contexts fit its positions, and its warm-up fits in memory."""
    from .tiny import TinyConfig

    tiny = TinyConfig()
    need = context_need(configs)
    if need > tiny.max_positions:
        raise ValueError(
            f"without --model the pipeline builds the demo's tiny model ({tiny.max_positions} positions), but contexts "
            f"of up to {configs['synth'].max_tokens} tokens + {configs['sample'].max_new_tokens} new tokens need "
            f"{need}: give --model CHECKPOINT (the paper's lengths are for a real model), or use --preset demo / "
            f"demo-gain, or lower --max-tokens")
    length = need + 64  # prompt template and question
    mask = tiny.warmup_batch * length * length * 4  # the float attention mask of one warm-up forward
    memory = host_memory()
    if memory is not None and mask > memory:
        raise ValueError(f"the tiny model's warm-up needs about {size(mask)} for one forward at {length} tokens "
                         f"(batch {tiny.warmup_batch}), more than the {size(memory)} of host memory available: lower "
                         "--max-tokens")


def check_model(args, configs: dict) -> None:
    """--model: config.json parses, its weights are there, the contexts fit, sampling fits the device's memory."""
    from .model.config import ModelConfig
    from .model.load import safetensors_files
    from .train.memory import param_counts

    c = ModelConfig.from_folder(args.model)  # a broken config.json: ValueError naming the file
    safetensors_files(args.model)
    sample = configs["sample"]
    need = context_need(configs)
    if sample.truncate == "error" and sample.max_prompt_tokens is None and need > c.max_position_embeddings:
        raise ValueError(f"--max-tokens {configs['synth'].max_tokens} + --max-new-tokens {sample.max_new_tokens} = "
                         f"{need} positions, more than the {c.max_position_embeddings} of {args.model}: lower them")
    weights = param_counts(c)["total"] * DTYPE_BYTES[sample.dtype]
    slots = sample.decode_slots or sample.batch_prompts * sample.num_samples
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * DTYPE_BYTES[sample.dtype]
    kv = per_token * (sample.batch_prompts * configs["synth"].max_tokens + slots * sample.max_new_tokens)
    memory, where = device_memory(sample.device)
    if memory is not None and weights + kv > memory:
        raise ValueError(f"sampling {args.model} needs at least {size(weights + kv)} ({size(weights)} of weights in "
                         f"{sample.dtype} + {size(kv)} of KV cache for {sample.batch_prompts} prompt(s) and {slots} "
                         f"decode slots), more than the {size(memory)} of {where}")


# what a stage's settings made in the run directory (run_dir itself or any round_k/); once one exists, the settings
# of that config.yaml section are fixed
MADE_BY = {"synth": ("prompts.jsonl",), "sample": ("samples.jsonl", "before/greedy.jsonl"), "score": ("scores.jsonl",),
           "train": ("train",), "eval": ("before/eval.json",)}
# options that change how fast or where a stage runs, not what it writes: free to change on a re-run
RUN_ONLY = {"nproc_per_node", "device", "backend", "cuda_graphs", "batch_prompts", "decode_slots", "prefix_pool_tokens",
            "prefill_chunk", "batch_size", "chunk", "overwrite", "no_plot", "log_every", "progress", "report_to",
            "save_every", "keep_checkpoints", "resume", "dist_timeout", "sp", "ulysses", "ring_layout", "data_parallel",
            "gradient_checkpointing", "loss_chunk_size"}
# the pipeline's own options that shape an output (the ones that set a stage option are compared in its section;
# --model is compared by the stages, by its config sha256)
PIPELINE_MADE_BY = {"tiny_warmup_steps": "base_model", "musique": "prompts.jsonl",
                    "eval_files": "eval_prompts.jsonl", "eval_samples": "before", "train_args": "train"}


def rerun_differences(run: Path, recorded: dict, now: dict) -> list[str]:
    """'section.option: run X, now Y' for every recorded setting of run/config.yaml (`recorded`) that differs from
    `now` although outputs made with it exist (MADE_BY; a setting of a stage not yet run may still change, as in the
    README's SFT control: its train/ removed, --mode sft). Model paths are not compared: the stages compare the
    model by its config sha256 (sealong.provenance)."""
    def made(names):
        return any((folder / name).exists() for folder in [run, *sorted(run.glob("round_*"))] for name in names)

    out = []
    for section, names in MADE_BY.items():
        old, new = recorded.get(section) or {}, now.get(section) or {}
        if made(names):
            out += [f"{section}.{k}: run {old[k]!r}, now {new[k]!r}" for k in old
                    if k in new and old[k] != new[k] and k not in RUN_ONLY]
    old, new = recorded.get("pipeline") or {}, now.get("pipeline") or {}
    for key, name in PIPELINE_MADE_BY.items():
        if key in old and key in new and old[key] != new[key] and made([name]):
            out.append(f"pipeline.{key}: run {old[key]!r}, now {new[key]!r}")
    return out


def recorded_differences(run_dir, now: dict) -> list[str]:
    """rerun_differences against run_dir/config.yaml ([] without one)."""
    import yaml

    path = Path(run_dir, "config.yaml")
    if not path.is_file():
        return []
    return rerun_differences(Path(run_dir), yaml.safe_load(path.read_text()) or {}, now)


def check_rerun(run_dir, now: dict) -> None:
    """A run directory with outputs is continued only with the settings they were made with (its config.yaml):
    otherwise refuse, naming each difference, before config.yaml is rewritten with `now` (the new config.yaml's
    data)."""
    run, path = Path(run_dir), Path(run_dir, "config.yaml")
    differ = recorded_differences(run_dir, now)
    if differ:
        raise ValueError(f"--run-dir {run} holds outputs made with other settings ({'; '.join(differ)}); the same "
                         f"settings continue it ({path}: `--config {path}`), or use another --run-dir")
