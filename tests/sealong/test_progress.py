"""Progress off a terminal (sealong.progress): real counts, rate and time left, at most one line every few seconds,
and the final count; the stages use it (sampling, scoring, training, evaluation)."""

import io
import logging

import pytest

from sealong.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="sealong.test")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "sealong.test"]


def test_off_a_terminal_lines_have_real_counts_rate_and_eta_at_most_every_few_seconds(lines):
    clock, stream = Clock(), io.StringIO()  # a StringIO is no terminal
    progress = Progress(100, "prompts", "sample", logging.getLogger("sealong.test"), stream=stream, every=5.0,
                        clock=clock)
    assert progress.bar is None
    for i in range(100):  # one prompt every 0.3 s: 30 s in all
        clock.now += 0.3
        progress.update(1, **{"tokens/s": "12.5"})
    progress.close()
    got = lines()
    assert stream.getvalue() == ""  # no bar written to a log
    assert 5 <= len(got) <= 30 / 5 + 1, got
    counts = [int(line.split()[1].split("/")[0]) for line in got]
    assert counts == sorted(counts) and counts[0] > 0 and counts[-1] == 100  # the count moves
    assert got[0] == "sample 17/100 prompts (17%), 3.33 prompts/s, 25s left; tokens/s 12.5"
    assert got[-1].startswith("sample 100/100 prompts (100%), 3.33 prompts/s, 30s in all")


def test_resumed_work_counts_but_is_not_in_the_rate(lines):
    clock = Clock()
    progress = Progress(10, "steps", "train", logging.getLogger("sealong.test"), stream=io.StringIO(), every=1.0,
                        initial=6, clock=clock)
    clock.now = 2.0
    progress.update(1)
    assert lines() == ["train 7/10 steps (70%), 0.5 steps/s, 6s left"]
    progress.close()
    progress.close()
    assert len(lines()) == 1  # the last line already said 7/10; closing twice adds nothing


def test_disabled_says_nothing_and_a_terminal_gets_the_bar(lines):
    quiet = Progress(3, "outputs", "score", logging.getLogger("sealong.test"), enabled=False)
    quiet.update(3)
    quiet.close()
    assert lines() == []

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with Progress(2, "prompts", "sample", logging.getLogger("sealong.test"), stream=term) as bar:
        bar.update(2)
    assert bar.bar is not None and "2/2" in term.getvalue() and lines() == []


def test_the_sampler_logs_moving_counts_off_a_terminal(tmp_path, caplog, monkeypatch):
    """The sample stage with stderr not a terminal: every line's count is real (the issue's "0/N prompts")."""
    from test_sampler import stage_args, write_prompts
    from tiny_checkpoint import build_checkpoint

    from sealong import progress as P
    from sealong.sample import sampler as S

    monkeypatch.setattr(P, "EVERY", 0.0)  # a line per prompt
    caplog.set_level(logging.INFO, logger="sealong.sample")
    write_prompts(tmp_path / "prompts.jsonl", n=3)
    assert S.run(stage_args(build_checkpoint(tmp_path / "tiny"), tmp_path, "--batch-prompts", "1")) == 0
    got = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sample ")]
    assert [line.split()[1] for line in got] == ["1/3", "2/3", "3/3"], got


def test_the_score_stage_logs_moving_counts_off_a_terminal(tmp_path, caplog, monkeypatch):
    from test_mbr_stage import SAMPLES, _write

    from sealong import progress as P
    from sealong.score import mbr

    monkeypatch.setattr(P, "EVERY", 0.0)
    caplog.set_level(logging.INFO, logger="sealong.score")
    samples = _write(tmp_path / "s.jsonl", SAMPLES)
    mbr.score_file(samples, str(tmp_path / "o.jsonl"), mbr.ScoreConfig(utility="answer", chunk=2), log=io.StringIO())
    got = [r.getMessage().split()[2] for r in caplog.records if r.getMessage().startswith("score (answer) ")]
    assert got == ["5/12", "9/12", "10/12", "12/12"], got  # after each question: 5, 4, 1, 2 and 0 outputs


def test_the_trainer_logs_moving_counts_off_a_terminal(tmp_path, caplog, monkeypatch):
    from types import SimpleNamespace

    from sealong import progress as P
    from sealong.train.loop import Logger

    monkeypatch.setattr(P, "EVERY", 0.0)
    caplog.set_level(logging.INFO, logger="sealong.train")
    logger = Logger(SimpleNamespace(output_dir=str(tmp_path), report_to="none", progress=False), True, 1, 3)
    for step in (2, 3):
        logger.log(step, {"loss": 0.5, "lr": 1e-3, "grad_norm": 2.0, "tokens_per_s": 100.0}, write=True)
    logger.close()
    got = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train ")]
    assert [line.split()[1] for line in got] == ["2/3", "3/3"] and "loss 0.5000" in got[-1], got
