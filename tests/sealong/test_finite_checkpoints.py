"""No poisoned checkpoints: a step whose update is not finite (lr = inf) stops the run with a clear error before
any checkpoint of it is written, and a resume refuses a checkpoint with non-finite weights."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from sealong.train import checkpoint as ckpt
from sealong.train.config import make_config
from sealong.train.distributed import setup
from sealong.train.loop import NonFiniteError, train


def _config(model, data, out, **overrides):
    values = dict(model=model, data=data, output_dir=out, batch_pairs=2, lr=1e-3, lora_r=2, lora_alpha=4,
                  dtype="float32", progress=False, save_every=1, epochs=2)
    values.update(overrides)
    return make_config(values).validate()


@pytest.mark.parametrize("lr", [float("inf")])  # (torch.optim.AdamW itself refuses a NaN lr)
def test_non_finite_update_stops_before_any_checkpoint(tmp_path, lr):
    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    cfg = _config(model, data, str(tmp_path / "out"))
    cfg.lr = lr  # past the option checks: the loop itself must never save what such a step produced
    with pytest.raises(NonFiniteError, match=r"step 1: .*non-finite values in the updated parameters .*no checkpoint "
                                             r"of this step was written; newest saved checkpoint: none"):
        train(cfg, setup("cpu"))
    assert ckpt.list_checkpoints(cfg.output_dir) == []


def test_loss_and_grad_norm_are_checked_every_step(tmp_path, monkeypatch):
    from sealong.train import loop

    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    cfg = _config(model, data, str(tmp_path / "out"), save_every=0)
    real = loop.train_step

    def step(*args, **kwargs):
        record = real(*args, **kwargs)
        return dict(record, grad_norm=float("inf")) if len(ckpt.list_checkpoints(cfg.output_dir)) == 0 else record

    monkeypatch.setattr(loop, "train_step", step)
    with pytest.raises(NonFiniteError, match=r"step 1: gradient norm inf"):
        train(cfg, setup("cpu"))


def test_resume_refuses_a_non_finite_checkpoint(tmp_path):
    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    cfg = _config(model, data, str(tmp_path / "out"), max_steps=1)
    path = train(cfg, setup("cpu"))["checkpoint"]
    adapter = os.path.join(path, "adapter", "adapter_model.safetensors")
    weights = load_file(adapter)
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, adapter)  # as an older version would have saved it
    with pytest.raises(ValueError, match=r"step_000001: non-finite weights in 1 tensor\(s\).*cannot be resumed"):
        train(_config(model, data, cfg.output_dir, resume=True), setup("cpu"))
