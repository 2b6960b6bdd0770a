"""One small demo run whose samples never agree enough (--min-consensus 0.9): zero pairs. The score stage writes an
empty pairs file, the single round stops before training with the reason (exit 0, as a round of --rounds 2
does). Then: re-running that finished run with other settings is refused, naming each difference, and leaves
config.yaml as it was; the README's SFT control (cp -r run run-sft, rm its train/after parts, --mode sft) passes
every check up to training although the copy's model folder has another absolute path."""

import contextlib
import io
import json
import shutil

import pytest

from sealong import cli
import sealong.pipeline as pipeline

FLAGS = ["--tiny-warmup-steps", "2", "--num-examples", "4", "--num-eval", "2", "--num-samples", "2",
         "--eval-samples", "2", "--max-new-tokens", "6", "--min-consensus", "0.9"]


def _pipeline(run_dir, *extra):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["pipeline", "--run-dir", str(run_dir), *FLAGS, *extra])
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rerun") / "run"
    rc, out = _pipeline(run_dir)
    assert rc == 0, out[-2000:]
    return run_dir, out


@pytest.mark.slow
def test_no_pair_writes_an_empty_file_and_stops_the_single_round(finished):
    run_dir, out = finished
    assert (run_dir / "pairs.jsonl").is_file() and (run_dir / "pairs.jsonl").read_text() == ""
    reason = "stopped before training round 1: too few pairs: 0 pair(s) survived scoring, fewer than min_pairs 8"
    assert f"sealong pipeline: {reason}" in out
    assert json.loads((run_dir / "monitor.json").read_text())["stopped"] == reason
    assert not (run_dir / "train").exists() and "no round trained" in (run_dir / "summary.md").read_text()


@pytest.mark.slow
def test_finished_run_with_other_settings_is_refused_naming_each_difference(finished, capsys):
    run_dir, _ = finished
    config = (run_dir / "config.yaml").read_text()
    rc, _ = _pipeline(run_dir, "--num-samples", "3", "--seed", "5")
    err = capsys.readouterr().err
    assert rc == 2 and f"--run-dir {run_dir} holds outputs made with other settings (" in err, err
    for diff in ("sample.num_samples: run 2, now 3", "sample.seed: run 0, now 5", "synth.seed: run 0, now 5"):
        assert diff in err, err
    assert (run_dir / "config.yaml").read_text() == config
    rc, _ = _pipeline(run_dir, "--rounds", "2", "--num-samples", "6")  # the case: every difference named
    err = capsys.readouterr().err
    assert rc == 2 and "--rounds 2: " in err and "other settings differ too: sample.num_samples: run 2, now 6" in err
    assert (run_dir / "config.yaml").read_text() == config
    assert _pipeline(run_dir)[0] == 0 and (run_dir / "config.yaml").read_text() == config  # same flags: fine


class ReachedTraining(Exception):
    pass


@pytest.mark.slow
def test_readme_sft_control_recipe(finished, monkeypatch, tmp_path):
    run_dir, _ = finished
    sft = tmp_path / "run-sft"
    shutil.copytree(run_dir, sft)
    for name in ("train", "after_model", "after", "summary.md"):
        (sft / name).unlink() if (sft / name).is_file() else shutil.rmtree(sft / name, ignore_errors=True)

    def train(r, model, folder):
        raise ReachedTraining(r.configs["train"].mode, model)

    monkeypatch.setattr(pipeline, "step_train", train)
    with pytest.raises(ReachedTraining) as reached:  # --min-pairs 0: train even on no pair (a control option)
        _pipeline(sft, "--mode", "sft", "--min-pairs", "0")
    assert reached.value.args == ("sft", str(sft / "base_model"))
    assert "mode: sft" in (sft / "config.yaml").read_text()
