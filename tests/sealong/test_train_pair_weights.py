"""pair_weighting="margin" (Self-Consistency Preference Optimization, arXiv 2411.04109): pairs read with their
score_margin weigh margin / mean margin; equal margins train exactly as pair_weighting="none"; the first step's
weighted loss and every parameter's gradient equal a one-shot float64 computation of the weighted batch
objective (transformers' model, classic layout, reference.fused_linear_orpo_loss with pair_weights), with 1 or
4 pairs per micro-step; records without a usable margin are errors naming file:line."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from train_fixtures import build_tokenizer, tiny_setup, write_pairs, one_thread  # noqa: F401 (autouse fixture)

import sealong_kernels as sk
from sealong.config.parser import resolve
from sealong.train.distributed import setup
from sealong.train.loop import batch_indices, train
from sealong.train.config import make_config
from sealong.train.pairs import IGNORE, load_pairs

LOSS_RTOL = 1e-5  # float32 loop against float64, as test_train_loop.py
GRAD_RTOL = 1e-5  # per parameter tensor (measured 1.3e-6): float32 forward and backward vs float64


def _config(model, data, out, **overrides):
    values = dict(model=model, data=data, output_dir=out, batch_pairs=4, lr=5e-3, lora_r=4, lora_alpha=8,
                  lora_dropout=0.0, dtype="float32", progress=False, max_steps=2)
    values.update(overrides)
    return make_config(values).validate()


def _with_margins(path, margins):
    """Rewrite a pairs file with score_margin = margins[i] on record i."""
    records = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        for record, margin in zip(records, margins):
            f.write(json.dumps(dict(record, score_margin=margin)) + "\n")
    return path


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_equal_margins_train_exactly_as_unweighted(tmp_path):
    model, data = tiny_setup(str(tmp_path), n_pairs=8)
    _with_margins(data, [0.1] * 8)
    from sealong.model import load_tokenizer

    # 0.1 / (sum of eight 0.1 / 8) is 1.0000000000000002 in floating point; load_pairs' exact ratio is 1
    assert [p.weight for p in load_pairs(data, load_tokenizer(model), pair_weighting="margin").pairs] == [1.0] * 8
    runs = {}
    for weighting in ("none", "margin"):
        runs[weighting] = train(_config(model, data, str(tmp_path / weighting), pair_weighting=weighting,
                                        micro_batch_pairs=2), setup("cpu"))
    assert runs["margin"]["losses"] == runs["none"]["losses"]  # bit for bit, both steps
    a, b = (load_file(os.path.join(runs[w]["checkpoint"], "adapter", "adapter_model.safetensors")) for w in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _step_one(cfg):
    """(first step's logged loss, {parameter name: gradient at the first optimizer step}) of a full fine-tuning
    run: the gradients are read by an optimizer pre-step hook (max_grad_norm 0: unclipped)."""
    from sealong.model import load_model

    names = [n for n, _ in load_model(cfg.model, dtype=torch.float32).named_parameters()]  # build_model's order
    grads, records = {}, []

    def hook(optimizer, args, kwargs):
        if not grads:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            grads.update({n: p.grad.detach().clone() for n, p in zip(names, params, strict=True)})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        train(cfg, setup("cpu"), on_step=lambda step, record: records.append(record))
    finally:
        handle.remove()
    return records[0]["loss"], grads


def _one_shot_float64(model_dir, cfg, pairs, weights):
    """The weighted ORPO of the first batch and its gradient, at once, from transformers' LlamaForCausalLM in
    float64 on the classic padded layout [2B, T]."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    _, indices = batch_indices(0, len(pairs), len(pairs) // cfg.batch_pairs, cfg)
    batch = [pairs[i] for i in indices]
    seqs = [(p.prompt, p.chosen) for p in batch] + [(p.prompt, p.rejected) for p in batch]
    width = max(a.numel() + b.numel() for a, b in seqs)
    rows, labels = [], torch.full((len(seqs), width), IGNORE)
    for i, (prompt, answer) in enumerate(seqs):
        ids = torch.cat([prompt, answer])
        h = hf.model(ids[None]).last_hidden_state[0]
        rows.append(torch.cat([h, h.new_zeros(width - ids.numel(), h.shape[1])]))
        labels[i, prompt.numel() - 1:ids.numel() - 1] = answer  # labels[t] is predicted from hidden[t]
    w = torch.tensor([weights[p.id] for p in batch], dtype=torch.float64)
    loss, _ = sk.reference.fused_linear_orpo_loss(torch.stack(rows), hf.lm_head.weight, labels, beta=cfg.beta,
                                                  nll_reduction=cfg.nll_reduction, pair_weights=w)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in hf.named_parameters()}


@pytest.mark.parametrize("nll_reduction", ["sequence", "token"])
def test_weighted_step_matches_float64_one_shot(tmp_path, nll_reduction):
    from sealong.model import load_tokenizer

    model, data = tiny_setup(str(tmp_path), n_pairs=8)
    margins = [0.9, 0.05, 0.0, 0.4, 0.7, 0.25, 0.6, 0.1]
    _with_margins(data, margins)
    mean = sum(margins) / len(margins)
    weights = {f"q{i}": m / mean for i, m in enumerate(margins)}  # written out here, not load_pairs' code
    pairs = load_pairs(data, load_tokenizer(model), pair_weighting="margin").pairs
    assert [p.weight for p in pairs] == pytest.approx([weights[p.id] for p in pairs], rel=1e-15)
    want_loss, want_grads = _one_shot_float64(model, _config(model, data, "x", nll_reduction=nll_reduction), pairs,
                                              weights)
    unweighted = _one_shot_float64(model, _config(model, data, "x", nll_reduction=nll_reduction), pairs,
                                   dict.fromkeys(weights, 1.0))[0]
    assert abs(want_loss - unweighted) > 1e-3 * abs(unweighted)  # this batch's weights change the loss
    for micro in (1, 4):  # 4 micro-steps of 1 pair, or 1 of 4
        cfg = _config(model, data, str(tmp_path / f"m{micro}"), finetune="full", max_grad_norm=0.0, max_steps=1,
                      pair_weighting="margin", micro_batch_pairs=micro, nll_reduction=nll_reduction)
        loss, grads = _step_one(cfg)
        assert abs(loss - want_loss) <= LOSS_RTOL * abs(want_loss), micro
        assert set(grads) == set(want_grads)
        for name, grad in want_grads.items():
            assert _rel(grads[name], grad) < GRAD_RTOL, (micro, name, _rel(grads[name], grad))


def _pairs_file(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def _record(i, **extra):
    return dict({"id": f"q{i}", "prompt": "w1 w2 w3", "chosen_text": "w4 w5", "rejected_text": "w6"}, **extra)


def test_margins_are_normalized_over_all_pairs(tmp_path):
    tok = build_tokenizer()
    path = _pairs_file(tmp_path, [_record(0, score_margin=0.5), _record(1, skipped="no finished sample"),
                                  _record(2, score_margin=0), _record(3, score_margin=1)])
    data = load_pairs(path, tok, pair_weighting="margin")
    assert [p.weight for p in data.pairs] == [1.0, 0.0, 2.0]  # margin / mean margin (0.5); the skip has none
    assert "pair weights margin / mean (0..2)" in data.summary()
    assert [p.weight for p in load_pairs(path, tok).pairs] == [1.0, 1.0, 1.0]  # none: margins ignored
    assert "pair weights" not in load_pairs(path, tok).summary()


@pytest.mark.parametrize("record, message", [
    (_record(1), r"pairs.jsonl:2: pair_weighting=margin needs a finite score_margin >= 0 .*got null"),
    (_record(1, score_margin=-0.1), r"pairs.jsonl:2: .*score_margin >= 0 .*got -0.1"),
    (_record(1, score_margin=float("nan")), r"pairs.jsonl:2: .*got NaN"),
    (_record(1, score_margin="0.3"), r"pairs.jsonl:2: .*got \"0.3\""),
    (_record(1, score_margin=True), r"pairs.jsonl:2: .*got true"),
    ({"prompt": "w1 w2", "chosen": "w3", "rejected": "w4"},
     r"pairs.jsonl:2: pair_weighting=margin needs each pair's score_margin, and a TRL-format record"),
])
def test_unusable_margin_names_file_and_line(tmp_path, record, message):
    path = _pairs_file(tmp_path, [_record(0, score_margin=0.2), record])
    with pytest.raises(ValueError, match=message):
        load_pairs(path, build_tokenizer(), pair_weighting="margin")
    load_pairs(path, build_tokenizer())  # pair_weighting none reads the same file


def test_all_zero_margins_and_bad_option(tmp_path, capsys):
    path = _pairs_file(tmp_path, [_record(0, score_margin=0), _record(1, score_margin=0.0)])
    with pytest.raises(ValueError, match="pairs.jsonl: pair_weighting=margin, but every score_margin is 0"):
        load_pairs(path, build_tokenizer(), pair_weighting="margin")
    assert resolve("train", ["--model", "m", "--data", "d"]).cfg.pair_weighting == "none"
    assert resolve("train", ["--model", "m", "--data", "d", "--pair_weighting", "margin"]).cfg.pair_weighting == "margin"
    with pytest.raises(SystemExit):
        resolve("train", ["--model", "m", "--data", "d", "--pair_weighting", "vote"])
    assert "margin" in capsys.readouterr().err


def _train_on_rank(rank, world_size, runs):
    """Train each (cfg values) in turn on this rank; rank 0 returns the losses."""
    info = setup("cpu")
    return [train(make_config(values).validate(), info)["losses"] for values in runs]


@pytest.mark.slow
def test_weighted_losses_exact_over_ranks(tmp_path):
    """Data parallel 2 and sequence parallel 2 (ring) give the weighted losses of one process (float32: the
    order of sums differs, 1e-5 relative as tests/sealong/test_train_parallel.py)."""
    from gloo_harness import run_distributed

    model, data = tiny_setup(str(tmp_path), n_pairs=8)
    _with_margins(data, [0.9, 0.05, 0.0, 0.4, 0.7, 0.25, 0.6, 0.1])

    def values(out, **overrides):
        return dict(_config(model, data, str(tmp_path / out), pair_weighting="margin",
                            gradient_checkpointing=False, max_steps=1).to_dict(), **overrides)

    single = train(make_config(values("single")).validate(), setup("cpu"))["losses"]
    dp2, sp2 = run_distributed(_train_on_rank, 2, args=([values("dp2"), values("sp2", sp=2)],))[0]
    for name, got in (("dp2", dp2), ("sp2", sp2)):
        assert _rel(torch.tensor(got), torch.tensor(single)) < LOSS_RTOL, (name, got, single)
