"""bench/bench_vs_anchors.py on a tiny random Llama: each row's code path runs once (so the benchmark cannot rot),
the contenders see the same inputs, and the ORPO losses of sealong train, sealong_kernels.trl and TRL + peft agree
to the TRL interop tests' tolerance. No timing is asserted."""

import pytest
import torch
from tiny_checkpoint import build_checkpoint, one_thread  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM

from bench import bench_vs_anchors as bench
from sealong.model import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_checkpoint(str(tmp_path_factory.mktemp("anchors") / "ckpt"), max_positions=512)
    return folder, load_model(folder, dtype=torch.float32), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_sampling_and_prefill_rows_count_what_each_contender_prefilled(tiny):
    folder, ours, hf = tiny
    (_, ids), = bench.musique_prompts(load_tokenizer(folder), 48)
    assert 40 <= len(ids) <= 48
    row = bench.sampling_row(ours, hf, ids, 4, 3, 1, "cpu")
    assert row["output_tokens"] == [12, 12]  # 4 samples x 3 tokens each, no early stop on either side
    assert row["sealong_prefilled"] == len(ids) and row["transformers_prefilled"] == 4 * len(ids)
    assert row["sealong_peak_bytes"] >= 0 and row["load"]
    pre = bench.prefill_row(ours, hf, ids, 1, "cpu")
    assert pre["prompt_tokens"] == len(ids) and pre["sealong_s"] > 0


def test_mbr_row_equals_the_authors_numpy_scores():
    row = bench.mbr_row(3, 32, 16, 1, "cpu")
    assert row["max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_orpo_row_losses_agree_across_the_three_trainers(tiny, tmp_path):
    pytest.importorskip("trl")
    folder, _, _ = tiny
    pairs = bench.preference_pairs(load_tokenizer(folder), 40, 2)
    assert len(pairs) == 2 and pairs[0]["chosen"] != pairs[0]["rejected"]
    row = bench.orpo_row(folder, pairs, 3, 4, str(tmp_path), "cpu")
    base = row["trl_peft"]["losses"]
    assert len(base) == 3 and base[-1] != base[0]
    ours = row["sealong_kernels_trl"]
    assert ours["losses"] == pytest.approx(base, rel=2e-4, abs=2e-5), (ours["losses"], base)
    assert ours["max_rel_loss_diff_vs_trl"] < 2e-4
    # `sealong train` with nll_tokens="all" (TRL's NLL over prompt + chosen answer), every step: the same loss
    # before any update and after each AdamW step (schedule, clipping, LoRA init and scale as TRL + peft)
    train = row["sealong_train"]
    assert train["losses"] == pytest.approx(base, rel=2e-4, abs=2e-5), (train["losses"], base)
    assert train["max_rel_loss_diff_vs_trl"] < 2e-4


def test_sampling_cases_run_the_missing_rows():
    """--cases picks the sampling rows (the ones a full run missed: N = 32 at 1K, N = 8 at 2K), cheapest first;
    --quick keeps its tiny rows whatever --cases says."""
    args = bench.parser().parse_args(["--rows", "sampling", "--cases", "1024:32", "2048:8"])
    assert bench.sampling_plan(args) == [(2048, 8), (1024, 32)]
    assert bench.sampling_plan(bench.parser().parse_args([]))[:2] == [(1024, 1), (1024, 8)]
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--cases", "1024x32"])
    args = bench.parser().parse_args(["--quick", "--cases", "4096:32"])
    for k, v in bench.QUICK.items():
        setattr(args, k, v)
    assert bench.sampling_plan(args) == [(96, 1), (96, 4)]
