"""TrainConfig: every setting of `sealong train`, with the paper's defaults (SEALONG trained with XTuner's ORPO:
the authors' code, SihengLi99/SEALONG configs/xtuner_orpo_qlora.py), and the learning-rate schedule.

Set from the `train` section of a config file, a preset, or flags (sealong.config.parser); the names that
transformers / TRL users type are aliases (`--learning_rate` for `--lr`, `--num_train_epochs`, `--save_steps`,
`--per_device_train_batch_size`, ...). Importing this module imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from sealong.config.fields import Checked, ConfigError, check_required, coerce, canonical, option

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig(Checked):
    """`sealong train` / `python -m sealong.train`: ORPO or SFT on the pairs, LoRA / QLoRA / full."""

    stage: ClassVar[str] = "train"
    # -- data and model -------------------------------------------------------------------------------------
    model: str = option("", "checkpoint folder (config.json, safetensors, tokenizer)", required=True)
    data: str = option("", "pairs JSONL from the scoring stage (or SFT records with chosen_text)", required=True)
    output_dir: str = option("runs/train", "checkpoints, metrics.jsonl, config.json, tracker logs")
    mode: Literal["orpo", "sft"] = option("orpo", "orpo (chosen vs rejected) or sft (chosen only)")
    layout: Literal["packed", "classic"] = option(
        "packed", "packed: prompt + chosen + rejected in one sequence; classic: two sequences")
    max_length: int = option(32768, "longest sequence (prompt + one answer); longer prompts are cut in the middle",
                             ge=16)
    prompt_strategy: str = option("plan_and_solve", "prompt template for records with context + question")
    # -- LoRA / QLoRA / full fine-tuning ---------------------------------------------------------------------
    finetune: Literal["lora", "full"] = option("lora", "lora (adapters through peft) or full (every weight)")
    lora_r: int = option(128, "LoRA rank", ge=1)
    lora_alpha: int = option(128, "LoRA scaling numerator (scale = alpha / r)", ge=1)
    lora_dropout: float = option(0.05, "dropout on the LoRA input", ge=0, lt=1)
    lora_targets: list[str] = option(factory=lambda: list(LORA_TARGETS), aliases=["lora_target_modules"],
                                     help="module names that get adapters (all attention and MLP linears; "
                                     "`all-linear`, peft's name, is the same)")
    qlora: bool = option(False, "base linears stored as bitsandbytes NF4 with double quantization")
    dtype: Literal["bfloat16", "float16", "float32"] = option(
        "bfloat16", "compute dtype of the base model (float16: with loss scaling)")
    loss_scaling: bool = option(True, "dynamic loss scaling when dtype is float16 (ignored otherwise)")
    gradient_checkpointing: bool = option(True, "recompute each decoder layer in the backward pass")
    # -- optimization ----------------------------------------------------------------------------------------
    lr: float = option(5e-5, "peak learning rate (the paper's LoRA setting; 5e-6 for full fine-tuning)",
                       aliases=["learning_rate"], gt=0)
    epochs: int = option(1, "passes over the data (unless --max_steps is set)", aliases=["num_train_epochs"], ge=1)
    batch_pairs: int = option(8, "effective batch: pairs per optimizer step over all ranks and micro-steps", ge=1)
    micro_batch_pairs: int = option(1, "pairs per data-parallel rank per micro-step (1 with sequence parallel)",
                                    aliases=["per_device_train_batch_size"], ge=1)
    gradient_accumulation_steps: Optional[int] = option(
        None, "micro-steps per optimizer step; when set, batch_pairs = dp x micro_batch_pairs x this", ge=1)
    beta: float = option(0.1, "ORPO odds-ratio weight", ge=0)
    nll_weight: float = option(1.0, "weight of the NLL term on chosen tokens", ge=0)
    nll_reduction: Literal["sequence", "token"] = option(
        "sequence", "sequence: mean over pairs of each chosen response's token mean (XTuner, the authors' training); "
        "token: token mean over the batch's chosen tokens")
    nll_tokens: Literal["answer", "all"] = option(
        "answer", "tokens of the NLL term: answer: the chosen answer's (XTuner's ORPO, the authors' training); all: "
        "every token of prompt + chosen answer after the first (TRL's ORPOTrainer; with nll_reduction=token its "
        "exact NLL)")
    pair_weighting: Literal["none", "margin"] = option(
        "none", "none: every pair weighs 1 (the paper); margin: pair i weighs its MBR score margin m_i = "
        "score(chosen) - score(rejected) (the pairs' score_margin) divided by the mean margin over the training "
        "pairs (mean weight 1, so the learning rate keeps its meaning); Self-Consistency Preference Optimization, "
        "arXiv 2411.04109")
    weight_decay: float = option(0.1, "AdamW weight decay", ge=0)
    adam_betas: list[float] = option(factory=lambda: [0.9, 0.999], help="AdamW betas", ge=0, lt=1)
    adam_eps: float = option(1e-8, "AdamW epsilon", gt=0)
    warmup_ratio: float = option(0.05, "linear warmup over this fraction of the steps, then cosine to zero",
                                 ge=0, lt=1)
    max_grad_norm: float = option(1.0, "gradient-norm clipping (0 disables)", ge=0)
    max_steps: int = option(0, "optimizer steps of the run and of its learning-rate schedule (0: epochs x steps "
                            "per epoch); more than one epoch's steps go on into the next epochs", ge=0)
    loss_chunk_size: int = option(0, "token chunk of the fused loss (0: the kernel's default)", ge=0)
    # -- parallelism -----------------------------------------------------------------------------------------
    sp: int = option(1, "sequence-parallel degree (ring x Ulysses); dp = world size / sp", ge=1)
    ulysses: int = option(1, "Ulysses degree inside the sequence-parallel group (ring degree = sp / ulysses)", ge=1)
    ring_layout: Literal["zigzag", "plain"] = option("zigzag", "ring sharding: zigzag (balanced causal work) or plain")
    data_parallel: Literal["auto", "fsdp", "replicate"] = option(
        "auto", "fsdp: weights, gradients and AdamW states sharded over all dp x sp ranks (FSDP2, "
        "sealong/train/fsdp.py; full fine-tuning keeps float32 masters); replicate: a full copy per rank and a "
        "gradient all-reduce (QLoRA and float16 loss scaling need it); auto: fsdp except for those two. One process "
        "never shards")
    dist_timeout: float = option(600.0, "seconds a collective waits for the other ranks; then the job fails, naming the "
                                 "ranks that did not arrive, the step and their phase (sealong.train.watchdog)", gt=0)
    device: Optional[Literal["cpu", "cuda"]] = option(None, "default: cuda when available")
    # -- bookkeeping -----------------------------------------------------------------------------------------
    seed: int = option(0, "shuffling, LoRA init and dropout")
    save_every: int = option(0, "checkpoint every K optimizer steps (0: only at the end)", aliases=["save_steps"],
                             ge=0)
    keep_checkpoints: int = option(2, "newest checkpoints kept on disk (the final one is always kept)",
                                   aliases=["save_total_limit"], ge=0)
    log_every: int = option(1, "metrics.jsonl line (and text log line) every K steps", aliases=["logging_steps"],
                            ge=1)
    report_to: Literal["none", "tensorboard", "wandb"] = option(
        "none", "experiment tracker besides metrics.jsonl (tensorboard: pip install sealong[logging])")
    resume: bool = option(False, "continue from the newest checkpoint in output_dir",
                          aliases=["resume_from_checkpoint"])
    progress: Optional[bool] = option(
        None, "progress bar on rank 0 (default: when stderr is a terminal; otherwise a log line every few seconds: steps, "
        "rate, time left, loss)")

    def __post_init__(self):
        if list(self.lora_targets) == ["all-linear"]:  # peft's spelling: every linear but the output layer
            self.lora_targets = list(LORA_TARGETS)
        super().__post_init__()

    def checks(self):
        return [
            (not (self.qlora and self.finetune == "full"), "qlora=true needs finetune=lora"),
            (self.sp % self.ulysses == 0, f"sp={self.sp} must be a multiple of ulysses={self.ulysses}"),
            (self.sp == 1 or self.micro_batch_pairs == 1,
             "sequence parallelism runs one pair per micro-step: set micro_batch_pairs=1"),
            (len(self.adam_betas) == 2, f"adam_betas must have two values, got {self.adam_betas}"),
        ]

    def grad_accum_steps(self, dp):
        """Micro-steps per optimizer step: batch_pairs = dp x micro_batch_pairs x accumulation, exactly. With
        gradient_accumulation_steps set (the transformers name), batch_pairs is derived from it here."""
        per_micro = dp * self.micro_batch_pairs
        if self.gradient_accumulation_steps is not None:
            self.batch_pairs = per_micro * self.gradient_accumulation_steps
        if self.batch_pairs % per_micro:
            raise ValueError(
                f"batch_pairs={self.batch_pairs} is not divisible by dp={dp} x micro_batch_pairs={self.micro_batch_pairs}")
        return self.batch_pairs // per_micro

    def validate(self):
        try:
            check_required(self)
        except ConfigError as err:
            raise ConfigError(f"train: {err} (a checkpoint folder and a pairs JSONL)") from None
        return self


def lr_at(step, total_steps, warmup_ratio):
    """Learning-rate multiplier for optimizer step `step` (0-based) of `total_steps`: linear warmup over
    ceil(warmup_ratio x total) steps, then cosine to zero, 0.5 (1 + cos(pi (step - warmup) / (total - warmup)))."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_config(values):
    """TrainConfig from a dict of keys (names or aliases) to values (typed or strings), checked."""
    fields = {}
    for key, value in values.items():
        name = canonical(TrainConfig, key, "train: ")
        try:
            fields[name] = coerce(TrainConfig, name, value)
        except ConfigError as err:
            raise ConfigError(f"train: {err}") from None
    return TrainConfig(**fields)
