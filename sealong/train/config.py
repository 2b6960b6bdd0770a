"""TrainConfig: every setting of `sealong.train`, with the paper's defaults (SEALONG trained with XTuner's ORPO).

Loaded from a YAML or JSON file, then `--key value` overrides on the command line; an unknown key is an
error that lists the valid keys. Values from the command line are parsed as YAML scalars, so
`--lr 1e-4`, `--lora_targets q_proj,v_proj` and `--qlora true` all work.
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import yaml

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    # -- data and model -------------------------------------------------------------------------------------
    model: str = ""                      # checkpoint folder (config.json, safetensors, tokenizer)
    data: str = ""                       # pairs JSONL from the scoring stage (or SFT records with chosen_text)
    output_dir: str = "runs/train"       # checkpoints, metrics.jsonl, TensorBoard events
    mode: str = "orpo"                   # "orpo" (chosen vs rejected) or "sft" (chosen only)
    layout: str = "packed"               # "packed": prompt + chosen + rejected in one sequence; "classic": two sequences
    max_length: int = 32768              # longest sequence (prompt + one answer); longer prompts are cut in the middle
    prompt_strategy: str = "plan_and_solve"  # prompt template for records with context + question (sealong.data.prompts)
    # -- LoRA / QLoRA / full fine-tuning ---------------------------------------------------------------------
    finetune: str = "lora"               # "lora" (adapters through peft) or "full" (every weight trained)
    lora_r: int = 128                    # LoRA rank
    lora_alpha: int = 128                # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05           # dropout on the LoRA input
    lora_targets: tuple = LORA_TARGETS   # module names that get adapters (all attention and MLP linears)
    qlora: bool = False                  # base linears stored as bitsandbytes NF4 with double quantization
    dtype: str = "bfloat16"              # compute dtype of the base model: bfloat16, float16 (loss scaling) or float32
    loss_scaling: bool = True            # dynamic loss scaling when dtype is float16 (ignored otherwise)
    gradient_checkpointing: bool = True  # recompute each decoder layer in the backward pass
    # -- optimization ----------------------------------------------------------------------------------------
    lr: float = 5e-5                     # peak learning rate (the paper's LoRA setting; 5e-6 for full fine-tuning)
    epochs: int = 1                      # passes over the data
    batch_pairs: int = 8                 # effective batch: pairs per optimizer step over all ranks and micro-steps
    micro_batch_pairs: int = 1           # pairs per data-parallel rank per micro-step (1 with sequence parallel)
    beta: float = 0.1                    # ORPO odds-ratio weight
    nll_weight: float = 1.0              # weight of the NLL term on chosen tokens
    nll_reduction: str = "sequence"      # "sequence": mean over pairs of each chosen response's token mean (XTuner,
    #                                      the authors'); "token": token mean over the batch's chosen tokens
    weight_decay: float = 0.1            # AdamW weight decay
    adam_betas: tuple = (0.9, 0.999)     # AdamW betas
    adam_eps: float = 1e-8               # AdamW epsilon
    warmup_ratio: float = 0.05           # linear warmup over this fraction of the steps, then cosine to zero
    max_grad_norm: float = 1.0           # gradient-norm clipping (0 disables)
    max_steps: int = 0                   # stop after this many optimizer steps (0: the whole schedule)
    loss_chunk_size: int = 0             # token chunk of the fused loss (0: the kernel's default)
    # -- parallelism -----------------------------------------------------------------------------------------
    sp: int = 1                          # sequence-parallel degree (ring x Ulysses); dp = world size / sp
    ulysses: int = 1                     # Ulysses degree inside the sequence-parallel group (ring degree = sp / ulysses)
    ring_layout: str = "zigzag"          # ring sharding: "zigzag" (balanced causal work) or "plain" (contiguous)
    # -- bookkeeping -----------------------------------------------------------------------------------------
    seed: int = 0                        # shuffling, LoRA init and dropout
    save_every: int = 0                  # checkpoint every K optimizer steps (0: only at the end)
    keep_checkpoints: int = 2            # newest checkpoints kept on disk (the final one is always kept)
    log_every: int = 1                   # metrics.jsonl line every K steps
    tensorboard: bool = True             # TensorBoard events when tensorboard is installed
    resume: bool = False                 # continue from the newest checkpoint in output_dir
    progress: bool = True                # progress bar on rank 0

    def grad_accum_steps(self, dp):
        """Micro-steps per optimizer step: batch_pairs = dp x micro_batch_pairs x accumulation, exactly."""
        per_micro = dp * self.micro_batch_pairs
        if self.batch_pairs % per_micro:
            raise ValueError(
                f"batch_pairs={self.batch_pairs} is not divisible by dp={dp} x micro_batch_pairs={self.micro_batch_pairs}")
        return self.batch_pairs // per_micro

    def validate(self):
        checks = [
            (self.mode in ("orpo", "sft"), f"mode must be 'orpo' or 'sft', got {self.mode!r}"),
            (self.layout in ("packed", "classic"), f"layout must be 'packed' or 'classic', got {self.layout!r}"),
            (self.finetune in ("lora", "full"), f"finetune must be 'lora' or 'full', got {self.finetune!r}"),
            (self.dtype in ("bfloat16", "float16", "float32"), f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}"),
            (self.nll_reduction in ("sequence", "token"),
             f"nll_reduction must be 'sequence' or 'token', got {self.nll_reduction!r}"),
            (self.ring_layout in ("zigzag", "plain"), f"ring_layout must be zigzag or plain, got {self.ring_layout!r}"),
            (not (self.qlora and self.finetune == "full"), "qlora=true needs finetune=lora"),
            (self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}"),
            (self.batch_pairs >= 1 and self.micro_batch_pairs >= 1, "batch_pairs and micro_batch_pairs must be >= 1"),
            (self.sp >= 1 and self.ulysses >= 1 and self.sp % self.ulysses == 0,
             f"sp={self.sp} must be a positive multiple of ulysses={self.ulysses}"),
            (self.sp == 1 or self.micro_batch_pairs == 1, "sequence parallelism runs one pair per micro-step: set micro_batch_pairs=1"),
            (self.lr > 0 and self.epochs >= 1, "lr must be > 0 and epochs >= 1"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (len(self.adam_betas) == 2, f"adam_betas must have two values, got {self.adam_betas}"),
            (self.lora_r >= 1 and 0 <= self.lora_dropout < 1, f"lora_r must be >= 1 and lora_dropout in [0, 1), "
             f"got {self.lora_r} and {self.lora_dropout}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (min(self.save_every, self.keep_checkpoints, self.max_steps, self.loss_chunk_size) >= 0,
             "save_every, keep_checkpoints, max_steps and loss_chunk_size must be >= 0 (0: the default behaviour)"),
            (self.max_grad_norm >= 0 and self.beta >= 0 and self.nll_weight >= 0,
             "max_grad_norm, beta and nll_weight must be >= 0"),
            (bool(self.model) and bool(self.data), "model and data must be given (a checkpoint folder and a pairs JSONL)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)


def lr_at(step, total_steps, warmup_ratio):
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warmup, then cosine to zero."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _coerce(name, value, default):
    """Convert a parsed value to the type of the field's default, with an error naming the key."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            items = tuple(value)
            if default and not isinstance(default[0], str):
                items = tuple(type(default[0])(v) for v in items)
            return items
        if isinstance(default, int) and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError  # no silent truncation of 8.5 (or True) to an int
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"TrainConfig: {name}={value!r} is not a valid {type(default).__name__}") from None


def _valid_keys():
    return [f.name for f in dataclasses.fields(TrainConfig)]


def make_config(values):
    """TrainConfig from a dict; an unknown key raises an error that lists the valid keys."""
    defaults = TrainConfig()
    unknown = sorted(set(values) - set(_valid_keys()))
    if unknown:
        raise ValueError(f"TrainConfig: unknown key(s) {unknown}; valid keys: {', '.join(_valid_keys())}")
    return TrainConfig(**{k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items()})


def read_config_file(path):
    """Read a YAML or JSON config file into a dict (parsed, never evaluated)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot parse config: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of keys to values")
    return values


def parse_overrides(tokens):
    """['--lr', '1e-4', '--qlora', 'true'] or ['--lr=1e-4'] -> {'lr': 1e-4, 'qlora': True} (YAML scalars)."""
    values, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(f"expected --key value, got {token!r}")
        key = token[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            raw = tokens[i + 1]
            i += 2
        else:
            raw = "true"  # a bare flag
            i += 1
        values[key] = yaml.safe_load(raw) if raw != "" else ""
    return values


def load_config(path=None, overrides=()):
    """The config file (if any) with `--key value` overrides applied, validated."""
    values = read_config_file(path) if path else {}
    values.update(parse_overrides(list(overrides)))
    return make_config(values).validate()

