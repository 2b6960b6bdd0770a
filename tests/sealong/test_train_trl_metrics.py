"""sealong.train logs TRL's full set of ORPO metric names; logits/chosen and logits/rejected (the mean logit
over the answer tokens, computed without logits) equal transformers' logits averaged the same way."""

import torch
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from sealong.train.config import make_config
from sealong.train.distributed import setup
from sealong.train.loop import batch_indices, train
from sealong.train.loss import METRIC_NAMES
from sealong.train.pairs import load_pairs

TRL_NAMES = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"}


def test_logged_metrics_are_trls_with_mean_logits_of_the_answers(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    cfg = make_config(dict(model=model, data=data, output_dir=str(tmp_path / "out"), batch_pairs=4, lr=1e-3,
                           lora_r=4, lora_alpha=8, lora_dropout=0.0, dtype="float32", progress=False, max_steps=1)).validate()
    records = []
    train(cfg, setup("cpu"), on_step=lambda step, record: records.append(record))
    assert set(METRIC_NAMES) == TRL_NAMES and TRL_NAMES <= set(records[0])

    # reference: transformers' logits of the first batch (LoRA starts as the identity), mean over the vocabulary,
    # then over every chosen (rejected) answer token of the batch
    pairs = load_pairs(data, AutoTokenizer.from_pretrained(model), max_length=cfg.max_length).pairs
    _, indices = batch_indices(0, len(pairs), len(pairs) // cfg.batch_pairs, cfg)
    hf = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    totals = {"chosen": [0.0, 0], "rejected": [0.0, 0]}
    with torch.no_grad():
        for i in indices:
            pair = pairs[i]
            for name in totals:
                answer = getattr(pair, name)
                logits = hf(torch.cat([pair.prompt, answer])[None]).logits[0]
                p = pair.prompt.numel()
                totals[name][0] += float(logits[p - 1:p - 1 + answer.numel()].mean(-1).sum())
                totals[name][1] += answer.numel()
    for name, (total, count) in totals.items():
        want = total / count
        assert abs(records[0][f"logits/{name}"] - want) <= 1e-5 * max(1.0, abs(want)), (name, records[0], want)
