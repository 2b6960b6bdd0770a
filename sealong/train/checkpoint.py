"""Checkpoints of `sealong.train`: trained weights, configs, data position, loop, optimizer and RNG states.

    output_dir/checkpoints/step_000040/
        adapter/                 LoRA in PEFT format (adapter_config.json + adapter_model.safetensors + a
                                 model card README.md), loadable with PeftModel.from_pretrained onto
                                 transformers' model or on its own: AutoPeftModelForCausalLM.from_pretrained(adapter)
        model.safetensors        full fine-tuning only: every weight, Hugging Face names
        state.json               train config, model config, step, data position, counts, loop state
        optimizer.pt             optimizer, scheduler and loss-scaler states (read with weights_only=True)
        dcp/                     FSDP2 runs (sealong/train/fsdp.py): each rank's shards of the trained weights
                                 and optimizer states (torch.distributed.checkpoint), read on resume; optimizer.pt
                                 then holds the scheduler and scaler only, and adapter/ or model.safetensors the
                                 gathered weights (full fine-tuning: in the compute dtype)
        rng_rank{r}.pt           each rank's torch RNG states (dropout), so a resumed run draws the same masks

A checkpoint is written into `step_N.tmp`, flushed to disk (fsync of every file and folder) and only then
renamed to `step_N`; older checkpoints are pruned after the rename. A crash during a save (even a power
loss) leaves the previous checkpoint untouched, and a `.tmp` folder is never read.
"""

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from sealong.jsonl import fsync_path as _fsync  # a file, or a folder's entries
from sealong.lock import disk_full

from . import fsdp
from .distributed import barrier

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(output_dir, step):
    return os.path.join(output_dir, "checkpoints", f"step_{step:06d}")


def list_checkpoints(output_dir):
    """Complete checkpoints in output_dir, oldest first, as (step, path)."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir):
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _fsync_tree(root):
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def save_checkpoint(output_dir, step, *, model, optimizer, scheduler, scaler, state, finetune, rank, keep=2,
                    export_dtype=None):
    """Write a complete checkpoint for `step` (every rank calls this; rank 0 writes the shared files).

    `export_dtype`: the dtype of an FSDP run's exported model.safetensors (None: the stored dtype). A full disk
    raises OutputError naming the newest complete checkpoint, which is kept (the torn `.tmp` folder is removed
    to give the space back)."""
    final = checkpoint_dir(output_dir, step)
    try:
        return _save(output_dir, step, final, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                     state=state, finetune=finetune, rank=rank, keep=keep, export_dtype=export_dtype)
    except OSError as err:
        kept = latest_checkpoint(output_dir)
        full = disk_full(err, f"saving checkpoint {final}",
                         f"nothing of it was published; {'the newest complete checkpoint ' + kept if kept else 'no earlier checkpoint'}"
                         " is kept (resume from it with --resume true after freeing space)")
        if full is None:
            raise
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        raise full from None


def _save(output_dir, step, final, *, model, optimizer, scheduler, scaler, state, finetune, rank, keep, export_dtype):
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    _fsync(os.path.join(tmp, f"rng_rank{rank}.pt"))
    sharded = fsdp.is_sharded(model)
    if sharded:  # collectives: every rank writes its shards, then the export is gathered to rank 0
        fsdp.save_sharded(os.path.join(tmp, "dcp"), model, optimizer, finetune)
        export = fsdp.full_export(model, finetune, export_dtype)
    if rank == 0:
        if finetune == "lora":
            save_adapter(model, os.path.join(tmp, "adapter"), state, export if sharded else None)
        elif sharded:
            save_file(export, os.path.join(tmp, "model.safetensors"))
        else:
            save_model(model, os.path.join(tmp, "model.safetensors"))  # tied weights stored once
        torch.save({"optimizer": None if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None},
                   os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
    barrier()  # every rank's RNG file is in place before the rename publishes the checkpoint
    if rank == 0:
        _fsync_tree(tmp)  # on disk before it is published and before older checkpoints are pruned
        old = final + ".old"
        if os.path.exists(final):  # a checkpoint of the same step: moved aside, removed once replaced
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(os.path.dirname(final))
        shutil.rmtree(old, ignore_errors=True)
        _prune(output_dir, keep)
    barrier()
    return final


def save_adapter(model, folder, state, state_dict=None):
    """The LoRA adapter in PEFT format, loadable by transformers + peft alone: task_type CAUSAL_LM (so peft
    writes no `auto_mapping` to sealong's model class and AutoPeftModelForCausalLM knows the head),
    base_model_name_or_path = the absolute model folder of the run, and a model card (README.md) with the
    settings, the data summary and how to load it. `state_dict`: the adapter weights gathered from FSDP shards."""
    train_cfg = state.get("train_config", {})
    base = train_cfg.get("model") or None
    if base and os.path.isdir(base):
        base = os.path.abspath(base)
    for config in model.peft_config.values():
        config.task_type = "CAUSAL_LM"
        config.base_model_name_or_path = base
    # sealong never resizes the embeddings; "auto" would read the base config through sealong's model class
    model.save_pretrained(folder, save_embedding_layers=False, **({"state_dict": state_dict} if state_dict is not None else {}))
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:  # replaces peft's empty card
        f.write(model_card(state, base))


def model_card(state, base):
    """Markdown model card of a sealong adapter: what it is, how to load it, the run's settings and data."""
    cfg = state.get("train_config", {})
    settings = "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in sorted(cfg.items()))
    return f"""---
library_name: peft
pipeline_tag: text-generation
tags: [sealong, {cfg.get("mode", "orpo")}, lora]
---

# sealong LoRA adapter

A LoRA adapter trained by `sealong.train` ({cfg.get("mode", "orpo").upper()} on the model's own MBR-scored outputs,
SEALONG, arXiv 2411.08147) on the base model `{base}`; step {state.get("step")} of {state.get("total_steps")}
({state.get("epoch")} epochs completed, {state.get("pairs_seen")} pairs seen).

Data: {state.get("data", "unknown")}.

## Load

```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")   # loads the base model above
```

## Settings

| key | value |
| --- | --- |
{settings}
"""


STALE_DIR = re.compile(r"^step_\d+\.(tmp|old)$")


def _prune(output_dir, keep):
    """Remove all but the `keep` newest checkpoints (0: keep all), and the folders of saves torn by a crash."""
    found = list_checkpoints(output_dir)
    for _, path in found[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    root = os.path.join(output_dir, "checkpoints")
    for name in os.listdir(root):
        if STALE_DIR.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _check_finite(path, named):
    """A run never continues from NaN / inf weights (e.g. a checkpoint saved by a version without the check)."""
    bad = [name for name, t in named if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{path}: non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]}: this checkpoint cannot "
                         "be resumed; delete it to resume from an earlier one, or start a new output_dir")


def load_checkpoint(path, *, model, optimizer, scheduler, scaler, finetune, rank, device):
    """Restore weights, optimizer, scheduler, scaler and this rank's RNG; return state.json's dict."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    if fsdp.is_sharded(model):
        fsdp.load_sharded(os.path.join(path, "dcp"), model, optimizer, finetune)
    elif finetune == "lora":
        from peft import set_peft_model_state_dict
        weights = load_file(os.path.join(path, "adapter", "adapter_model.safetensors"), device=str(device))
        _check_finite(path, weights.items())
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{path}: adapter has weights the model lacks, e.g. {unexpected[:3]}")
    else:
        load_model(model, os.path.join(path, "model.safetensors"), device=str(device))
        _check_finite(path, model.named_parameters())
    states = torch.load(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=True)
    if (states["optimizer"] is None) != fsdp.is_sharded(model):
        raise ValueError(f"{path}: saved {'with' if states['optimizer'] is None else 'without'} FSDP; resume with "
                         "the same data_parallel setting and world size")
    if states["optimizer"] is not None:
        optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    if scaler is not None and states["scaler"] is not None:
        scaler.load_state_dict(states["scaler"])
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_file):
        raise FileNotFoundError(f"{path}: no RNG state for rank {rank}: resume with the world size that saved it")
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
