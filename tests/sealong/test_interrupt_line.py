"""Ctrl-C in a stage (sealong.interrupt, sealong.config.parser.stage_main): one line naming what was kept and that
the same command resumes, exit code 130; a torchrun worker of a sealong launcher says nothing; an error raised
after a SIGINT (a collective failing because another rank stopped) is the interrupt, not a traceback."""

import json

import pytest

from sealong import interrupt
from sealong.config.parser import stage_main
from sealong.sample import sampler as S


@pytest.fixture
def interrupted_sampler(tmp_path, monkeypatch):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "s.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "context": "c", "question": "q"}) + "\n" for i in range(3)))
    out.write_text(json.dumps({"id": "q0"}) + "\n")
    (tmp_path / "s.jsonl.shard-00001").write_text(json.dumps({"id": "q2"}) + "\n" + '{"id": "q1", "tor')
    monkeypatch.delenv("SEALONG_LAUNCHED", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(interrupt, "_seen", [])
    return ["--model", "m", "--prompts", str(prompts), "--output", str(out)]


def test_ctrl_c_is_one_line_of_what_was_kept_and_exit_130(interrupted_sampler, monkeypatch, capsys, tmp_path):
    def run(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "run", run)
    assert stage_main("sample", interrupted_sampler, prog="sealong sample") == 130
    assert capsys.readouterr().err.splitlines() == [
        f"sealong sample: interrupted: 2 of 3 prompts' samples kept ({tmp_path / 's.jsonl'} and its shard files); "
        "the same command resumes"]


def test_a_launched_worker_is_silent_and_an_error_after_sigint_is_the_interrupt(interrupted_sampler, monkeypatch,
                                                                               capsys):
    def run(args):
        interrupt._seen.append(2)  # what the SIGINT handler of `interrupt.watch` notes
        raise RuntimeError("gloo: connection closed by peer")

    monkeypatch.setattr(S, "run", run)
    monkeypatch.setenv("SEALONG_LAUNCHED", "1")
    assert stage_main("sample", interrupted_sampler) == 130
    assert capsys.readouterr().err == ""
    def fails(args):
        raise RuntimeError("gloo: connection closed by peer")

    monkeypatch.setattr(interrupt, "_seen", [])
    monkeypatch.setattr(S, "run", fails)
    with pytest.raises(RuntimeError, match="gloo"):  # without a SIGINT an error stays an error
        stage_main("sample", interrupted_sampler)
