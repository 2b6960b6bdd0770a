"""TRL's preference format: `sealong score --pairs-format trl` writes it, `load_pairs` reads it (messages or
strings; JSON lines, JSON, a datasets folder) with the same tokens as sealong's own records, and a mixed TRL
file trains with `python -m sealong.train`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from train_fixtures import build_tokenizer, make_model_folder, sentence, one_thread  # noqa: F401 (autouse fixture)

from sealong.score import mbr, stage
from sealong.train.pairs import load_pairs


def write_samples(path, n=4, seed=0):
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            outputs = [sentence(rng, 2, 6) for _ in range(4)]
            f.write(json.dumps({"id": f"q{i}", "question": sentence(rng, 3, 5), "context": sentence(rng, 8, 12),
                                "outputs": outputs, "finish_reasons": ["stop"] * 4}) + "\n")
    return path


def same_pairs(a, b):
    assert len(a.pairs) == len(b.pairs) > 0
    for x, y in zip(a.pairs, b.pairs):
        assert x.id == y.id
        for name in ("prompt", "chosen", "rejected"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (x.id, name)


def test_score_writes_trl_pairs_that_load_as_sealong_pairs(tmp_path):
    samples = write_samples(tmp_path / "samples.jsonl")
    ours, trl = tmp_path / "pairs.jsonl", tmp_path / "pairs_trl.jsonl"
    for pairs, fmt in ((ours, "sealong"), (trl, "trl")):
        code = stage.main(["--samples", str(samples), "--out", str(tmp_path / f"scores_{fmt}.jsonl"), "--pairs",
                         str(pairs), "--utility", "random", "--pairs-format", fmt])
        assert code == 0
    record = json.loads(trl.read_text().splitlines()[0])
    assert set(record) == {"id", "prompt", "chosen", "rejected"}
    assert record["prompt"][0]["role"] == "user" and record["chosen"][0]["role"] == "assistant"
    tok = build_tokenizer()
    same_pairs(load_pairs(str(ours), tok), load_pairs(str(trl), tok))
    with pytest.raises(ValueError, match="pairs_format: expected one of sealong, trl"):
        mbr.ScoreConfig(pairs_format="dpo")


def test_trl_strings_messages_json_and_datasets_folder(tmp_path):
    tok = build_tokenizer()
    rows = [{"prompt": "w1 w2 w3", "chosen": "w4 w5", "rejected": "w6"},
            {"prompt": [{"role": "user", "content": "w7 w8"}], "chosen": [{"role": "assistant", "content": "w9"}],
             "rejected": [{"role": "assistant", "content": "w10 w11"}]},
            {"chosen": [{"role": "user", "content": "w7 w8"}, {"role": "assistant", "content": "w9"}],   # implicit
             "rejected": [{"role": "user", "content": "w7 w8"}, {"role": "assistant", "content": "w10 w11"}]}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_pairs(str(jsonl), tok)
    p0, p1, p2 = data.pairs
    # strings: plain text with BOS (TRL applies no template to strings); messages: the chat template
    assert tok.convert_ids_to_tokens(p0.prompt.tolist()) == ["<s>", "w1", "w2", "w3"]
    assert tok.convert_ids_to_tokens(p1.prompt.tolist()) == ["<s>", "user:", "w7", "w8", "assistant:"]
    assert tok.convert_ids_to_tokens(p0.chosen.tolist()) == ["w4", "w5", "</s>"]
    assert tok.convert_ids_to_tokens(p1.rejected.tolist()) == ["w10", "w11", "</s>"]
    for name in ("prompt", "chosen", "rejected"):
        assert torch.equal(getattr(p1, name), getattr(p2, name))
    table = tmp_path / "p.json"
    table.write_text(json.dumps({key: [r.get(key) for r in rows[:2]] for key in ("prompt", "chosen", "rejected")}))
    same_pairs(load_pairs(str(table), tok), load_pairs(str(jsonl), tok).__class__(pairs=data.pairs[:2]))
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (it comes with the trl extra)")
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[1:2] * 2)}).save_to_disk(str(folder))
    assert [torch.equal(p.chosen, p1.chosen) for p in load_pairs(str(folder), tok).pairs] == [True, True]


def test_trl_format_errors_name_the_record(tmp_path):
    tok = build_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w1", "chosen": "w2", "rejected": "w3"}) + "\n"
                   + json.dumps({"prompt": [{"role": "user", "content": "w1"}], "chosen": "w2", "rejected": "w3"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'prompt' must be a string"):
        load_pairs(str(bad), tok)
    two = tmp_path / "two.json"
    two.write_text(json.dumps([{"prompt": [{"role": "user", "content": "w1"}],
                                "chosen": [{"role": "assistant", "content": "w2"}, {"role": "user", "content": "w3"}],
                                "rejected": [{"role": "assistant", "content": "w4"}]}]))
    with pytest.raises(ValueError, match=r"two.json: record 1: field 'chosen' must hold one assistant message"):
        load_pairs(str(two), tok)


def test_trl_jsonl_trains_with_python_m_sealong_train(tmp_path):
    model = make_model_folder(str(tmp_path / "model"))
    rows = []
    for i in range(4):
        words = [f"w{(7 * i + k) % 90}" for k in range(12)]
        if i % 2:
            rows.append({"prompt": " ".join(words[:8]), "chosen": " ".join(words[8:10]), "rejected": words[11]})
        else:
            rows.append({"prompt": [{"role": "user", "content": " ".join(words[:8])}],
                         "chosen": [{"role": "assistant", "content": " ".join(words[8:10])}],
                         "rejected": [{"role": "assistant", "content": words[11]}]})
    data = tmp_path / "trl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run([sys.executable, "-m", "sealong.train", "--model", model, "--data", str(data),
                          "--output_dir", str(out), "--batch_pairs", "2", "--lora_r", "4", "--dtype", "float32",
                          "--progress", "false", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "data: 4 pairs" in run.stdout + run.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
