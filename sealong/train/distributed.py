"""Start-up, clean-up and rank-0 printing for `sealong.train`: torchrun, an existing process group, or one plain process.

NCCL on GPUs, gloo on CPUs. Under torchrun the usual environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, ...) selects the rendezvous, so several nodes work through torchrun's own flags.
"""

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sealong.launch import die_with_parent

DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait for the other ranks (TrainConfig.dist_timeout)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # we created the process group, so we destroy it

    @property
    def is_main(self):
        return self.rank == 0


def setup(device=None, timeout=DEFAULT_TIMEOUT):
    """Join (or create) the default process group and pick this rank's device.

    A process group created by the caller (a test harness) is used as is; under torchrun one is created, with
    `timeout` seconds for every collective (instead of the backends' 30 minutes), and this worker is set to
    die with torchrun (sealong.launch.die_with_parent); otherwise this is a single process. `device` forces
    "cpu" or "cuda"; the default is CUDA when present.
    """
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but CUDA is not available")
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: never outlive torchrun
        die_with_parent()
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, world, local_rank = 0, 1, 0
    if use_cuda:
        local_rank %= torch.cuda.device_count()
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, world, local_rank, dev, owns)


def cleanup(info):
    """Destroy the process group if `setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args):
    """Log (INFO, logger `sealong.train`) on rank 0 only (every process is rank 0 without a process group)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        logging.getLogger("sealong.train").info(" ".join(str(a) for a in args))


def all_reduce_sum(tensor, group=None):
    """In-place SUM over the group; a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


GRAD_BUCKET = 2**27  # gradient elements per all-reduce buffer (512 MiB in float32)


def all_reduce_grads(params, group=None, bucket_elements=GRAD_BUCKET):
    """Sum the gradients of `params` over the group through flat float32 buffers of at most `bucket_elements`
    (one collective for LoRA-sized models; full fine-tuning never holds a float32 copy of every gradient).
    Used by `data_parallel: replicate` only; FSDP2 reduce-scatters gradients itself (sealong/train/fsdp.py)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel()
        if size >= bucket_elements or i == len(grads) - 1:
            flat = torch.cat([b.reshape(-1).float() for b in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0
