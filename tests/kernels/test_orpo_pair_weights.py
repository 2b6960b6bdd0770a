"""Per-pair weights in the fused ORPO / SFT loss (Self-Consistency Preference Optimization, arXiv 2411.04109):
the kernel with random weights equals the float64 reference (loss, metrics, hidden / weight / bias gradients)
in both layouts, both NLL reductions, ORPO and SFT; the reference equals the weighted formula written out on
full logits; weights of ones give today's loss and gradients bit for bit; bad weights name the argument.

float32 under the Triton interpreter; tolerance 2e-5 relative, as test_orpo_loss.py (float32 logits / LSE
rounding against float64)."""

import pytest
import torch
from test_orpo_loss import METRICS, check, classic_batch, packed_batch, run_both

import sealong_kernels as sk
from sealong_kernels import reference as ref

TOL = 2e-5


def _packed(v, h, lengths, device):
    """(hidden [N, H], weight [V, H], bias [V], labels, packed keywords) float64 of a packed batch (packed_batch)."""
    seq, seg, lab = packed_batch(len(lengths), v, device, lengths)
    hidden, weight, bias = (torch.randn(*shape, dtype=torch.float64, device=device) / 3
                            for shape in ((seq.shape[0], h), (v, h), (v,)))
    return hidden, weight, bias, lab, dict(sequence_ids=seq, segment_ids=seg)


def _weights(pairs, device):
    """Random weights in [0, 3) with one exact zero (a pair that counts for nothing)."""
    w = torch.rand(pairs, dtype=torch.float64, device=device) * 3
    w[1] = 0.0
    return w


@pytest.mark.parametrize("mode", ["orpo", "sft"])
@pytest.mark.parametrize("nll_reduction", ["token", "sequence"])
def test_classic_weighted_matches_reference(mode, nll_reduction, device):
    # T=19, H=13, V=157, chunk 5: nothing divides anything; 3 ORPO pairs (6 rows) or 6 SFT rows
    hidden, weight, bias, labels = classic_batch(3, 19, 13, 157, [5, 11, 2, 7, 9, 1], device)
    pairs = 3 if mode == "orpo" else 6
    kernel, reference, grads = run_both(hidden, weight, bias, labels, torch.float32, mode=mode, beta=0.3,
                                        nll_weight=0.7, nll_reduction=nll_reduction, chunk_size=5,
                                        pair_weights=_weights(pairs, device))
    assert len(grads) == 3
    check(kernel, reference, grads, TOL, metrics=METRICS if mode == "orpo" else ["nll_loss", "logps/chosen"])
    # pair 1 weighs 0: its rows (chosen 1 and rejected 4; SFT: row 1) get exactly no gradient, the others do
    zero_rows = [1, 4] if mode == "orpo" else [1]
    gh = grads[0][0]
    assert all(torch.equal(gh[r], torch.zeros_like(gh[r])) for r in zero_rows)
    assert all(bool(gh[r].abs().amax() > 0) for r in range(gh.shape[0]) if r not in zero_rows)


@pytest.mark.parametrize("strategy", ["deferred", "recompute"])
@pytest.mark.parametrize("nll_reduction", ["token", "sequence"])
def test_packed_weighted_matches_reference(strategy, nll_reduction, device):
    hidden, weight, _, lab, packed = _packed(173, 11, [(4, 7), (9, 2), (1, 5), (6, 3)], device)
    kernel, reference, grads = run_both(hidden, weight, None, lab, torch.float32, strategy=strategy, chunk_size=6,
                                        nll_reduction=nll_reduction, frozen_head=strategy == "deferred",
                                        pair_weights=_weights(4, device), **packed)
    check(kernel, reference, grads, TOL)


@pytest.mark.parametrize("mode", ["orpo", "sft"])
def test_packed_sft_and_orpo_weighted(mode, device):
    hidden, weight, bias, lab, packed = _packed(97, 9, [(5, 3), (2, 6), (7, 1)], device)
    kernel, reference, grads = run_both(hidden, weight, bias, lab, torch.float32, mode=mode, chunk_size=4,
                                        nll_reduction="sequence", pair_weights=_weights(3, device), **packed)
    check(kernel, reference, grads, TOL, metrics=METRICS if mode == "orpo" else ["nll_loss", "logps/chosen"])


@pytest.mark.parametrize("nll_reduction", ["token", "sequence"])
def test_reference_is_the_weighted_formula(nll_reduction, device):
    """orpo_objective with weights against the formula written out on full float64 logits (classic layout)."""
    hidden, weight, bias, labels = classic_batch(3, 15, 7, 41, [4, 9, 6, 2, 5, 3], device, scale=3.0)
    w = _weights(3, device)
    beta, nll_weight = 0.2, 0.6
    loss, metrics = ref.fused_linear_orpo_loss(hidden, weight, labels, bias=bias, beta=beta, nll_weight=nll_weight,
                                               nll_reduction=nll_reduction, pair_weights=w)
    logits = hidden @ weight.T + bias
    mask = labels != -100
    tok = logits.log_softmax(-1).gather(2, labels.clamp(min=0)[..., None])[..., 0] * mask
    s, n = tok.sum(1), mask.sum(1).double()
    c, r = s[:3] / n[:3], s[3:] / n[3:]
    nll = -(w * c).sum() / 3 if nll_reduction == "sequence" else -(w * s[:3]).sum() / n[:3].sum()
    log_odds = (c - r) - (torch.log(1 - torch.exp(c)) - torch.log(1 - torch.exp(r)))
    want = nll_weight * nll - beta * (w * torch.nn.functional.logsigmoid(log_odds)).sum() / 3
    assert abs(float(loss) - float(want)) <= 1e-12 * abs(float(want))
    # metrics stay unweighted (TRL's definitions)
    plain_nll = -c.mean() if nll_reduction == "sequence" else -s[:3].sum() / n[:3].sum()
    assert abs(float(metrics["nll_loss"]) - float(plain_nll)) <= 1e-6 * abs(float(plain_nll))
    assert abs(float(metrics["log_odds_chosen"]) - float(log_odds.mean())) <= 1e-6 * (1 + abs(float(log_odds.mean())))


@pytest.mark.parametrize("layout", ["classic", "packed"])
def test_ones_give_todays_loss_bitwise(layout, device):
    if layout == "classic":
        hidden, weight, bias, labels = classic_batch(3, 17, 11, 89, [5, 3, 8, 2, 6, 4], device)
        extra = {}
    else:
        hidden, weight, bias, labels, extra = _packed(89, 11, [(4, 2), (3, 5), (6, 1)], device)
    for nll_reduction in ("token", "sequence"):
        outs = []
        for w in (None, torch.ones(3, device=device)):
            ins = [x.float().requires_grad_() for x in (hidden, weight, bias)]
            loss, metrics = sk.fused_linear_orpo_loss(ins[0], ins[1], labels, bias=ins[2], chunk_size=5, beta=0.2,
                                                      nll_reduction=nll_reduction, pair_weights=w, **extra)
            loss.backward()
            outs.append((loss.detach(), metrics, [x.grad for x in ins]))
        (loss0, m0, g0), (loss1, m1, g1) = outs
        assert torch.equal(loss0, loss1), nll_reduction
        assert all(torch.equal(a, b) for a, b in zip(g0, g1)), nll_reduction
        assert all(torch.equal(m0[k], m1[k]) for k in m0)


def test_skipped_pair_drops_its_weight(device):
    """skip_empty: the empty pair's weight is dropped with it; the rest as the batch without that pair."""
    hidden, weight, bias, labels = classic_batch(3, 13, 7, 37, [4, 0, 6, 3, 5, 2], device)
    w = torch.tensor([0.5, 7.0, 2.0], dtype=torch.float64, device=device)
    loss, _ = ref.fused_linear_orpo_loss(hidden, weight, labels, bias=bias, skip_empty=True, pair_weights=w)
    keep = torch.tensor([0, 2, 3, 5], device=device)
    want, _ = ref.fused_linear_orpo_loss(hidden[keep], weight, labels[keep], bias=bias, pair_weights=w[[0, 2]])
    assert abs(float(loss) - float(want)) <= 1e-12 * abs(float(want))
    plain, _ = ref.fused_linear_orpo_loss(hidden[keep], weight, labels[keep], bias=bias)
    assert abs(float(loss) - float(plain)) > 1e-3 * abs(float(plain))  # the kept weights (0.5, 2) do count


@pytest.mark.parametrize("bad, message", [
    (torch.ones(2), r"pair_weights must have one weight per pair, shape \(3,\), got \(2,\)"),
    (torch.ones(3, 1), r"pair_weights must have one weight per pair"),
    (torch.tensor([1.0, -0.5, 1.0]), r"pair_weights must be finite and >= 0, got pair_weights\[1\] = -0.5"),
    (torch.tensor([1.0, 1.0, float("nan")]), r"pair_weights\[2\] = nan"),
    (torch.tensor([float("inf"), 1.0, 1.0]), r"pair_weights\[0\] = inf"),
    (torch.tensor([1, 1, 1]), r"pair_weights must be a floating-point tensor"),
    ([1.0, 1.0, 1.0], r"pair_weights must be a floating-point tensor \[P\], got list"),
])
def test_bad_weights_name_the_argument(bad, message, device):
    hidden, weight, _, labels = classic_batch(3, 9, 5, 31, [2, 3, 4, 2, 3, 1], device)
    bad = bad.to(device) if isinstance(bad, torch.Tensor) else bad
    for loss_fn in (sk.fused_linear_orpo_loss, ref.fused_linear_orpo_loss):
        with pytest.raises(ValueError, match=message):
            loss_fn(hidden.float(), weight.float(), labels, pair_weights=bad)
