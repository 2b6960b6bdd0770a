"""Checkpoints: a run killed after step k and resumed ends with the weights of an uninterrupted run; a crash
during a save leaves the last good checkpoint intact."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from sealong.train import checkpoint as ckpt
from sealong.train.distributed import setup
from sealong.train.loop import train
from sealong.train.config import make_config


class Killed(RuntimeError):
    pass


def _config(model, data, out, **overrides):
    # dropout on: the resumed run must restore the RNG to draw the same masks
    values = dict(model=model, data=data, output_dir=out, batch_pairs=2, lr=3e-3, lora_r=4, lora_alpha=8,
                  lora_dropout=0.2, dtype="float32", progress=False, save_every=2, epochs=2)
    values.update(overrides)
    return make_config(values).validate()


def _adapter(path):
    return load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))


def _kill_after(k):
    def hook(step, record):
        if step == k:
            raise Killed(f"killed after step {k}")
    return hook


def _weights(path, finetune):
    return _adapter(path) if finetune == "lora" else load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_kill_and_resume_matches_uninterrupted(tmp_path, finetune):
    # full fine-tuning on a model with tied embeddings (stored once in model.safetensors)
    model, data = tiny_setup(str(tmp_path), n_pairs=5, tie=finetune == "full")  # 2 steps per epoch, 4 steps
    lr = {"lr": 3e-3} if finetune == "lora" else {"lr": 1e-3, "finetune": "full"}
    full = train(_config(model, data, str(tmp_path / "full"), **lr), setup("cpu"))
    assert full["steps"] == 4

    out = str(tmp_path / "killed")
    with pytest.raises(Killed):
        train(_config(model, data, out, **lr), setup("cpu"), on_step=_kill_after(3))  # checkpoint at 2, killed at 3
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    resumed = train(_config(model, data, out, resume=True, **lr), setup("cpu"))
    assert resumed["steps"] == 4 and len(resumed["losses"]) == 2  # steps 3 and 4 ran again
    assert resumed["losses"] == full["losses"][2:]
    want, got = _weights(full["checkpoint"], finetune), _weights(resumed["checkpoint"], finetune)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]  # the lines of the killed step 3 were dropped on resume
    state = json.load(open(os.path.join(resumed["checkpoint"], "state.json")))
    assert state["step"] == 4 and state["pairs_seen"] == 8 and state["train_config"]["lora_r"] == 4


def test_crash_during_save_keeps_last_checkpoint(tmp_path, monkeypatch):
    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    out = str(tmp_path / "out")
    train(_config(model, data, out, save_every=1, epochs=1), setup("cpu"))
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]
    good = _adapter(ckpt.latest_checkpoint(out))

    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(_config(model, data, out, save_every=1, epochs=2, resume=True), setup("cpu"))
    monkeypatch.undo()
    assert os.path.isdir(ckpt.checkpoint_dir(out, 3) + ".tmp")  # the torn save stays a .tmp folder
    assert ckpt.latest_checkpoint(out) == ckpt.checkpoint_dir(out, 2)
    intact = _adapter(ckpt.latest_checkpoint(out))
    assert all(torch.equal(intact[k], good[k]) for k in good)
    # and the run resumes from it
    torn = ckpt.checkpoint_dir(out, 7) + ".tmp"  # a torn save of another step, left by an earlier crash
    os.makedirs(torn)
    result = train(_config(model, data, out, save_every=1, epochs=2, resume=True), setup("cpu"))
    assert result["steps"] == 4 and len(result["losses"]) == 2
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_000003", "step_000004"]  # torn saves removed


def test_fresh_run_into_old_checkpoints_is_refused(tmp_path):
    # without the check, the fresh run's checkpoints (steps 1, 2) were pruned at once in favour of the old
    # run's newer steps (3, 4), and a later --resume continued the old run
    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    out = str(tmp_path / "out")
    train(_config(model, data, out, save_every=1), setup("cpu"))
    before = ckpt.list_checkpoints(out)
    assert [s for s, _ in before] == [3, 4]
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume true"):
        train(_config(model, data, out, save_every=1, epochs=1), setup("cpu"))
    assert ckpt.list_checkpoints(out) == before


def test_resume_with_other_settings_is_refused(tmp_path):
    model, data = tiny_setup(str(tmp_path), n_pairs=8)
    out = str(tmp_path / "out")
    with pytest.raises(Killed):
        train(_config(model, data, out), setup("cpu"), on_step=_kill_after(2))
    # another batch size (so another data position for the same step) cannot continue exactly
    with pytest.raises(ValueError, match="different run.*batch_pairs: checkpoint 2, now 4"):
        train(_config(model, data, out, resume=True, batch_pairs=4), setup("cpu"))
    # adapters on other modules: the missing ones would have kept their fresh initialisation silently
    with pytest.raises(ValueError, match="lora_targets: checkpoint"):
        train(_config(model, data, out, resume=True, lora_targets="q_proj,v_proj"), setup("cpu"))
    result = train(_config(model, data, out, resume=True), setup("cpu"))
    assert result["steps"] == 8 and len(result["losses"]) == 6


def test_save_flushes_files_before_publishing(tmp_path, monkeypatch):
    # the rename publishes the checkpoint and lets pruning delete older ones: everything must be on disk first
    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    out = str(tmp_path / "out")
    events, real_fsync, real_rename = [], ckpt._fsync, os.rename
    monkeypatch.setattr(ckpt, "_fsync", lambda path: (events.append(("fsync", path)), real_fsync(path)))
    monkeypatch.setattr(ckpt.os, "rename", lambda a, b: (events.append(("rename", a)), real_rename(a, b)))
    train(_config(model, data, out, save_every=0, epochs=1), setup("cpu"))
    final = ckpt.checkpoint_dir(out, 2)
    renamed = events.index(("rename", final + ".tmp"))
    synced = {os.path.relpath(p, final + ".tmp") for kind, p in events[:renamed] if kind == "fsync"}
    for folder, _, files in os.walk(final):
        for name in files:
            assert os.path.relpath(os.path.join(folder, name), final) in synced, name
    assert ("fsync", os.path.dirname(final)) in events[renamed:]
