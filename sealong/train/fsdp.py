"""FSDP2 for `sealong.train`: parameters, gradients and AdamW states sharded over every rank (dp x sp).

PyTorch's `torch.distributed.fsdp.fully_shard` replaces the replicated model and the hand-made gradient
all-reduce (`distributed.all_reduce_grads`, kept for `data_parallel: replicate`). The layout follows
torchtitan's `apply_fsdp` (torchtitan/models/llama3/infra/parallelize.py): one FSDP group per decoder layer
plus the root (embeddings, final norm, lm_head), over a 1-D mesh that flattens data parallel x sequence
parallel (torchtitan's dp_shard x cp). Every rank of that mesh holds 1/W of each parameter, gradient and
optimizer state (W = dp x sp = the world size); a layer's weights are all-gathered just before it runs and
freed after (except the last layer and the root, which backward needs at once).

Gradients are SUMmed, not averaged. Each rank's loss is its share of the batch loss (sealong/train/loss.py):
dp ranks hold different pairs, and the ranks of one sp group hold the same pair's token shards, each computing
the gradient through its own tokens (the per-sequence log-prob sums are all-reduced with an identity
gradient). The batch gradient is therefore

    g = sum over all W ranks of g_rank

which is a reduce-scatter with op SUM: `set_gradient_divide_factor(1.0)` (FSDP's default divides by W) and
`set_force_sum_reduction_for_comms(True)` (a plain ReduceOp.SUM, which gloo and NCCL both have).

Mixed precision (`MixedPrecisionPolicy`): full fine-tuning keeps float32 master weights (so AdamW updates
of lr ~ 5e-6 do not round away in bfloat16) and computes in `cfg.dtype`; LoRA keeps the frozen base in
`cfg.dtype` and the adapters in float32, each computing in its own dtype (param_dtype None). Gradients are
reduced in float32 in both.

Not covered (they keep `data_parallel: replicate`): QLoRA (bitsandbytes Params4bit are not plain tensors
and cannot be DTensor-sharded) and float16 loss scaling (torch.amp.GradScaler finds inf / NaN per rank;
the skipped steps would differ between ranks).

Checkpoints (`save_sharded` / `load_sharded`): torch.distributed.checkpoint writes each rank's shards of
the trained weights and optimizer states into `dcp/` (frozen LoRA bases left out), and `full_export`
gathers the plain Hugging Face weights / PEFT adapter to rank 0 for the exported files.
"""

import torch
import torch.distributed as dist

MESH_DIM = "dp_shard_cp"


def base_transformer(model):
    """The sealong Transformer inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(model):
    """True when `model` was wrapped by `shard_model` (its root is an FSDP module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(base_transformer(model), FSDPModule)


def uncovered(cfg):
    """Why FSDP cannot run `cfg` (module docstring), or None."""
    if cfg.qlora:
        return "QLoRA's bitsandbytes NF4 weights cannot be sharded"
    if cfg.dtype == "float16" and cfg.loss_scaling:
        return "float16 loss scaling finds inf / NaN per rank"
    return None


def use_fsdp(cfg, world_size):
    """Whether this run shards with FSDP2: data_parallel "fsdp", or "auto" (the default) where FSDP covers
    the run, on more than one rank (a single process has nothing to shard over and keeps the plain model).
    "fsdp" with an uncovered setting is an error naming it."""
    if cfg.data_parallel == "replicate" or world_size == 1:
        return False
    reason = uncovered(cfg)
    if reason and cfg.data_parallel == "fsdp":
        raise ValueError(f"data_parallel=fsdp: {reason}; set data_parallel=replicate (or auto)")
    return reason is None


def master_dtype(cfg):
    """The dtype the model is loaded in under FSDP: float32 master weights for full fine-tuning."""
    return torch.float32 if cfg.finetune == "full" else None


def compute_dtype(cfg, dtype):
    """FSDP's param_dtype: full fine-tuning computes in `dtype` (cfg.dtype) from its float32 masters; LoRA
    None: the base already is `dtype` and the float32 adapters compute in float32, as peft does unsharded."""
    return dtype if cfg.finetune == "full" else None


def fsdp_mesh(device):
    """The 1-D device mesh of all ranks (dp x sp flattened; ranks = dp_rank * sp + sp_rank)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=(MESH_DIM,))


def shard_model(model, mesh, compute_dtype=None):
    """fully_shard every decoder layer, then the root; gradients summed in float32 over the mesh.

    `compute_dtype`: the dtype layers run in (None: each parameter's own dtype). Returns `model`
    (fully_shard works in place: parameters become DTensors sharded on dim 0; re-read model.parameters()).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if compute_dtype is not None and all(p.dtype == compute_dtype for p in model.parameters()):
        compute_dtype = None  # nothing to cast
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    base = base_transformer(model)
    layers = base.model.layers
    for i, layer in enumerate(layers):
        # the last layer's weights are needed first in backward: keep them gathered (torchtitan does so too)
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    # the root stays gathered after forward: the loss reads lm_head.weight outside the model's forward
    fully_shard(base, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    for module in base.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # SUM over the W ranks (module docstring)
            module.set_force_sum_reduction_for_comms(True)  # ReduceOp.SUM (gloo has no PREMUL_SUM)
    return model


def local_value(x):
    """A DTensor's full value (a collective), anything else as is: for norms returned by clip_grad_norm_."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def local_bytes(tensors):
    """Bytes this rank stores for `tensors` (a DTensor counts its local shard only)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def training_state_bytes(params, optimizer):
    """This rank's bytes of trainable parameters, their gradients and the optimizer's tensor states."""
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
            "optimizer": local_bytes(states)}


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def _options(finetune, **kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: the frozen base is the input model, not training state; leaving it out keeps checkpoints small
    return StateDictOptions(ignore_frozen_params=finetune == "lora", **kwargs)


def save_sharded(folder, model, optimizer, finetune):
    """Every rank writes its shards of the trained weights and of the optimizer states into `folder` (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(finetune))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=folder)


def load_sharded(folder, model, optimizer, finetune):
    """Read `save_sharded`'s folder back into the sharded model and optimizer (any world size for DCP itself)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(finetune))
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=folder)
    # LoRA's state leaves the frozen base out: loading is not strict, so check that only the base is missing
    result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                            options=_options(finetune, strict=finetune != "lora"))
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: the checkpoint does not fit the model: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")


def full_export(model, finetune, dtype=None):
    """The unsharded weights to export, on rank 0 (an empty dict elsewhere; every rank must call this).

    LoRA: the adapter weights only (for peft's save_pretrained(state_dict=...)). Full fine-tuning: every
    weight in `dtype` (the compute dtype: the float32 masters cast to what the model runs in), a tied
    lm_head / embedding stored once under "lm_head.weight" as safetensors' save_model names it.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(finetune, full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    if finetune == "lora":
        return state
    if base_transformer(model).config.tie_word_embeddings:
        state.pop("model.embed_tokens.weight", None)
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in state.items()}
