"""Outputs say how they were made and resumes keep to it (sealong.provenance): `<output>.meta.json` beside every
stage's output, settings in every record, a resume under other settings refused with the difference named;
every prompt's length checked before any sampling; atomic writes fsync before the rename."""

import hashlib
import json
import os

import pytest
from tiny_checkpoint import build_checkpoint, one_thread  # noqa: F401 (autouse fixture)

import sealong
from sealong.config.parser import resolve
from sealong.data.synthetic import write_jsonl_atomic
from sealong.evaluate.report import write_report
from sealong.jsonl import read_jsonl
from sealong.provenance import read_meta
from sealong.sample import sampler
from sealong.score import mbr


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return build_checkpoint(root / "a", seed=0), build_checkpoint(root / "b", seed=1, max_positions=128)


def _prompts(path, contexts):
    path.write_text("".join(json.dumps({"id": f"q{i}", "context": c, "question": "where is paris ?"}) + "\n"
                            for i, c in enumerate(contexts)))
    return str(path)


def _args(ckpt, prompts, out, *extra):
    return resolve("sample", ["--model", ckpt, "--prompts", prompts, "--output", str(out), "--num-samples", "2",
                                      "--max-new-tokens", "3", "--dtype", "float32", "--device", "cpu", *extra]).cfg


def test_sample_records_settings_and_refuses_to_resume_under_others(ckpts, tmp_path):
    a, b = ckpts
    prompts, out = _prompts(tmp_path / "p.jsonl", ["paris is a city"] * 3), tmp_path / "samples.jsonl"
    assert sampler.run(_args(a, prompts, out, "--limit", "2")) == 0
    meta = read_meta(str(out))
    assert meta["stage"] == "sample" and meta["sealong_version"] == sealong.__version__ and "git_commit" in meta
    config_hash = hashlib.sha256(open(os.path.join(a, "config.json"), "rb").read()).hexdigest()
    assert meta["model"] == {"path": os.path.abspath(a), "config_sha256": config_hash}
    settings = meta["settings"]
    assert settings["num_samples"] == 2 and settings["temperature"] == 0.7 and settings["seed"] == 0
    assert settings["model_config_sha256"] == config_hash
    assert all(r["sampler"] == settings for r in read_jsonl(str(out)))
    for extra, named in ((["--num-samples", "3"], "num_samples: output 2, now 3"),
                         (["--temperature", "0.5"], "temperature: output 0.7, now 0.5"),
                         (["--seed", "1"], "seed: output 0, now 1"),
                         (["--model", b], f"model: output '{os.path.abspath(a)}', now '{os.path.abspath(b)}'")):
        args = _args(a, prompts, out, *extra)
        with pytest.raises(ValueError, match=rf"--output .*samples\.jsonl was made by `sealong sample` with other "
                                             rf"settings; resuming would mix records of both \(.*{named}"):
            sampler.run(args)
    assert len(list(read_jsonl(str(out)))) == 2
    os.remove(str(out) + ".meta.json")  # a lost meta file: the records still carry the settings
    with pytest.raises(ValueError, match="num_samples: output 2, now 3"):
        sampler.run(_args(a, prompts, out, "--num-samples", "3"))
    assert sampler.run(_args(a, prompts, out)) == 0  # the same settings resume
    assert [r["id"] for r in read_jsonl(str(out))] == ["q0", "q1", "q2"]


def test_every_prompt_length_is_checked_before_sampling(ckpts, tmp_path):
    a, _ = ckpts
    prompts = _prompts(tmp_path / "p.jsonl", ["paris", "london", "paris is a city " * 20, "city " * 40])
    out = tmp_path / "samples.jsonl"
    with pytest.raises(ValueError, match=r"prompt 'q2' has \d+ tokens, over the limit of 60 \(and 1 more: 'q3'\)"):
        sampler.run(_args(a, prompts, out, "--max-prompt-tokens", "60", "--batch-prompts", "1"))
    assert not out.exists() or list(read_jsonl(str(out))) == []  # nothing was sampled first


def test_score_records_settings_and_refuses_to_resume_under_others(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": i, "outputs": ["a b c", "a b d", "x y"], "context": "c",
                                           "sampler": {"temperature": 0.7}}) + "\n" for i in range(2)))
    out, pairs = tmp_path / "scores.jsonl", tmp_path / "pairs.jsonl"
    cfg = mbr.ScoreConfig(utility="rouge", seed=0)
    mbr.score_file(str(samples), str(out), cfg, pairs=str(pairs), log=None)
    settings = read_meta(str(out))["settings"]
    assert settings["utility"] == "rouge" and settings["seed"] == 0 and read_meta(str(pairs))["settings"] == settings
    for record in list(read_jsonl(str(out))) + list(read_jsonl(str(pairs))):
        assert record["scorer"] == settings and record["sampler"] == {"temperature": 0.7}
    with pytest.raises(ValueError, match=r"scores\.jsonl was made by `sealong score` with other settings.*seed: "
                                         r"output 0, now 1"):
        mbr.score_file(str(samples), str(out), mbr.ScoreConfig(utility="rouge", seed=1), pairs=str(pairs), log=None)


def test_atomic_writes_fsync_before_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    path = tmp_path / "prompts.jsonl"
    assert write_jsonl_atomic(path, [{"id": 1}, {"id": 2}]) == 2
    assert events[:2] == [("fsync", str(path) + ".tmp"), ("replace", str(path) + ".tmp")]
    assert events[2] == ("fsync", str(tmp_path))  # the folder entry too
    events.clear()
    from sealong.evaluate.report import evaluate

    result = evaluate([{"id": "q", "outputs": ["Paris"], "answers": ["Paris"], "dataset": "t", "num_tokens": [2],
                        "finish_reasons": ["stop"]}], None, mbr=False)
    write_report(result, tmp_path / "eval", plot=False)
    for name in ("eval.md", "eval.json"):
        tmp = str(tmp_path / "eval" / name) + ".tmp"
        assert events.index(("fsync", tmp)) < events.index(("replace", tmp)), name


def test_train_and_eval_write_meta(tmp_path):
    from train_fixtures import tiny_setup

    from sealong.evaluate import report
    from sealong.train.config import make_config
    from sealong.train.distributed import setup
    from sealong.train.loop import train

    model, data = tiny_setup(str(tmp_path), n_pairs=2)
    cfg = make_config(dict(model=model, data=data, output_dir=str(tmp_path / "train"), batch_pairs=2, lr=1e-3,
                           lora_r=2, lora_alpha=4, dtype="float32", progress=False)).validate()
    train(cfg, setup("cpu"))
    meta = read_meta(cfg.output_dir, directory=True)
    assert meta["stage"] == "train" and meta["settings"]["lr"] == 1e-3 and meta["settings"]["lora_r"] == 2
    assert meta["settings"]["data_sha256"] == hashlib.sha256(open(data, "rb").read()).hexdigest()
    assert meta["model"]["config_sha256"] is not None
    with pytest.raises(ValueError, match="already holds checkpoints"):  # a refused run leaves the meta file alone
        train(make_config(dict(cfg.to_dict(), lr=2e-3)).validate(), setup("cpu"))
    assert read_meta(cfg.output_dir, directory=True) == meta
    sampled = tmp_path / "s.jsonl"
    sampled.write_text(json.dumps({"id": "a", "outputs": ["paris", "rome"], "answers": ["paris"]}) + "\n")
    report.run(resolve("eval", ["--sampled", str(sampled), "--out-dir", str(tmp_path / "eval"), "--no-mbr", "--no-plot"]).cfg)
    meta = read_meta(str(tmp_path / "eval"), directory=True)
    assert meta["stage"] == "eval" and meta["settings"]["sampled"] == str(sampled) and meta["settings"]["ns"] == [1, 2]
