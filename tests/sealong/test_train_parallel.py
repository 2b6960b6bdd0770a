"""`sealong.train` on several gloo processes (FSDP2, the default with several ranks: DP=2, SP=2 ring, SP=2
Ulysses, SP=2 ring with the classic two-sequence layout, DP x SP = 2 x 2, hybrid Ulysses 2 x ring 2) gives the
losses and LoRA weights of one process (packed layout) on the same data.

Everything is float32 and LoRA dropout is 0 (dropout masks differ with the token split); what differs
between layouts is only the order of floating-point sums (gradient reduce-scatter, ring merges, split loss
sums), so losses agree to 1e-5 relative and the LoRA weights after 3 AdamW steps to 1e-4 relative."""

import os

import pytest
import torch
from gloo_harness import run_distributed
from safetensors.torch import load_file
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from sealong.train.distributed import setup
from sealong.train.loop import train
from sealong.train.config import make_config

LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4


def _config(model, data, out, **overrides):
    values = dict(model=model, data=data, output_dir=out, batch_pairs=4, lr=2e-3, lora_r=4, lora_alpha=8,
                  lora_dropout=0.0, dtype="float32", progress=False, gradient_checkpointing=False)
    values.update(overrides)
    return make_config(values).validate()


def _adapter(result):
    return load_file(os.path.join(result["checkpoint"], "adapter", "adapter_model.safetensors"))


def _train_configs(rank, world_size, runs):
    """Train each (model, data, out, overrides) in turn on this rank; rank 0 returns losses and adapters."""
    info = setup("cpu")
    results = []
    for model, data, out, overrides in runs:
        result = train(_config(model, data, out, **overrides), info)
        # numpy arrays travel by value (tensors would go through shared memory that dies with the worker)
        results.append((result["losses"], {k: v.numpy() for k, v in _adapter(result).items()}) if rank == 0 else None)
    return results


def _relative(a, b):
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def _assert_same(got, want, what):
    losses, weights = got
    ref_losses, ref_weights = want
    assert len(losses) == len(ref_losses) == 3
    err = _relative(torch.tensor(losses, dtype=torch.float64), torch.tensor(ref_losses, dtype=torch.float64))
    assert err < LOSS_RTOL, f"{what}: losses {losses} vs one process {ref_losses} (rel {err:.2e})"
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        err = _relative(torch.as_tensor(weights[key]).double(), ref_weights[key].double())
        assert err < WEIGHT_RTOL, f"{what}: {key} differs from one process by {err:.2e}"


@pytest.mark.slow
def test_dp_sp_ring_ulysses_hybrid_match_one_process(tmp_path):
    model, data = tiny_setup(str(tmp_path), n_pairs=12)
    single = train(_config(model, data, str(tmp_path / "single")), setup("cpu"))
    want = (single["losses"], _adapter(single))
    assert want[0][0] > 0 and all(torch.isfinite(torch.tensor(want[0])))

    two = {"dp2": {}, "sp2_ring": {"sp": 2}, "sp2_ulysses": {"sp": 2, "ulysses": 2},
           "sp2_ring_classic_layout": {"sp": 2, "layout": "classic"}}
    runs = [(model, data, str(tmp_path / name), overrides) for name, overrides in two.items()]
    for name, got in zip(two, run_distributed(_train_configs, 2, args=(runs,))[0]):
        _assert_same(got, want, name)

    four = {"dp2_x_sp2_ring": {"sp": 2}, "sp4_hybrid_ulysses2_ring2": {"sp": 4, "ulysses": 2}}
    runs = [(model, data, str(tmp_path / name), overrides) for name, overrides in four.items()]
    for name, got in zip(four, run_distributed(_train_configs, 4, args=(runs,))[0]):
        _assert_same(got, want, name)


def _reduce_grads(rank, world_size, bucket_elements):
    from sealong.train.distributed import all_reduce_grads

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in
              (((3, 4), torch.float32), ((7,), torch.bfloat16), ((2, 2), torch.float32), ((1,), torch.float32))]
    for i, p in enumerate(params):
        p.grad = (torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) * (rank + 1) + i).to(p.dtype)
    params[2].grad = None  # no gradient on any rank: stays None
    all_reduce_grads(params, bucket_elements=bucket_elements)
    return [None if p.grad is None else p.grad.float() for p in params]


@pytest.mark.parametrize("bucket_elements", [5, 2**27])
def test_gradient_all_reduce_sums_in_buckets(bucket_elements):
    got = run_distributed(_reduce_grads, 2, args=(bucket_elements,))
    for i, shape in enumerate([(3, 4), (7,), None, (1,)]):
        if shape is None:
            assert got[0][i] is None and got[1][i] is None
            continue
        base = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
        want = base * 3 + 2 * i  # ranks 0 and 1: base * 1 + i and base * 2 + i
        assert torch.equal(got[0][i], want) and torch.equal(got[1][i], want), i
