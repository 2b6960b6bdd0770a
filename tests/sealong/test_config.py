"""One configuration system: flags > --config FILE > --preset > dataclass defaults, for `sealong train`,
`python -m sealong.train` and `sealong pipeline`, asserted on the resolved config each writes to its output
folder; HF / TRL aliases and both spellings; values kept as typed."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from sealong import cli, launch
from sealong.config.parser import resolve
from sealong.config.stages import STAGES
from sealong.train import loop


def _layers(tmp_path, model, data):
    """A config file over the demo preset: lora_r and lr in the file, lora_alpha only in the preset."""
    path = tmp_path / "my.yaml"
    path.write_text(f"train:\n  model: {model}\n  data: {data}\n  lr: 1.0e-4\n  lora_r: 8\n  batch_pairs: 2\n"
                    "  micro_batch_pairs: 2\n  max_steps: 1\n  progress: false\n")
    return path


def _check_layers(written):
    assert written["learning_rate" if "learning_rate" in written else "lr"] == 3e-4  # flag > file
    assert written["lora_r"] == 8 and written["batch_pairs"] == 2                    # file > preset
    assert written["lora_alpha"] == 32 and written["dtype"] == "float32"             # preset (demo) > default
    assert written["beta"] == 0.1 and written["lora_dropout"] == 0.05                # defaults


def test_sealong_train_forwards_only_what_the_user_set(tmp_path, monkeypatch):
    # the bug: the packaged defaults became explicit flags, which beat the user's --config file
    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    config, out = _layers(tmp_path, model, data), str(tmp_path / "out")
    calls = []

    def torchrun(cmd, **kw):  # run the job's command line in this process instead of under torchrun
        calls.append(cmd)
        assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m"]
        return loop.main(cmd[7:])

    monkeypatch.setattr(launch, "run_job", torchrun)
    argv = ["--preset", "demo", "train", "--config", str(config), "--learning-rate=3e-4", "--output_dir", out,
            "--nproc-per-node", "1"]
    assert cli.main(argv) == 0
    forwarded = calls[0][7:]
    assert forwarded == ["--preset", "demo", "--config", str(config), "--learning-rate=3e-4", "--output_dir", out]
    _check_layers(json.load(open(os.path.join(out, "config.json"))))


@pytest.mark.slow
def test_python_m_sealong_train_layers_the_same_way(tmp_path):
    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    config, out = _layers(tmp_path, model, data), str(tmp_path / "out")
    cmd = [sys.executable, "-m", "sealong.train", "--config", str(config), "--preset", "demo",
           "--learning_rate", "3e-4", "--output-dir", out, "--log-level", "warning"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_layers(json.load(open(os.path.join(out, "config.json"))))


def test_sealong_pipeline_layers_every_stage(tmp_path, monkeypatch):
    import sealong.pipeline as pipeline

    class Stop(Exception):
        pass

    def stop(r):
        raise Stop

    monkeypatch.setattr(pipeline, "step_base_model", stop)
    config = tmp_path / "my.yaml"
    config.write_text("sample:\n  num_samples: 6\n  max_new_tokens: 20\ntrain:\n  lr: 1.0e-3\n  lora_r: 4\n"
                      "pipeline:\n  eval_samples: 5\n")
    run_dir = tmp_path / "run"
    with pytest.raises(Stop):
        cli.main(["--config", str(config), "pipeline", "--run-dir", str(run_dir), "--num-samples", "4",
                  "--learning_rate", "2e-3", "--tiny-warmup-steps", "3"])
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert set(written) == set(STAGES)
    assert written["sample"]["num_samples"] == 4 and written["train"]["lr"] == 2e-3       # flag > file
    assert written["sample"]["max_new_tokens"] == 20 and written["train"]["lora_r"] == 4  # file > preset
    assert written["pipeline"]["eval_samples"] == 5 and written["pipeline"]["tiny_warmup_steps"] == 3
    assert written["synth"]["num_examples"] == 48 and written["train"]["lora_alpha"] == 32  # demo preset > default
    assert written["score"]["dedup_threshold"] == 0.98 and written["sample"]["top_p"] == 1.0  # defaults
    # the file the pipeline wrote is a valid --config for every stage (it is what `sealong train` gets)
    assert resolve("train", ["--config", str(run_dir / "config.yaml"), "--model", "m", "--data", "d"]).cfg.lr == 2e-3


@pytest.mark.parametrize("flags", [["--learning_rate", "1e-4"], ["--learning-rate=1e-4"], ["--lr", "1e-4"],
                                   ["--lr=1e-4"]])
def test_learning_rate_spellings(flags):
    assert resolve("train", ["--model", "m", "--data", "d", *flags]).cfg.lr == 1e-4


def test_hf_trl_aliases_and_bare_booleans():
    cfg = resolve("train", ["--model", "m", "--data", "d", "--num_train_epochs", "3", "--per-device-train-batch-size",
                            "2", "--logging_steps", "5", "--save_steps", "10", "--save_total_limit", "4",
                            "--lora_target_modules", "q_proj", "v_proj", "--resume_from_checkpoint", "--qlora",
                            "--report_to", "none", "--no_gradient_checkpointing"]).cfg
    assert (cfg.epochs, cfg.micro_batch_pairs, cfg.log_every, cfg.save_every, cfg.keep_checkpoints) == (3, 2, 5, 10, 4)
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.resume and cfg.qlora and not cfg.gradient_checkpointing
    cfg = resolve("train", ["--model", "m", "--data", "d", "--resume", "false", "--qlora=true"]).cfg
    assert not cfg.resume and cfg.qlora
    assert resolve("eval", ["--greedy", "g.jsonl", "--no-mbr"]).cfg.no_mbr is True


def test_values_stay_as_typed(tmp_path):
    cfg = resolve("train", ["--output_dir", "runs/exp #1", "--data", "off", "--model=/models/Llama-3.1-8B-Instruct",
                            "--prompt_strategy", "a=b"]).cfg
    assert (cfg.output_dir, cfg.data, cfg.model, cfg.prompt_strategy) == (
        "runs/exp #1", "off", "/models/Llama-3.1-8B-Instruct", "a=b")
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  output_dir: 'runs/exp #1'\n  data: 'off'\n  model: /models/Llama-3.1-8B-Instruct\n")
    cfg = resolve("train", ["--config", str(path)]).cfg
    assert (cfg.output_dir, cfg.data, cfg.model) == ("runs/exp #1", "off", "/models/Llama-3.1-8B-Instruct")


def test_report_to_a_missing_tracker_warns(tmp_path, caplog, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = resolve("train", ["--model", "m", "--data", "d", "--report_to", "wandb", "--output_dir",
                            str(tmp_path), "--progress", "false"]).cfg
    with caplog.at_level("WARNING", logger="sealong"):
        loop.Logger(cfg, True, 0, 1).close()
    assert "report_to=wandb, but wandb is not installed (pip install 'sealong[logging]')" in caplog.text


def test_every_stage_default_is_defined_once():
    # presets only override: every key of a preset is an option of its stage, and its value differs from the
    # default (a preset that repeats a default would be a second definition of it)
    from sealong.config.files import PRESET_DIR, read_config

    classes = {name: entry[0] for name, entry in STAGES.items()}
    for preset in ("demo", "paper"):
        for stage, values in read_config(PRESET_DIR / f"{preset}.yaml", classes).items():
            defaults = classes[stage]()
            for key, value in values.items():
                assert getattr(defaults, key) != value, f"{preset}.yaml [{stage}] {key} repeats the default"
