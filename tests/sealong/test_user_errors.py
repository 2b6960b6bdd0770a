"""Smaller user-facing defects, each refused or warned about in one clear line: an empty prompts file, --output
equal to --prompts, a broken config.json, a truncated safetensors file, NaN weights (sample refuses, no NaN in
JSON; train does not blame the learning rate), swapped greedy / sampled files in `sealong eval`, lora_r above the
hidden size, peft's `all-linear`, --tiny-warmup-steps 0, and a folder named jina-embeddings-v3 without
--trust-remote-code."""

import json
import logging
import os
import shutil

import pytest
import torch

from sealong import cli

from tiny_checkpoint import build_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "m")


def _stage(capsys, argv):
    rc = cli.main(["--log-level", "error", *argv])
    err = capsys.readouterr().err
    return rc, err


def _prompts(path, n=2):
    path.write_text("".join(json.dumps({"id": f"p{i}", "context": "the city of paris", "question": "who?"}) + "\n"
                            for i in range(n)))
    return str(path)


def test_empty_prompts_file_is_refused(tmp_path, capsys, ckpt):
    (tmp_path / "p.jsonl").write_text("")
    out = tmp_path / "s.jsonl"
    rc, err = _stage(capsys, ["sample", "--model", ckpt, "--prompts", str(tmp_path / "p.jsonl"), "--output", str(out)])
    assert rc == 2 and "p.jsonl: no prompt records (an empty file): nothing to sample" in err, err
    assert not out.exists() and not os.path.exists(f"{out}.meta.json")


def test_output_equal_to_prompts_is_refused(tmp_path, capsys, ckpt):
    prompts = _prompts(tmp_path / "p.jsonl")
    before = open(prompts).read()
    rc, err = _stage(capsys, ["sample", "--model", ckpt, "--prompts", prompts, "--output", prompts])
    assert rc == 2 and "is the --prompts file: samples go to another file" in err, err
    assert open(prompts).read() == before


def test_broken_config_json_names_the_file(tmp_path, capsys, ckpt):
    model = tmp_path / "m"
    shutil.copytree(ckpt, model)
    (model / "config.json").write_text('{"hidden_size": 32,')
    rc, err = _stage(capsys, ["sample", "--model", str(model), "--prompts", _prompts(tmp_path / "p.jsonl"),
                              "--output", str(tmp_path / "s.jsonl"), "--device", "cpu"])
    assert rc == 2 and f"{model / 'config.json'}: not valid JSON" in err, err


def test_truncated_safetensors_names_the_file(tmp_path, ckpt):
    from sealong.model import load_model

    model = tmp_path / "m"
    shutil.copytree(ckpt, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file"):
        load_model(str(model), dtype=torch.float32)


def test_nan_weights_are_refused_by_sample_and_train(tmp_path, capsys, ckpt):
    from safetensors.torch import load_file, save_file

    from sealong.model import load_model

    model = tmp_path / "m"
    shutil.copytree(ckpt, model)
    weights = load_file(model / "model.safetensors")
    key = next(k for k in sorted(weights) if "layers.0.self_attn.q_proj" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    message = f"weight {key!r} holds 1 non-finite value(s) (NaN or inf): the checkpoint itself is broken"
    with pytest.raises(ValueError, match="non-finite") as err:  # the loader of both `sample` and `train`
        load_model(str(model), dtype=torch.float32)
    assert message in str(err.value) and "lr" not in str(err.value)
    out = tmp_path / "s.jsonl"
    rc, err = _stage(capsys, ["sample", "--model", str(model), "--prompts", _prompts(tmp_path / "p.jsonl"),
                              "--output", str(out), "--device", "cpu", "--dtype", "float32", "--num-samples", "2",
                              "--max-new-tokens", "4"])
    assert rc == 2 and message in err, err
    assert not out.exists() or "NaN" not in out.read_text()


def _samples(path, n_outputs, temperature):
    path.write_text("".join(json.dumps({"id": f"q{i}", "outputs": ["The answer is paris."] * n_outputs,
                                        "answers": ["paris"], "sampler": {"temperature": temperature}}) + "\n"
                            for i in range(3)))
    return str(path)


def test_eval_with_swapped_greedy_and_sampled_files(tmp_path, capsys):
    greedy, sampled = _samples(tmp_path / "g.jsonl", 1, 0.0), _samples(tmp_path / "s.jsonl", 4, 0.7)
    rc, err = _stage(capsys, ["eval", "--greedy", sampled, "--sampled", greedy, "--no-mbr", "--no-plot",
                              "--out-dir", str(tmp_path / "e")])
    assert rc == 2 and "look swapped: the greedy file's records hold 4 output(s) (temperature [0.7])" in err, err
    assert _stage(capsys, ["eval", "--greedy", greedy, "--sampled", sampled, "--no-mbr", "--no-plot",
                           "--out-dir", str(tmp_path / "e")])[0] == 0


def test_lora_rank_above_hidden_size_warns(ckpt, caplog):
    from sealong.train.config import TrainConfig
    from sealong.train.loop import build_model

    caplog.set_level(logging.WARNING, logger="sealong")
    build_model(TrainConfig(model=ckpt, data="-", lora_r=64, dtype="float32"), "cpu")
    assert "lora_r=64 is larger than the model's hidden size 32" in caplog.text


def test_peft_all_linear_spelling(ckpt):
    from sealong.config.parser import resolve
    from sealong.train.config import LORA_TARGETS

    cfg = resolve("train", ["--model", ckpt, "--data", "-", "--lora_target_modules", "all-linear"]).cfg
    assert cfg.lora_targets == list(LORA_TARGETS)


def test_tiny_warmup_steps_zero_builds_an_untrained_model(tmp_path):
    from sealong.tiny import TinyConfig, build_base_model

    stats = build_base_model(tmp_path / "base", TinyConfig(warmup_steps=0, warmup_questions=4), skip_questions=0,
                             log=lambda msg: None)
    assert stats["warmup_steps_run"] == 0 and stats["warmup_loss_first"] is None
    assert (tmp_path / "base" / "model.safetensors").is_file()


def test_jina_named_folder_needs_the_users_flag(tmp_path):
    from sealong.score.embed import load_embedder

    folder = tmp_path / "jina-embeddings-v3"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="jina-embeddings-v3 is a custom-code model .*pass --trust-remote-code"):
        load_embedder(str(folder), "cpu")
