"""`sealong pipeline` checks every stage's settings and every resource before its first step and refuses in one
line (exit 2): the training batch's divisibility, the embedder folder of the paper preset and its remote code,
the paper's lengths on the demo's tiny model, a model's positions and memory, a broken --model folder."""

import pytest

from sealong import cli
import sealong.pipeline as pipeline
import sealong.preflight as preflight


@pytest.fixture
def no_work(monkeypatch):
    """Any step that starts is a failure: the refusal must come first."""
    for step in ("step_base_model", "step_synth", "step_evaluate"):
        monkeypatch.setattr(pipeline, step, lambda *a, **k: pytest.fail("a step started before the refusal"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "m")


def _refused(capsys, argv, message):
    try:
        rc = cli.main(["--log-level", "error", "pipeline", *argv])  # no log lines of earlier tests
    except SystemExit as done:
        rc = done.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("sealong pipeline: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    return err


def test_batch_pairs_not_divisible_is_refused_before_any_work(tmp_path, capsys, no_work):
    run = tmp_path / "run"
    _refused(capsys, ["--run-dir", str(run), "--batch-pairs", "4"],
             "--batch-pairs: batch_pairs=4 is not divisible by dp=1 x micro_batch_pairs=8")
    _refused(capsys, ["--run-dir", str(run), "--nproc-per-node", "3", "--train-args", "--sp 2 --micro_batch_pairs 1"],
             "--nproc-per-node 3 is not a multiple of the training job's sp=2")
    assert not run.exists()


def test_paper_preset_without_model_is_refused_fast(tmp_path, capsys, no_work):
    _refused(capsys, ["--run-dir", str(tmp_path / "run"), "--preset", "paper"],
             "the demo's tiny model (1024 positions), but contexts of up to 31744 tokens + 1024 new tokens need 32768")
    assert not (tmp_path / "run").exists()


def test_tiny_warmup_memory_estimate(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.setattr(preflight, "host_memory", lambda: 1 << 20)  # 1 MiB: the warm-up's mask does not fit
    _refused(capsys, ["--run-dir", str(tmp_path / "run")], "the tiny model's warm-up needs about")


def test_paper_lengths_against_the_model_positions(tmp_path, capsys, no_work, model_dir):
    _refused(capsys, ["--run-dir", str(tmp_path / "run"), "--model", model_dir],
             "--max-tokens 31744 + --max-new-tokens 1024 = 32768 positions, more than the 256 of")


def test_paper_embedder_folder_its_remote_code_and_memory(tmp_path, capsys, no_work, model_dir, monkeypatch):
    monkeypatch.setenv("SEALONG_JINA_V3", str(tmp_path / "nowhere" / "jina-embeddings-v3"))
    argv = ["--run-dir", str(tmp_path / "run"), "--model", model_dir, "--min-tokens", "60", "--max-tokens", "100",
            "--max-new-tokens", "16"]
    _refused(capsys, argv, "--embedding-model jina-embeddings-v3: no model folder at")
    jina = tmp_path / "jina-embeddings-v3"
    jina.mkdir()
    (jina / "config.json").write_text("{}")
    monkeypatch.setenv("SEALONG_JINA_V3", str(jina))
    _refused(capsys, argv, "jina-embeddings-v3 is a custom-code model (loading it runs Python code from its folder "
             "and the Hugging Face cache): pass --trust-remote-code to allow it")
    monkeypatch.setattr(preflight, "device_memory", lambda device: (1 << 10, "host memory (MemAvailable)"))
    _refused(capsys, argv + ["--trust-remote-code"],
             "of KV cache for 1 prompt(s) and 32 decode slots), more than the 1.0 KiB of host memory")
    assert not (tmp_path / "run").exists()


def test_embedder_folder_missing(tmp_path, capsys, no_work):
    _refused(capsys, ["--run-dir", str(tmp_path / "run"), "--embedding-model", str(tmp_path / "no" / "embedder")],
             "--embedding-model: no folder")


def test_broken_model_config_names_the_file(tmp_path, capsys, no_work):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 64,')
    _refused(capsys, ["--run-dir", str(tmp_path / "run"), "--model", str(folder)], f"{folder / 'config.json'}: ")
