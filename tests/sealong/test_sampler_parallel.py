"""Data-parallel sampling: the split by prompt length, shard files, the merge, and torchrun with 2 gloo ranks."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from test_sampler import stage_args, write_prompts
from tiny_checkpoint import build_checkpoint

from sealong.config.parser import resolve
from sealong.jsonl import JsonlError
from sealong.sample import sampler as S
from sealong.sample import shards


def test_plan_balances_tokens_deterministically():
    lengths = [50, 10, 40, 10, 30, 20, 20, 5]
    parts = shards.plan(lengths, 3)
    assert parts == shards.plan(lengths, 3) and sorted(i for p in parts for i in p) == list(range(8))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert parts == [[0, 1, 7], [2, 6], [3, 4, 5]] and loads == [65, 60, 60]  # 50+10+5 | 40+20 | 30+20+10
    assert shards.plan([7, 7, 7, 7], 2) == [[0, 2], [1, 3]]  # ties: earlier prompt first, lowest rank first
    assert shards.plan([3], 4) == [[0], [], [], []]
    with pytest.raises(ValueError, match="world size must be >= 1"):
        shards.plan([1], 0)


def line(i):
    return json.dumps({"id": f"q{i}", "v": i}) + "\n"


def test_merge_orders_dedups_and_cuts_torn_lines(tmp_path):
    out = str(tmp_path / "samples.jsonl")
    open(out, "w").write(line(0) + line(3) + '{"id": "q5", "v"')  # a torn last line from a crash
    open(shards.shard_path(out, 0), "w").write(line(2) + line(0) + '{"id": "q4"')
    open(shards.shard_path(out, 1), "w").write(line(1) + line(9))
    assert shards.merge(out, [f"q{i}" for i in range(6)]) == 5
    assert open(out).read() == line(0) + line(1) + line(2) + line(3) + line(9)  # q9: unknown id, kept last
    assert shards.shard_files(out) == [] and not os.path.exists(out + ".merge-tmp")
    assert shards.merge(out, []) == 5 and open(out).read().count("\n") == 5  # no shard: untouched
    open(shards.shard_path(out, 3), "w").write('{"id": "q7"}\nnot json\n')
    with pytest.raises(JsonlError, match=r"samples.jsonl.shard-00003:2: not valid JSON"):
        shards.merge(out, [])


def test_flags_give_the_config_back():
    cfg = resolve("sample", ["--model", "m", "--prompts", "p #1", "--output", "o=x", "--trust-remote-code",
                             "--nproc-per-node", "2", "--temperature", "0.5", "--decode-slots", "7"]).cfg
    again = resolve("sample", shards.flags_of(cfg)).cfg
    assert again == dataclasses.replace(cfg, nproc_per_node=1)


def torchrun(nproc, target, *flags, ok=True):
    """`torchrun --standalone` of the sampler module (or a script) on `nproc` CPU ranks -> (exit code, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target, *flags]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done.stderr


def test_two_gloo_ranks_killed_and_resumed_equal_one_process(tmp_path):
    """torchrun with 2 CPU ranks, rank 1 dying in the middle of its second record (torchrun stops rank 0); a
    re-run through `--nproc-per-node 2` folds in the shards, redoes only the missing ids, and the merged
    output is byte-identical to a one-process run's, each id once."""
    ckpt = build_checkpoint(tmp_path / "tiny")
    write_prompts(tmp_path / "prompts.jsonl", n=5)
    flags = ["--decode-slots", "4", "--seed", "3"]
    one = tmp_path / "one.jsonl"
    assert S.run(stage_args(ckpt, tmp_path, "--output", str(one), *flags)) == 0
    argv = shards.flags_of(stage_args(ckpt, tmp_path, *flags))
    out = tmp_path / "samples.jsonl"
    torchrun(2, [os.path.join(os.path.dirname(__file__), "crash_rank.py")], *argv, ok=False)
    assert not out.exists() and open(shards.shard_path(str(out), 1)).read().endswith('{"id": "torn')
    done = subprocess.run([sys.executable, "-m", "sealong.sampler", *argv, "--nproc-per-node", "2"], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    already = int(done.stderr.split(" already in ")[0].rsplit(", ", 1)[1])
    assert 1 <= already < 5  # rank 1's first record (and whatever rank 0 wrote) was kept, not redone
    assert out.read_bytes() == one.read_bytes() and shards.shard_files(str(out)) == []
    assert "slot utilization" in done.stderr and "x 2 rank(s)" in done.stderr


def test_sample_stage_and_pipeline_launch_torchrun(tmp_path, monkeypatch):
    """`sealong sample --nproc-per-node 2` starts torchrun with the stage's values (YAML < flags); the pipeline's
    sampling steps pass on its --nproc-per-node."""
    from sealong import cli, launch, pipeline

    calls = []
    monkeypatch.setattr(launch, "run_job", lambda cmd, **kw: calls.append(cmd) or 0)  # the process-group launcher
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "context": "c", "question": "q"}\n')
    assert cli.main(["sample", "--nproc-per-node", "2", "--model", "m", "--prompts", str(prompts), "--output",
                     "o.jsonl", "--temperature", "0.5", "--trust-remote-code"]) == 0
    cmd = calls[0]
    assert cmd[1:8] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "sealong.sampler", "--model=m"]
    again = resolve("sample", cmd[7:]).cfg
    assert (again.temperature, again.num_samples, again.trust_remote_code, again.nproc_per_node) == (0.5, 32, True, 1)
    seen = []
    monkeypatch.setattr(pipeline.Runner, "call", lambda self, stage, **values: seen.append((stage, values)))
    configs = {"sample": resolve("sample", ["--model", "m", "--prompts", "p", "--output", "o"]).cfg}
    runner = pipeline.Runner(resolve("pipeline", ["--run-dir", str(tmp_path), "--nproc-per-node", "4"]).cfg, configs, "paper")
    pipeline.step_sample_and_score(runner, "m")
    assert [stage for stage, _ in seen] == ["sample", "score"]
    assert all(values["nproc_per_node"] == 4 for _, values in seen)


def test_one_process_resume_keeps_prompt_order(tmp_path):
    """One process is rank 0 of 1: its records go to a shard as prompts finish, merged in prompt order, so a
    resume after a crash that kept only a later prompt gives the fresh run's bytes."""
    ckpt = build_checkpoint(tmp_path / "tiny")
    write_prompts(tmp_path / "prompts.jsonl", n=3)
    out = tmp_path / "samples.jsonl"
    assert S.run(stage_args(ckpt, tmp_path, "--decode-slots", "2")) == 0
    fresh = out.read_bytes()
    out.write_bytes(fresh.splitlines(keepends=True)[2])
    assert S.run(stage_args(ckpt, tmp_path, "--decode-slots", "2")) == 0
    assert out.read_bytes() == fresh and shards.shard_files(str(out)) == []


@pytest.mark.parametrize("stage, flag, line, message", [
    ("sample", "--prompts", '{"id": "a", "context": "c", "question": "q"}', "in.jsonl:2: duplicate id 'a'"),
    ("score", "--samples", '{"id": "a", "outputs": ["x", "y"]', "in.jsonl:2: not valid JSON"),
])
def test_data_parallel_input_errors_are_one_line_and_rc_2_before_torchrun(tmp_path, capsys, monkeypatch, stage, flag,
                                                                        line, message):
    """`sealong sample|score --nproc-per-node 2` reads its input before torchrun starts: a bad line is one
    `sealong STAGE: error: FILE:LINE: ...` and exit 2, as in one process (the workers' 2 became torchrun's 1)."""
    from sealong import cli

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("torchrun must not start"))
    first = {"sample": '{"id": "a", "context": "c", "question": "q"}', "score": '{"id": "a", "outputs": ["x", "y"]}'}[stage]
    path = tmp_path / "in.jsonl"
    path.write_text(first + "\n" + line + "\n")
    out = ["--output", str(tmp_path / "o.jsonl")] if stage == "sample" else ["--out", str(tmp_path / "o.jsonl")]
    assert cli.main([stage, "--nproc-per-node", "2", "--model", "m", flag, str(path), *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sealong {stage}: error: ") and message in err and err.count("\n") == 1, err
