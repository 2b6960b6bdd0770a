"""The `sealong` CLI: stages wired as subcommands, YAML defaults under flags, argument errors."""

import subprocess
import sys

import pytest

from sealong import cli


def test_every_available_stage_has_help(capsys):
    for stage in cli.STAGES:
        with pytest.raises(SystemExit) as done:
            cli.main([stage, "--help"])
        assert done.value.code == 0
        assert f"usage: sealong {stage}" in capsys.readouterr().out


def test_yaml_defaults_sit_under_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("synth:\n  min_tokens: 123\n  seed: 9\n")
    config = cli.load_config(cfg)
    parser = cli.build_parser(config, str(cfg))
    args = parser.parse_args(["synth"])
    assert (args.min_tokens, args.seed, args.max_tokens) == (123, 9, 31744)
    args = parser.parse_args(["synth", "--seed", "4"])
    assert (args.min_tokens, args.seed) == (123, 4)


def test_packaged_config_has_the_paper_defaults():
    args = cli.build_parser(cli.load_config(None)).parse_args(["synth"])
    assert (args.num_examples, args.min_tokens, args.max_tokens, args.distractors) == (2048, 4096, 31744, "random")


@pytest.mark.parametrize("text, message", [
    ("synth:\n  min_tokenz: 3\n", "unknown key(s) ['min_tokenz']"),
    ("sampel:\n  x: 1\n", "unknown section(s) ['sampel']"),
    ("- a\n- b\n", "expected a mapping"),
    ("synth: 3\n", "section 'synth' must be a mapping"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as err:
        cli.main(["--config", str(cfg), "synth"])
    assert message in str(err.value)


def test_argument_errors_exit_2_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["synth", "--min-tokens", "many"])
    assert done.value.code == 2 and "--min-tokens: invalid int value: 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        cli.main(["synth", "--distractors", "hard"])
    assert done.value.code == 2 and "invalid choice: 'hard'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        cli.main(["eval", "--sampled", str(tmp_path / "none.jsonl")])
    assert done.value.code == 2 and "sealong eval: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        cli.main(["eval", "--greedy", str(tmp_path / "x.jsonl"), "--ns", "two"])
    assert done.value.code == 2 and "--ns: expected comma-separated integers" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--config: file not found"):
        cli.main(["--config", str(tmp_path / "none.yaml"), "synth"])


def test_console_script_runs_a_stage(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sealong.cli", "synth", "--out-dir", str(tmp_path),
                          "--num-examples", "3", "--num-eval", "2", "--min-tokens", "50", "--max-tokens", "80"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "prompts.jsonl").read_text().count("\n") == 3


def test_bare_sealong_runs_the_pipeline(monkeypatch):
    seen = {}
    pipeline = cli.load_stage("pipeline")
    monkeypatch.setattr(pipeline, "run", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main([]) == 0
    args = seen["args"]
    assert args.stage == "pipeline" and args.model is None and args.run_dir == "runs/sealong-demo"


def test_pipeline_argument_errors(tmp_path, capsys):
    musique = tmp_path / "m.jsonl"
    musique.write_text("")
    for argv, message in [
        (["pipeline", "--musique", str(tmp_path / "none.jsonl")], "--musique: file not found"),
        (["pipeline", "--musique", str(musique)], "--eval-files: needed with --musique"),
        (["pipeline", "--num-samples", "0"], "--num-samples must be >= 1"),
        (["pipeline", "--model", str(tmp_path)], "--model: no config.json"),
    ]:
        with pytest.raises(SystemExit) as done:
            cli.main(argv + ["--run-dir", str(tmp_path / "run")])
        assert done.value.code == 2 and message in capsys.readouterr().err


def test_train_stage_launches_torchrun_with_the_yaml_values(tmp_path, monkeypatch):
    calls = []

    from sealong import launch

    monkeypatch.setattr(launch, "run_job", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["train", "--nproc-per-node", "2", "--model", "m", "--data", "p.jsonl", "--lr", "1e-4"]) == 0
    cmd = calls[0]
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    flags = dict(zip(cmd[7::2], cmd[8::2]))
    assert flags["--lr"] == "1e-4" and flags["--model"] == "m" and flags["--lora_r"] == "128"  # flag > YAML
    assert flags["--lora_targets"] == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    with pytest.raises(SystemExit):
        cli.main(["train", "--nproc-per-node", "0"])
