"""sealong_kernels.trl: TRL's ORPOTrainer and ours train a tiny Llama for 3 steps with the same losses and
metrics (float32 tolerance), ours without any [B, T, V] tensor; the Liger-style loss object matches TRL's
formulas with Liger's call signature and return shape."""

import copy

import pytest
import torch
from size_recorder import SizeRecorder
from trl_fixtures import VOCAB, build_tokenizer, orpo_args, preference_rows, require_trl, tiny_llama, tiny_lora

import sealong_kernels as sk


def train(trainer_class, ORPOConfig, tmp_path, model, rows, steps=3, record=False, strategy="auto", **extra):
    from datasets import Dataset

    trainer = trainer_class(model=model, args=orpo_args(ORPOConfig, tmp_path / trainer_class.__module__, steps),
                            train_dataset=Dataset.from_list(rows), processing_class=build_tokenizer(), **extra)
    if record:
        if hasattr(trainer, "orpo_loss_fn"):  # ours
            trainer.orpo_loss_fn.chunk_size = 8  # logits chunks of [8, V]
            trainer.orpo_loss_fn.strategy = strategy
        with SizeRecorder() as rec:
            trainer.train()
        return trainer, rec.largest
    trainer.train()
    return trainer, None


@pytest.mark.parametrize("lora", [False, True])
def test_our_trainer_matches_trl_for_three_steps(tmp_path, lora):
    """Training logs, then evaluation (TRL's prediction_step and eval_ metrics), full fine-tuning and LoRA."""
    from datasets import Dataset

    ORPOConfig, TRLTrainer = require_trl()
    model = tiny_llama()
    rows = preference_rows(4)
    extra = {"eval_dataset": Dataset.from_list(preference_rows(2, seed=5)), "peft_config": tiny_lora() if lora else None}
    theirs, _ = train(TRLTrainer, ORPOConfig, tmp_path, copy.deepcopy(model), rows, **extra)
    ours, _ = train(sk.trl.ORPOTrainer, ORPOConfig, tmp_path, model, rows, **extra)
    assert isinstance(ours, TRLTrainer)
    logs_t = [h for h in theirs.state.log_history if "loss" in h]
    logs_o = [h for h in ours.state.log_history if "loss" in h]
    assert len(logs_t) == len(logs_o) == 3
    names = {"loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "log_odds_ratio",
             "log_odds_chosen", "grad_norm"}
    for step, (t, o) in enumerate(zip(logs_t, logs_o)):
        assert names <= set(t) and set(t) == set(o), (set(t) ^ set(o))
        for name in names:
            assert o[name] == pytest.approx(t[name], rel=2e-4, abs=2e-5), (step, name, o[name], t[name])
    assert logs_o[-1]["loss"] < logs_o[0]["loss"]  # it trains
    eval_t, eval_o = theirs.evaluate(), ours.evaluate()
    assert set(eval_t) == set(eval_o) and {"eval_loss", "eval_logits/chosen", "eval_nll_loss"} <= set(eval_o)
    for name in eval_t:
        if "runtime" not in name and "per_second" not in name:
            assert eval_o[name] == pytest.approx(eval_t[name], rel=2e-4, abs=2e-5), (name, eval_o[name], eval_t[name])


@pytest.mark.parametrize("lora", [False, True])
def test_our_trainer_allocates_no_batch_by_vocabulary_tensor(tmp_path, lora):
    """Full fine-tuning ("recompute": the head trains) and LoRA (default strategy: the head is frozen)."""
    ORPOConfig, TRLTrainer = require_trl()
    extra = {"peft_config": tiny_lora() if lora else None}
    rows = preference_rows(2, seed=1)
    tok = build_tokenizer()
    longest = max(len(tok(r["prompt"] + " " + max(r["chosen"], r["rejected"], key=len))["input_ids"]) for r in rows)
    # the concatenated batch is [2B, T, V] with B = 2 and T >= the longest prompt + answer (+ BOS, EOS)
    logits_bytes = 4 * (longest - 1) * VOCAB * 4
    # a trained head: "auto" would keep per-sum [V, H] accumulators ("deferred"), within a budget
    strategy = "auto" if lora else "recompute"
    _, (ours, op) = train(sk.trl.ORPOTrainer, ORPOConfig, tmp_path, tiny_llama(), rows, steps=1, record=True,
                          strategy=strategy, **extra)
    assert ours < logits_bytes, (ours, op, logits_bytes)
    _, (theirs, _) = train(TRLTrainer, ORPOConfig, tmp_path, tiny_llama(), rows, steps=1, record=True, **extra)
    assert theirs >= logits_bytes  # the recorder sees TRL's logits


def trl_formulas(hidden, weight, bias, target, nll_target, beta):
    """TRL's ORPO on full logits (trl/experimental/orpo/orpo_trainer.py, in float64)."""
    logits = (hidden.double() @ weight.double().T + bias.double()).log_softmax(-1)
    b = target.shape[0] // 2

    def mean_logp(labels):
        mask = labels != -100
        lp = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (lp * mask).sum(-1) / mask.sum(-1)

    lp = mean_logp(target)
    c, r = lp[:b], lp[b:]
    nll_mask = nll_target[:b] != -100
    nll = -(logits[:b].gather(-1, nll_target[:b].clamp(min=0)[..., None])[..., 0] * nll_mask).sum() / nll_mask.sum()
    log_odds = (c - r) - (torch.log1p(-c.exp()) - torch.log1p(-r.exp()))
    ratio = torch.nn.functional.logsigmoid(log_odds)
    raw = hidden.double() @ weight.double().T + bias.double()
    return nll - beta * ratio.mean(), (c, r, raw[:b].mean(), raw[b:].mean(), nll, beta * c, beta * r, ratio.mean(),
                                       log_odds.mean())


@pytest.mark.parametrize("with_nll_target", [True, False])
def test_liger_style_loss_object_matches_trl_formulas(with_nll_target):
    b, t, h, v = 3, 12, 16, 40
    hidden = torch.randn(2 * b, t, h, requires_grad=True)
    weight = torch.randn(v, h) * 0.3
    bias = torch.randn(v)
    ids = torch.randint(0, v, (2 * b, t))
    prompt = torch.randint(2, 6, (2 * b, 1))
    pad = t - torch.randint(0, 3, (2 * b, 1))
    pos = torch.arange(t)[None]
    target = torch.where((pos >= prompt) & (pos < pad), ids, -100)
    nll_target = torch.where(pos < pad, ids, -100) if with_nll_target else None
    loss_fn = sk.trl.LigerORPOLoss(beta=0.2, chunk_size=7)
    loss, extras = loss_fn(weight, hidden, target, bias, nll_target=nll_target)
    want_loss, want = trl_formulas(hidden, weight, bias, target, target if nll_target is None else nll_target, 0.2)
    assert len(extras) == 9 and extras[0].shape == (b,) and extras[5].shape == (b,)
    assert float(loss.detach()) == pytest.approx(float(want_loss.detach()), rel=1e-5)
    for got, expected in zip(extras, want):
        torch.testing.assert_close(got.double(), expected.detach().double(), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, hidden)
    (want_grad,) = torch.autograd.grad(want_loss, hidden)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_mixed_precision_runs_the_head_in_the_autocast_dtype():
    """TRL's bf16=True: bfloat16 hidden states from autocast, float32 head weights (no dtype error)."""
    hidden = torch.randn(4, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16) * 0.3
    target = torch.where(torch.arange(9)[None] >= 3, torch.randint(0, 40, (4, 9)), -100)
    want, _ = sk.trl.LigerORPOLoss()(weight, hidden, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, extras = sk.trl.LigerORPOLoss()(weight, hidden.bfloat16(), target)
    loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=3e-2)


def test_trl_module_imports_without_touching_trl():
    """`import sealong_kernels` never imports TRL (the optional extra); the loss object needs none."""
    import subprocess
    import sys

    code = ("import sys, sealong_kernels as sk; assert 'trl' not in sys.modules; "
            "from sealong_kernels.trl import LigerORPOLoss; assert 'trl' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
