"""`sealong.train`: fine-tune a model on SEALONG's self-supervision (ORPO on MBR pairs, or SFT on the best).

One plain process (CPU or one GPU):

    python -m sealong.train --model /models/Llama-3.1-8B-Instruct --data run/pairs.jsonl --output_dir run/train

Eight GPUs as the paper trained (sequence parallel 8, one 32K-token pair at a time; the authors' config gives
64 pairs per optimizer step: XTuner multiplies its accumulation 8 by the SP size 8; the paper's text says batch 8):

    torchrun --standalone --nproc_per_node=8 -m sealong.train --model /models/Llama-3.1-8B-Instruct \
        --data run/pairs.jsonl --output_dir run/train --sp 8 --batch_pairs 64   # ring; --ulysses 8 or 2 for Ulysses / hybrid

Several nodes: torchrun's usual rendezvous flags (`--nnodes 2 --rdzv_backend c10d --rdzv_endpoint host:29500`);
with 16 GPUs and `--sp 8` that is dp 2. Every field of `TrainConfig` (sealong/train/config.py) is a flag
(`--lora_r 8` or `--lora-r 8`, HF / TRL names as aliases: `--learning_rate`, `--num_train_epochs`, ...) and a key
of the `train:` section of a `--config` file; `--resume` continues from the newest checkpoint in `output_dir`.
`sealong train ...` is the same through the CLI. The resolved config is written to `output_dir/config.json`.

The loop (nanoGPT's shape):
* a mesh of dp x sp ranks (`sealong.train.parallel`): a pair's sequence is split over its sp group (ring, Ulysses
  or hybrid attention) with global positions; dp groups take different pairs;
* each optimizer step sees `batch_pairs` pairs: dp x micro_batch_pairs x accumulation (derived, asserted);
* the loss of a micro-step is its share of the batch loss, normalised by the batch's chosen tokens and
  pairs (sealong/train/loss.py), so gradients summed over micro-steps and all dp x sp ranks are exact; with
  `pair_weighting: margin` each pair's terms weigh its score margin over the mean margin (still exact);
* with several ranks, FSDP2 (sealong/train/fsdp.py) shards weights, gradients and AdamW states over all of them
  and reduce-scatters (sums) gradients in every backward; `data_parallel: replicate` keeps a full copy per rank
  and all-reduces gradients once, after the last micro-step;
* AdamW, linear warmup then cosine to zero, clipping, float16 loss scaling when asked;
* metrics.jsonl (every ORPO metric), TensorBoard or W&B (--report_to), a progress bar on rank 0 when stderr is
  a terminal, otherwise a log line every few seconds (steps, rate, time left, loss: sealong.progress);
* checkpoints every `save_every` steps and at the end (sealong/train/checkpoint.py; sharded under FSDP).

Reliability: rank 0 locks `output_dir` for the run (sealong.lock) and writes `output_dir/meta.json`
(sealong.provenance); every collective waits at most `dist_timeout` seconds and a rank that stops arriving is
named (sealong.train.watchdog); loss and gradient norm are checked finite every step and the parameters before
every save (NonFiniteError: nothing non-finite is ever saved).
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time

import torch

from sealong import provenance
from sealong.jsonl import append_jsonl
from sealong.lock import OutputError, OutputLock

from . import checkpoint as ckpt
from . import fsdp
from .distributed import all_reduce_grads, all_reduce_sum, cleanup, print0, setup
from .pairs import label_counts, load_pairs, prompt_label_count
from .config import TrainConfig, lr_at
from .loss import METRIC_NAMES, metric_means
from .micro import build_micro_batch, micro_step_loss
from .mesh import TrainMesh
from .watchdog import Heartbeat, check_timeout

log = logging.getLogger("sealong.train")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------------------
# Model: the lean model, optional NF4 base weights, LoRA through peft
# ---------------------------------------------------------------------------------------------------------


def quantize_base_linears(model, targets, compute_dtype):
    """Replace the target nn.Linear layers by bitsandbytes NF4 (double-quantized) Linear4bit layers."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name not in targets or type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device=child.weight.device)
            layer.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype).cpu(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
            layer = layer.to(child.weight.device)  # moving quantizes
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, layer)
    return model


def build_model(cfg, device, weights_dtype=None):
    """The model to train: (module to call, lm_head module, trainable parameters).

    `weights_dtype`: the dtype the weights are stored in when not cfg.dtype (FSDP's float32 masters)."""
    from sealong.model import load_model

    dtype = DTYPES[cfg.dtype]
    model = load_model(cfg.model, dtype=weights_dtype or dtype, device=device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.finetune == "full":
        return model, model.lm_head, [p for p in model.parameters() if p.requires_grad]
    from peft import LoraConfig, get_peft_model

    if cfg.lora_r > model.config.hidden_size:  # rank above the smallest side of a layer: no lower-rank update
        log.warning(f"lora_r={cfg.lora_r} is larger than the model's hidden size {model.config.hidden_size}: the "
                    "adapters are full-rank updates (more memory and parameters than full fine-tuning of those "
                    "linears); a rank below the hidden size is what LoRA means")
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.qlora:
        quantize_base_linears(model, set(cfg.lora_targets), dtype)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none")
    peft_model = get_peft_model(model, lora)  # adapters in float32 (peft's autocast_adapter_dtype)
    return peft_model, model.lm_head, [p for p in peft_model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------------
# Data order: every rank knows the whole batch (its counts are the loss denominators), takes its share
# ---------------------------------------------------------------------------------------------------------


def epoch_order(num_pairs, epoch, seed):
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(num_pairs, generator=g).tolist()


def batch_indices(step, num_pairs, steps_per_epoch, cfg):
    epoch, index = divmod(step, steps_per_epoch)
    order = epoch_order(num_pairs, epoch, cfg.seed)
    return epoch, order[index * cfg.batch_pairs:(index + 1) * cfg.batch_pairs]


# ---------------------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------------------


def train_step(model, lm_head, params, optimizer, scaler, batch, cfg, mesh, device, heartbeat=None, step=0):
    """Forward/backward over this rank's micro-batches of `batch` (a list of pairs), reduce, clip, step.
    `heartbeat` (sealong.train.watchdog) is told each phase of optimizer step `step` and the collective it waits
    in next, so that a rank stuck in any of them is named."""
    sharded = fsdp.is_sharded(model)
    mark = (lambda phase, waits_in: heartbeat.mark(step, phase, waits_in)) if heartbeat else (lambda *_: None)
    accum = cfg.grad_accum_steps(mesh.dp)
    chosen_tokens = sum(label_counts(p)[0] for p in batch)
    prompt_tokens = sum(prompt_label_count(p) for p in batch) if cfg.nll_tokens == "all" else 0
    # every micro-step's rows, loss entries and checks, on the host, before any forward (build_micro_batch)
    micros = [build_micro_batch(batch[start:start + cfg.micro_batch_pairs], cfg, mesh, device, lm_head)
              for start in ((m * mesh.dp + mesh.dp_rank) * cfg.micro_batch_pairs for m in range(accum))]
    sums_of = torch.zeros(len(METRIC_NAMES) + 2, dtype=torch.float64, device=device)  # metric sums, loss, tokens
    tokens = 0
    for micro in micros:
        mark("forward", "the forward all-gather" if sharded else "the forward's sequence-parallel exchange")
        loss, metrics = micro_step_loss(model, lm_head, micro, cfg, mesh, chosen_tokens, len(batch), prompt_tokens)
        # `loss` is this micro-batch's share of the batch loss (batch-wide denominators): no 1/accum here
        mark("backward", "the backward's all-gathers / reduce-scatters" if sharded
             else "the backward's sequence-parallel exchange")
        (scaler.scale(loss) if scaler is not None else loss).backward()
        # every rank of an sp group computed the same (global) loss and metrics: count them once; device
        # tensors, read once per optimizer step (below)
        sums_of[:len(METRIC_NAMES)] += metrics / mesh.sp
        sums_of[-2] += loss.detach().double() / mesh.sp
        tokens += micro.tokens
    sums_of[-1] += tokens  # a host number added on the device: no read
    if not sharded:  # FSDP reduce-scattered the gradients (a SUM) in backward
        mark("gradient all-reduce", "the gradient all-reduce")
        all_reduce_grads(params)  # every rank holds part of the same batch: SUM over dp x sp
    mark("optimizer step", "the gradient-norm all-reduce" if sharded else "the metrics all-reduce")
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    grad_norm = fsdp.local_value(grad_norm)  # a DTensor under FSDP
    if scaler is not None:
        scaler.step(optimizer)  # skipped (and the scale lowered) when a gradient is inf / NaN
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("metrics all-reduce", "the metrics all-reduce")
    sums_of = all_reduce_sum(sums_of)  # on the device: NCCL reduces CUDA tensors only
    # the step's one read of the device: metrics, loss, tokens and the gradient norm together
    values = torch.cat([sums_of, grad_norm.detach().double().reshape(1).to(device)]).cpu()
    record = {"loss": values[-3].item()}
    names = METRIC_NAMES if cfg.mode == "orpo" else ("logps/chosen", "nll_loss", "logits/chosen")
    means = metric_means(values, len(batch), [sum(label_counts(p)[k] for p in batch) for k in (0, 1)],
                         cfg.nll_reduction, nll_tokens=chosen_tokens + prompt_tokens)
    record.update({name: means[name] for name in names})
    record.update(grad_norm=values[-1].item(), tokens=int(values[-2].item()))
    if scaler is not None:
        record["loss_scale"] = float(scaler.get_scale())
    return record


# ---------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------


class Logger:
    """metrics.jsonl (append; trimmed back to the resumed step), TensorBoard or W&B (`report_to`), and the progress
    (sealong.progress): a tqdm bar when stderr is a terminal (or `progress` true), else a log line at most every
    few seconds: steps done of all, steps/s, time left, loss, lr, grad_norm, tokens/s."""

    def __init__(self, cfg, is_main, start_step, total_steps):
        self.is_main, self.path = is_main, os.path.join(cfg.output_dir, "metrics.jsonl")
        self.writer, self.wandb, self.bar, self.total = None, None, None, total_steps
        if not is_main:
            return
        os.makedirs(cfg.output_dir, exist_ok=True)
        self._trim(start_step)
        if cfg.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
            except ImportError:
                log.warning("report_to=tensorboard, but tensorboard is not installed (pip install "
                            "'sealong[logging]'): metrics go to metrics.jsonl only")
        elif cfg.report_to == "wandb":
            try:
                import wandb
                self.wandb = wandb.init(project="sealong", dir=cfg.output_dir, config=cfg.to_dict())
            except ImportError:
                log.warning("report_to=wandb, but wandb is not installed (pip install 'sealong[logging]'): "
                            "metrics go to metrics.jsonl only")
        from sealong.progress import Progress

        self.bar = Progress(total_steps, "steps", "train", log, bar=cfg.progress, initial=start_step)

    def _trim(self, start_step):
        """Drop lines of steps after the resumed checkpoint (written before a crash), atomically."""
        if not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line torn by the crash
                    continue
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def log(self, step, record, write):
        if not self.is_main:
            return
        if write:  # a full disk: OutputError, the lines before are kept
            append_jsonl(self.path, [{"step": step, **record}], fsync=False)
            if self.writer is not None:
                for key, value in record.items():
                    self.writer.add_scalar(f"train/{key}", value, step)
            if self.wandb is not None:
                self.wandb.log({f"train/{k}": v for k, v in record.items()}, step=step)
        if self.bar is not None:
            self.bar.update(1, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                            grad_norm=f"{record['grad_norm']:.3g}", **{"tokens/s": f"{record['tokens_per_s']:.0f}"})

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, info, on_step=None):
    """Train per `cfg` on this rank; returns {"steps", "losses", "checkpoint", "data"} (rank-local copy).

    `on_step(step, record)` is called after every optimizer step (a hook for callers and tests). Rank 0 first
    claims `output_dir` (writable, one run at a time: sealong.lock); every rank stops if it cannot. A collective
    that times out raises StuckRankError naming the ranks that did not arrive and their phase (a heartbeat per
    rank, sealong.train.watchdog); the newest complete checkpoint stays as it was.
    """
    heartbeat = Heartbeat(cfg.dist_timeout)
    try:
        with claim_output_dir(cfg, info):
            return _train(cfg, info, on_step, heartbeat)
    except BaseException as err:  # a backend's timeout: RuntimeError; DCP's: CheckpointException(BaseException)
        stuck = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else heartbeat.diagnose(err)
        if stuck is None:
            raise
        raise stuck from err
    finally:
        heartbeat.close()


@contextlib.contextmanager
def claim_output_dir(cfg, info):
    """Rank 0 checks and locks output_dir for the whole run; the other ranks learn the outcome (one all-reduce)."""
    lock, error = OutputLock(cfg.output_dir, directory=True, what="output_dir"), None
    if info.is_main:
        try:
            lock.acquire()
        except OutputError as err:
            error = err
    failed = all_reduce_sum(torch.tensor([float(error is not None)], device=info.device)).item()
    try:
        if error is not None:
            raise error
        if failed:
            raise OutputError(f"output_dir {cfg.output_dir}: rank 0 could not claim it (see its error)")
        yield
    finally:
        lock.release()


def _train(cfg, info, on_step, heartbeat):
    device = info.device
    existing = ckpt.latest_checkpoint(cfg.output_dir)
    if existing is not None and not cfg.resume:
        # a fresh run would interleave its checkpoints with the old ones: pruning keeps the newest steps (the
        # old run's) and deletes the new ones, and a later --resume would continue the old run
        raise ValueError(f"{cfg.output_dir} already holds checkpoints (newest: {existing}): pass --resume true "
                         "to continue that run, or choose another output_dir")
    if info.is_main and not (existing and provenance.read_meta(cfg.output_dir, directory=True)):
        settings = dict(cfg.to_dict(), data_sha256=provenance.file_sha256(cfg.data))  # a resumed run keeps its own
        provenance.write_meta(cfg.output_dir, provenance.stage_meta("train", settings, cfg.model), directory=True)
    mesh = TrainMesh.build(cfg, info)
    cfg.grad_accum_steps(mesh.dp)  # fails early with the sizes when the batch does not divide
    if info.is_main:
        write_config(cfg)
    from sealong.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = load_pairs(cfg.data, tokenizer, mode=cfg.mode, max_length=cfg.max_length, strategy=cfg.prompt_strategy,
                      pair_weighting=cfg.pair_weighting)  # margin weights: normalized over all pairs, on every rank
    steps_per_epoch = len(data.pairs) // cfg.batch_pairs
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data}: {data.summary()}: fewer usable pairs than batch_pairs={cfg.batch_pairs}")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs  # the schedule's length
    print0(f"data: {data.summary()}; {steps_per_epoch} steps per epoch "
           f"({len(data.pairs) % cfg.batch_pairs} pairs left out of each epoch), {total_steps} steps")
    print0(f"mesh: dp={mesh.dp} sp={mesh.sp} (ulysses {mesh.dims.ulysses} x ring {mesh.dims.ring}); "
           f"batch {cfg.batch_pairs} pairs = dp {mesh.dp} x micro {cfg.micro_batch_pairs} x accumulation "
           f"{cfg.grad_accum_steps(mesh.dp)}")

    torch.manual_seed(cfg.seed)  # same LoRA initialisation on every rank
    sharded = fsdp.use_fsdp(cfg, info.world_size)
    # FSDP: read onto the CPU; fully_shard moves each layer's shard to the device (peak: shards + one layer)
    model, lm_head, params = build_model(cfg, torch.device("cpu") if sharded else device,
                                         fsdp.master_dtype(cfg) if sharded else None)
    if sharded:
        fsdp.shard_model(model, fsdp.fsdp_mesh(device), fsdp.compute_dtype(cfg, DTYPES[cfg.dtype]))
        params = [p for p in model.parameters() if p.requires_grad]  # the sharded DTensor parameters
    torch.manual_seed(cfg.seed + 7919 * (info.rank + 1))  # per-rank dropout streams
    print0(f"model: {cfg.finetune}{' (QLoRA NF4)' if cfg.qlora else ''}, "
           f"{sum(p.numel() for p in params):,} trainable parameters, {cfg.dtype}, "
           f"{f'FSDP2 over {info.world_size} ranks' if sharded else 'replicated' if info.world_size > 1 else 'one process'}")
    warning = None if sharded else precision_warning(cfg)  # FSDP keeps float32 masters
    if warning:
        print0(f"warning: {warning}")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, cfg.warmup_ratio))
    scaler = None
    if cfg.dtype == "float16" and cfg.loss_scaling:
        scaler = torch.amp.GradScaler(device.type)

    step, saved = 0, None
    if cfg.resume:
        path = ckpt.latest_checkpoint(cfg.output_dir)
        if path is None:
            print0(f"resume: no checkpoint in {cfg.output_dir}, starting from scratch")
        else:
            check_resumable(path, cfg, total_steps, data.summary())
            state = ckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                         finetune=cfg.finetune, rank=info.rank, device=device)
            step, saved = state["step"], path
            print0(f"resume: {path} (step {step} of {total_steps})")
    stop = total_steps
    logger = Logger(cfg, info.is_main, step, stop)
    losses = []

    def save(at_step):
        heartbeat.mark(at_step, "checkpoint save", "the checkpoint save's collectives")
        state = {"step": at_step, "total_steps": total_steps, "epoch": at_step // steps_per_epoch,
                 "pairs_seen": at_step * cfg.batch_pairs, "world_size": info.world_size,
                 "data": data.summary(), "train_config": cfg.to_dict(),
                 "model_config": model_config_dict(model)}
        return ckpt.save_checkpoint(cfg.output_dir, at_step, model=model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=scaler, state=state, finetune=cfg.finetune, rank=info.rank,
                                    keep=cfg.keep_checkpoints, export_dtype=DTYPES[cfg.dtype])

    model.train()
    try:
        while step < stop:
            started = time.perf_counter()
            epoch, indices = batch_indices(step, len(data.pairs), steps_per_epoch, cfg)
            record = train_step(model, lm_head, params, optimizer, scaler, [data.pairs[i] for i in indices],
                                cfg, mesh, device, heartbeat, step + 1)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            heartbeat.mark(step, "logging and checks", "the next step's collectives")
            elapsed = time.perf_counter() - started
            record.update(epoch=epoch, lr=lr, tokens_per_s=record["tokens"] / max(elapsed, 1e-9),
                          step_time_s=elapsed)
            check_finite(step, record, params if step == stop or (cfg.save_every > 0 and step % cfg.save_every == 0)
                         else (), scaler is not None, cfg, saved)
            losses.append(record["loss"])
            logger.log(step, record, write=step % cfg.log_every == 0 or step == stop)
            if cfg.save_every > 0 and step % cfg.save_every == 0 and step < stop:
                saved = save(step)
            if on_step is not None:
                on_step(step, record)
        if step > 0 and (saved is None or not saved.endswith(f"step_{step:06d}")):
            saved = save(step)
    finally:
        logger.close()
    return {"steps": step, "losses": losses, "checkpoint": saved, "data": data.summary()}


class NonFiniteError(ValueError):
    """A step produced a non-finite loss, gradient norm or parameter; nothing of it was saved."""


def check_finite(step, record, params, scaled, cfg, saved):
    """Stop before anything non-finite is saved: the loss and gradient norm of every step (not under float16
    loss scaling, whose scaler skips such steps itself) and the updated parameters before each checkpoint."""
    bad = [] if scaled else [f"{name} {record[key]}" for name, key in (("loss", "loss"), ("gradient norm", "grad_norm"))
                             if not math.isfinite(record[key])]
    count = sum(int((~torch.isfinite(p.detach())).sum()) for p in params)
    if count:
        bad.append(f"{count} non-finite values in the updated parameters")
    if bad:
        raise NonFiniteError(
            f"step {step}: {', '.join(bad)} (lr={cfg.lr:g}, dtype={cfg.dtype}: try a lower lr or dtype=float32); "
            f"no checkpoint of this step was written; newest saved checkpoint: {saved or 'none'}")


def precision_warning(cfg):
    """Full fine-tuning updates the model's own 16-bit weights in place (no float32 master copy): an AdamW
    step of about lr per weight is below half the rounding step of most bfloat16 weights (|w| ~ 0.02: step
    6e-5), so at the paper's lr 5e-6 most updates round away. LoRA adapters are float32 and unaffected."""
    if cfg.finetune == "full" and cfg.dtype != "float32":
        return (f"finetune=full with dtype={cfg.dtype} updates {cfg.dtype} weights in place without float32 master "
                f"weights: updates of about lr={cfg.lr:g} mostly round away; use dtype=float32 or LoRA")
    return None


def check_resumable(path, cfg, total_steps, data_summary):
    """A checkpoint continues only with the same data order (same pairs, seed and batch: the pairs of step s
    depend on nothing else). Other epochs are allowed (more training), with a note: the schedule changes."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    saved_cfg = state.get("train_config", {})
    same = lambda a, b: (list(a) == list(b)) if isinstance(b, (list, tuple)) else a == b  # noqa: E731 (JSON lists)
    differ = [f"{key}: checkpoint {saved_cfg[key]!r}, now {getattr(cfg, key)!r}"
              for key in ("seed", "batch_pairs", "mode", "finetune", "pair_weighting")
              + (("lora_r", "lora_alpha", "lora_targets") if cfg.finetune == "lora" else ())
              if key in saved_cfg and not same(saved_cfg[key], getattr(cfg, key))]
    if "data" in state and state["data"] != data_summary:
        differ.append(f"data: checkpoint '{state['data']}', now '{data_summary}'")
    if state.get("total_steps", total_steps) != total_steps:
        print0(f"resume: the checkpoint's run had {state['total_steps']} steps, this one {total_steps} "
               "(other epochs): the learning-rate schedule follows the new total")
    if differ:
        raise ValueError(f"--resume: {path} was saved by a different run; it cannot continue exactly "
                         f"({'; '.join(differ)}). Use the same settings and data, or another output_dir")


def model_config_dict(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.to_dict() if hasattr(base.config, "to_dict") else dataclasses.asdict(base.config)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def write_config(cfg):
    """output_dir/config.json: the resolved TrainConfig of this run (every option, wherever it was set)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    os.replace(path + ".tmp", path)


def run(cfg: TrainConfig) -> int:
    info = setup(cfg.device, timeout=check_timeout(cfg.dist_timeout))
    try:
        result = train(cfg, info)
    finally:
        cleanup(info)
    if info.is_main:  # to the log (stderr), not stdout: the pipeline prints its summary there
        log.info(f"done: {result['steps']} steps; final checkpoint {result['checkpoint']}")
    return 0


def kept_on_interrupt(cfg: TrainConfig) -> str:
    """What a Ctrl-C leaves (sealong.interrupt): the newest checkpoint in output_dir, and how to continue."""
    path = ckpt.latest_checkpoint(cfg.output_dir)
    if path is None:
        return (f"no checkpoint in {cfg.output_dir} yet (save_every {cfg.save_every}); the same command starts "
                "again")
    how = "the same command resumes from it" if cfg.resume else "the same command with --resume continues from it"
    return f"checkpoint {path} kept; {how}"


def main(argv=None):
    from sealong.config.parser import stage_main

    return stage_main("train", argv, prog="python -m sealong.train")


if __name__ == "__main__":
    sys.exit(main())
