"""The `sealong` CLI: stages as subcommands, one-line errors (rc 2) for bad options and config files, a fast
`--help` that imports no torch, `--version`, and the layout (`sealong_kernels` importable, `kernels` not ours)."""

import os
import subprocess
import sys

import pytest

from sealong import __version__, cli
from sealong.config.stages import STAGES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_stage_has_help_from_its_fields(capsys):
    for stage in STAGES:
        with pytest.raises(SystemExit) as done:
            cli.main([stage, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: sealong {stage}" in out and "--log_level" in out and "--config" in out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "peak learning rate" in out and "--learning_rate" in out and "--nproc_per_node" in out


def test_help_and_version_in_a_fresh_interpreter_import_no_torch():
    code = ("import sys, io, contextlib\nfrom sealong import cli\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    try:\n        cli.main(['--help'])\n"
            "    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'pipeline' in buf.getvalue() and 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))[:5]\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "sealong.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"sealong {__version__}"


@pytest.mark.parametrize("text, message", [
    ("synth:\n  min_tokenz: 3\n", "c.yaml:2: [synth] unknown key 'min_tokenz' (did you mean 'min_tokens'?)"),
    ("sampel:\n  x: 1\n", "c.yaml:1: unknown section 'sampel' (did you mean 'sample'?)"),
    ("lr: 1.0e-4\n", "c.yaml:1: unknown section 'lr'; 'lr' is an option of [train]: put it under `train:`"),
    ("- a\n- b\n", "c.yaml:1: expected sections named after the stages"),
    ("synth: 3\n", "c.yaml:1: section 'synth' must be a mapping"),
    ("synth:\n  seed: [1\n", "c.yaml:3:1: invalid YAML"),
    ("synth:\n  seed: !!python/object/apply:os.system ['true']\n", "c.yaml:2:9: invalid YAML"),
    ("sample:\n  temperature: .nan\n", "c.yaml:2: [sample] temperature: must be a finite number"),
    ("synth:\n  seed: 1\n  seed: 2\n", "c.yaml:3: [synth] 'seed' given twice"),
    ("synth:\n  out_dir: off\n", "c.yaml:2: [synth] out_dir: expected a string, got False (quote it in YAML"),
])
def test_bad_config_file_is_one_line_with_file_and_line(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    for argv in (["--config", str(cfg), "synth"], ["synth", "--config", str(cfg)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sealong synth: error: ") and message in err, err
        assert "<unicode string>" not in err and "Traceback" not in err


def test_bad_config_in_train_and_pipeline_is_rc_2_before_any_work(tmp_path, capsys, monkeypatch):
    from sealong import launch

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("torchrun must not start"))
    monkeypatch.setattr(launch, "run_job", lambda *a, **k: pytest.fail("torchrun must not start"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lerning_rate: 1\n")
    assert cli.main(["train", "--config", str(cfg), "--model", "m", "--data", "d"]) == 2
    assert "c.yaml:2: [train] unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in capsys.readouterr().err
    assert cli.main(["pipeline", "--config", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def _rc(argv):
    """The exit code of `sealong ARGV`, whether main returns it or argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as done:
        return done.code


def test_argument_errors_exit_2_with_one_line(tmp_path, capsys):
    for argv, message in [
        (["synth", "--min-tokens", "many"], "argument --min_tokens/--min-tokens: invalid int value: 'many'"),
        (["synth", "--distractors", "hard"], "invalid choice: 'hard'"),
        (["synth", "--num-exampels", "3"], "unrecognized arguments: --num-exampels 3; --num-exampels (did you mean "
                                           "--num-examples?)"),
        (["synth", "--min-tokens", "500", "--max-tokens", "100"], "min_tokens (500) must be <= max_tokens (100)"),
        (["eval", "--sampled", str(tmp_path / "none.jsonl")], "sealong eval: error:"),
        (["eval", "--greedy", str(tmp_path / "x.jsonl"), "--ns", "two"], "--ns: expected comma-separated integers"),
        (["--config", str(tmp_path / "none.yaml"), "synth"], "--config: file not found"),
        (["synth", "--preset", "fast"], "--preset: unknown preset 'fast'; presets: demo, demo-gain, paper"),
    ]:
        assert _rc(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_console_script_runs_a_stage(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sealong.cli", "synth", "--out-dir", str(tmp_path),
                          "--num-examples", "3", "--num_eval", "2", "--min-tokens", "50", "--max-tokens=80"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "prompts.jsonl").read_text().count("\n") == 3


def test_bare_sealong_runs_the_pipeline_demo_preset(monkeypatch):
    import sealong.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda cfg, resolved: seen.update(cfg=cfg, resolved=resolved) or 0)
    assert cli.main([]) == 0
    cfg, resolved = seen["cfg"], seen["resolved"]
    assert cfg.model is None and cfg.run_dir == "runs/sealong-demo" and resolved.common["preset"] == "demo"
    assert resolved.sections["sample"]["num_samples"] == 8 and cfg.eval_samples == 8


def test_pipeline_argument_errors(tmp_path, capsys):
    musique = tmp_path / "m.jsonl"
    musique.write_text("")
    for argv, message in [
        (["pipeline", "--musique", str(tmp_path / "none.jsonl")], "--musique: file not found"),
        (["pipeline", "--musique", str(musique)], "--eval-files: needed with --musique"),
        (["pipeline", "--num-samples", "0"], "sample: --num_samples must be >= 1, got 0"),
        (["pipeline", "--temperature", "nan"], "temperature: must be a finite number"),
        (["pipeline", "--model", str(tmp_path)], "--model: no config.json"),
        (["pipeline", "--train-args", "--lerning_rate 1"], "(did you mean --learning_rate?)"),
        (["pipeline", "--train-args", "--sp 0"], "train: --sp must be >= 1, got 0"),
    ]:
        assert _rc(argv + ["--run-dir", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "base_model").exists()  # refused before any work


def test_import_kernels_from_the_repository_root_is_not_ours_and_sealong_kernels_is(tmp_path):
    # the folder kernels/ has no __init__.py: from the repository root it is at most an empty namespace portion,
    # which runs none of our code and loses to any installed package named `kernels` (Hugging Face's, which
    # the test extra's dependencies may install)
    probe = ("import os, sys, kernels\n"
             "ours = os.path.abspath('kernels') + os.sep\n"
             "files = [getattr(m, '__file__', None) or '' for n, m in list(sys.modules.items()) if n.split('.')[0] == 'kernels']\n"
             "assert not [f for f in files if os.path.abspath(f).startswith(ours)], files\n"
             "assert not hasattr(kernels, 'fused_linear_orpo_loss') and 'sealong_kernels' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", "from kernels import get_kernel; print(get_kernel('ok'))"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    code = "import sealong_kernels, os; print(os.path.relpath(sealong_kernels.__file__, os.environ['REPO']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "REPO": REPO})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.join("kernels", "sealong_kernels", "__init__.py")


GOOD_PAIR = '{"id": "q0", "prompt": "w1", "chosen_text": "w2", "rejected_text": "w3"}'


@pytest.mark.parametrize("line, message", [
    (GOOD_PAIR, "p.jsonl:2: duplicate id 'q0' (first at line 1)"),
    ('{"id": "q1", "prompt": "w1", "chosen_text": "w2"', "p.jsonl:2: not valid JSON"),
    (GOOD_PAIR.replace('"q0"', '"q1"').replace('"w2"', "3"), "p.jsonl:2: field 'chosen_text' must be a string"),
])
def test_sealong_train_bad_pairs_file_is_one_line_and_rc_2_before_torchrun(tmp_path, capsys, monkeypatch, line,
                                                                           message):
    """An input error of `sealong train` is reported as by every stage (exit 2, one line naming file:line), by the
    launcher before any worker starts (a worker's error came back as torchrun's exit 1 and its failure report)."""
    from sealong import launch

    monkeypatch.setattr(launch, "run_job", lambda *a, **k: pytest.fail("torchrun must not start"))
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(GOOD_PAIR + "\n" + line + "\n")
    assert cli.main(["train", "--model", "m", "--data", str(pairs), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sealong train: error: ") and message in err and err.count("\n") == 1, err
