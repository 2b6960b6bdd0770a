"""sealong_kernels.hf.FusedLinearORPOLoss: the TRL-style module equals the functional loss and the reference."""

import torch

from sealong_kernels import fused_linear_orpo_loss
from sealong_kernels import reference as ref
from sealong_kernels.hf import FusedLinearORPOLoss


def test_module_shift_matches_reference():
    b, t, h, v = 2, 19, 11, 89
    hidden = torch.randn(2 * b, t, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) / 3
    input_ids = torch.randint(0, v, (2 * b, t))
    labels = input_ids.clone()
    labels[:, :7] = -100                                     # prompt
    labels[1, 15:] = -100                                    # padding
    hk, wk = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss, metrics = FusedLinearORPOLoss(beta=0.2, chunk_size=5)(wk, hk, labels, shift=True)
    loss.backward()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_r, metrics_r = ref.fused_linear_orpo_loss(hr[:, :-1], wr, labels[:, 1:], beta=0.2)
    loss_r.backward()
    assert abs(loss.item() - loss_r.item()) <= 1e-5 * abs(loss_r.item())
    assert set(metrics_r) == set(metrics)
    for name in metrics_r:
        assert abs(float(metrics[name]) - float(metrics_r[name])) <= 1e-5 * (1 + abs(float(metrics_r[name]))), name
    assert float((hk.grad.double() - hr.grad).norm() / hr.grad.norm()) <= 1e-5
    assert float((wk.grad.double() - wr.grad).norm() / wr.grad.norm()) <= 1e-5
    assert hk.grad[:, -1].abs().sum() == 0                  # the last position predicts nothing after the shift


def test_module_sft_without_shift_equals_function():
    hidden, weight = torch.randn(3, 8, 6), torch.randn(40, 6)
    labels = torch.randint(0, 40, (3, 8))
    loss, metrics = FusedLinearORPOLoss(mode="sft", nll_weight=0.5)(weight, hidden, labels)
    loss_f, _ = fused_linear_orpo_loss(hidden, weight, labels, mode="sft", nll_weight=0.5)
    assert torch.allclose(loss, loss_f) and abs(loss.item() - 0.5 * metrics["nll_loss"].item()) < 1e-6


def test_module_takes_the_lm_head_module():
    head = torch.nn.Linear(6, 40, bias=True)
    hidden, labels = torch.randn(2, 8, 6), torch.randint(0, 40, (2, 8))
    loss, _ = FusedLinearORPOLoss(chunk_size=3)(head, hidden, labels)
    loss_f, _ = fused_linear_orpo_loss(hidden, head.weight, labels, bias=head.bias)
    assert torch.allclose(loss, loss_f)
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
