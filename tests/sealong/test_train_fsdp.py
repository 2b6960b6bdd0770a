"""FSDP2 (`data_parallel: fsdp`, sealong/train/fsdp.py) on gloo processes: full fine-tuning with DP=2 and
DP x SP = 2 x 2 gives the losses and weights of one process (LoRA under FSDP: test_train_parallel.py); each
rank stores 1/W of the parameters, gradients and AdamW states; a run killed after step k and resumed from its
distributed checkpoint ends bit-identical to an uninterrupted one, and exports a PEFT adapter / safetensors
model.

Tolerances are those of test_train_parallel.py (float32, LoRA dropout 0: only the order of floating-point
sums differs from one process: reduce-scatter instead of one process's accumulation)."""

import json
import os

import pytest
import torch
from gloo_harness import run_distributed
from safetensors.torch import load_file
from test_train_parallel import _assert_same  # the tolerances of the DP / SP tests
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from sealong.train.config import make_config
from sealong.train.distributed import setup
from sealong.train.loop import train

FULL = {"finetune": "full", "lr": 1e-3}


def _config(model, data, out, **overrides):
    values = dict(model=model, data=data, output_dir=out, batch_pairs=4, lr=2e-3, lora_r=4, lora_alpha=8,
                  lora_dropout=0.0, dtype="float32", progress=False, gradient_checkpointing=False)
    values.update(overrides)
    return make_config(values).validate()


def _weights(path, finetune):
    if finetune == "lora":
        return load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))
    return load_file(os.path.join(path, "model.safetensors"))


def _train_runs(rank, world_size, runs):
    """Train each (model, data, out, overrides) on this rank; rank 0 returns (losses, exported weights)."""
    info = setup("cpu")
    results = []
    for model, data, out, overrides in runs:
        result = train(_config(model, data, out, **overrides), info)
        weights = _weights(result["checkpoint"], overrides.get("finetune", "lora"))
        results.append((result["losses"], {k: v.numpy() for k, v in weights.items()}) if rank == 0 else None)
    return results


@pytest.mark.slow
def test_fsdp_full_finetuning_and_replicated_lora_match_one_process(tmp_path):
    # LoRA under FSDP (the default with several ranks) is test_train_parallel.py's: DP 2, SP 2 ring / Ulysses,
    # 2 x 2, hybrid. Here: full fine-tuning under FSDP, and LoRA on the replicated path (data_parallel replicate).
    model, data = tiny_setup(str(tmp_path), n_pairs=12)
    want = {}
    for name, overrides in (("lora", {}), ("full", FULL)):
        single = train(_config(model, data, str(tmp_path / f"single_{name}"), **overrides), setup("cpu"))
        want[name] = (single["losses"], _weights(single["checkpoint"], name))
    runs = {2: {"full_dp2": ("full", {**FULL, "data_parallel": "fsdp"}),
                "lora_dp2_replicate": ("lora", {"data_parallel": "replicate"})},
            4: {"full_dp2_x_sp2": ("full", {**FULL, "sp": 2})}}  # data_parallel auto: FSDP
    for world, cases in runs.items():
        args = [(model, data, str(tmp_path / case), overrides) for case, (_, overrides) in cases.items()]
        for (case, (name, _)), result in zip(cases.items(), run_distributed(_train_runs, world, args=(args,))[0]):
            _assert_same(result, want[name], case)
            step = sorted(os.listdir(tmp_path / case / "checkpoints"))[-1]
            assert os.path.isdir(tmp_path / case / "checkpoints" / step / "dcp") == ("replicate" not in case), case


def _state_bytes(rank, world_size, model_dir):
    """Bytes of trainable parameters, gradients and AdamW states this rank holds after one step, per finetune,
    with the loop's bfloat16 recipes: full fine-tuning from float32 masters, LoRA on a bfloat16 base."""
    from sealong.train import fsdp
    from sealong.train.loop import build_model

    found = {}
    for finetune in ("lora", "full"):
        cfg = _config(model_dir, "unused", "unused", finetune=finetune, dtype="bfloat16")
        torch.manual_seed(0)
        model, lm_head, params = build_model(cfg, torch.device("cpu"), fsdp.master_dtype(cfg))
        if world_size > 1:
            fsdp.shard_model(model, fsdp.fsdp_mesh(torch.device("cpu")), fsdp.compute_dtype(cfg, torch.bfloat16))
            params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        hidden = model(torch.arange(6, 30), torch.arange(24))
        (hidden @ lm_head.weight.T).float().logsumexp(-1).mean().backward()  # lm_head read as the loss reads it
        optimizer.step()
        found[finetune] = fsdp.training_state_bytes(params, optimizer)
        found[finetune]["dtypes"] = (str(hidden.dtype), sorted({str(p.dtype) for p in params}))
    return found


def test_fsdp_stores_one_share_of_the_training_state_per_rank(tmp_path):
    from sealong.model import load_model

    # a model whose every dim-0 size divides by 2: the shards are exactly equal
    model, _ = tiny_setup(str(tmp_path), n_pairs=1)
    one = _state_bytes(0, 1, model)
    assert one["full"]["params"] == 4 * sum(p.numel() for p in load_model(model).parameters())  # float32 masters
    for want in one.values():
        assert want["params"] > 0 and want["grads"] == want["params"] and want["optimizer"] == 2 * want["params"]
    for rank, got in enumerate(run_distributed(_state_bytes, 2, args=(model,))):
        for finetune, want in one.items():
            for part in ("params", "grads", "optimizer"):
                assert got[finetune][part] == want[part] // 2, (rank, finetune, part, got, want)
        # full fine-tuning: float32 masters (and gradients, AdamW states) computing in bfloat16; LoRA: float32
        # adapters on a bfloat16 base (frozen weights all-gathered with the adapters in one group), as unsharded
        assert got["full"]["dtypes"] == ("torch.bfloat16", ["torch.float32"]) == got["lora"]["dtypes"]


class Killed(RuntimeError):
    pass


def _kill_and_resume(rank, world_size, model, data, root, overrides):
    """An uninterrupted run, and one killed after step 3 then resumed from its step-2 checkpoint."""
    info = setup("cpu")
    # dropout on (the resumed run must draw the same masks) and gradient checkpointing on (FSDP layers recomputed)
    overrides = dict(overrides, data_parallel="fsdp", batch_pairs=2, epochs=2, save_every=2, lora_dropout=0.2,
                     gradient_checkpointing=True)
    full = train(_config(model, data, os.path.join(root, "full"), **overrides), info)

    def kill(step, record):
        if step == 3:
            raise Killed

    out = os.path.join(root, "killed")
    try:
        train(_config(model, data, out, **overrides), info, on_step=kill)
    except Killed:
        pass
    resumed = train(_config(model, data, out, resume=True, **overrides), info)
    return full["losses"], resumed["losses"], full["checkpoint"], resumed["checkpoint"]


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_fsdp_kill_and_resume_is_bit_identical(tmp_path, finetune):
    model, data = tiny_setup(str(tmp_path), n_pairs=5, tie=finetune == "full")  # 2 steps per epoch, 4 steps
    overrides = FULL if finetune == "full" else {"lr": 3e-3}
    full_losses, resumed_losses, full_path, resumed_path = run_distributed(
        _kill_and_resume, 2, args=(model, data, str(tmp_path), overrides))[0]
    assert len(full_losses) == 4 and resumed_losses == full_losses[2:]
    want, got = _weights(full_path, finetune), _weights(resumed_path, finetune)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    state = json.load(open(os.path.join(resumed_path, "state.json")))
    assert state["step"] == 4 and state["world_size"] == 2
    if finetune == "full":  # tied embeddings exported once, as one process's save_model writes them
        assert "lm_head.weight" in got and "model.embed_tokens.weight" not in got
    else:  # the exported adapter loads with peft onto transformers' model
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model, dtype=torch.float32),
                                       os.path.join(resumed_path, "adapter"))
        loaded = {k: v for k, v in hf.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(got) and all(torch.equal(loaded[k.replace(".weight", ".default.weight")], v)
                                               for k, v in got.items())


def test_data_parallel_choice():
    from sealong.train.fsdp import use_fsdp

    cfg = lambda **kw: _config("m", "d", "o", **kw)  # noqa: E731
    assert use_fsdp(cfg(), 2) and not use_fsdp(cfg(), 1)  # auto: FSDP with several ranks
    assert not use_fsdp(cfg(data_parallel="replicate"), 8)
    # auto keeps the replicated path where FSDP cannot go; asking for FSDP there is an error naming the setting
    assert not use_fsdp(cfg(qlora=True), 2) and not use_fsdp(cfg(dtype="float16"), 2)
    assert use_fsdp(cfg(dtype="float16", loss_scaling=False), 2)
    with pytest.raises(ValueError, match="data_parallel=fsdp: QLoRA.*data_parallel=replicate"):
        use_fsdp(cfg(qlora=True, data_parallel="fsdp"), 2)
    with pytest.raises(ValueError, match="data_parallel: expected one of auto, fsdp, replicate"):
        cfg(data_parallel="ddp")
