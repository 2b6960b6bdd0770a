"""Fused linear ORPO / SFT loss against the float64 reference: loss, every metric, every gradient.

Shapes are odd (T, H, V and the chunk are coprime-ish) so chunks, vocabulary blocks and sequences never align.
Float32 and float16 under the Triton interpreter; bfloat16 only on a GPU (`-m gpu`).
"""

import math

import pytest
import torch

import sealong_kernels as sk
from sealong_kernels import reference as ref

METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def classic_batch(pairs, t, h, v, lengths, device, scale=1.0):
    """float64 hidden [2P, T, H], weight [V, H], bias [V] and labels [2P, T] with responses of the given
    lengths (one per row) after a prompt (label -100) of random length, then padding (-100)."""
    hidden = torch.randn(2 * pairs, t, h, dtype=torch.float64, device=device)
    weight = torch.randn(v, h, dtype=torch.float64, device=device) * scale / math.sqrt(h)
    bias = torch.randn(v, dtype=torch.float64, device=device) * 0.5
    labels = torch.full((2 * pairs, t), -100, dtype=torch.long, device=device)
    for row, n in enumerate(lengths):
        start = int(torch.randint(0, t - n + 1, ()))
        labels[row, start:start + n] = torch.randint(0, v, (n,), device=device)
    return hidden, weight, bias, labels


def run_both(hidden, weight, bias, labels, dtype, **kw):
    """(loss, metrics, grads) of the kernel in `dtype` and of the float64 reference on the same inputs.
    frozen_head=True: only hidden requires a gradient (the LoRA case, where "deferred" applies)."""
    train = (True, not kw.get("frozen_head"), not kw.pop("frozen_head", False))
    ins64 = [x.clone().requires_grad_(t) if x is not None else None for x, t in zip((hidden, weight, bias), train)]
    ins = [x.to(dtype).clone().requires_grad_(t) if x is not None else None for x, t in zip((hidden, weight, bias), train)]
    chunk = kw.pop("chunk_size", 7)
    strategy = kw.pop("strategy", "auto")
    loss_r, m_r = ref.fused_linear_orpo_loss(ins64[0], ins64[1], labels, bias=ins64[2], **kw)
    loss_r.backward()
    loss_k, m_k = sk.fused_linear_orpo_loss(ins[0], ins[1], labels, bias=ins[2], chunk_size=chunk,
                                            strategy=strategy, **kw)
    loss_k.backward()
    grads = [(a.grad, b.grad) for a, b in zip(ins, ins64) if a is not None and a.requires_grad]
    return (loss_k, m_k), (loss_r, m_r), grads


def check(kernel, reference, grads, tol, metrics=METRICS):
    (loss_k, m_k), (loss_r, m_r) = kernel, reference
    loss_k, loss_r = loss_k.detach(), loss_r.detach()
    assert torch.isfinite(loss_k), loss_k
    assert abs(float(loss_k) - float(loss_r)) <= tol * abs(float(loss_r)) + tol, (float(loss_k), float(loss_r))
    for name in metrics:
        assert abs(float(m_k[name]) - float(m_r[name])) <= tol * (1 + abs(float(m_r[name]))), name
    for gk, gr in grads:
        assert torch.isfinite(gk).all()
        assert rel(gk, gr) <= tol, rel(gk, gr)


# (dtype, strategy, bias, relative tolerance): float16 logits and G carry ~1e-3 relative rounding.
# "deferred" is for a frozen head (a trained one runs "recompute"): its cases train the hidden states only.
CASES = [
    (torch.float32, "deferred", True, 2e-5),
    (torch.float32, "recompute", False, 2e-5),
    (torch.float16, "deferred", False, 5e-3),
    (torch.float16, "recompute", True, 5e-3),
]


@pytest.mark.parametrize("dtype,strategy,with_bias,tol", CASES)
def test_classic_layout_matches_reference(dtype, strategy, with_bias, tol, device):
    # 3 pairs of different response lengths; T=23, H=19, V=301, chunk 7: nothing divides anything
    hidden, weight, bias, labels = classic_batch(3, 23, 19, 301, [5, 11, 17, 3, 9, 1], device)
    kernel, reference, grads = run_both(hidden, weight, bias if with_bias else None, labels, dtype,
                                        strategy=strategy, beta=0.3, nll_weight=0.7,
                                        frozen_head=strategy == "deferred")
    assert len(grads) == (1 if strategy == "deferred" else 2 + with_bias)
    check(kernel, reference, grads, tol)


# one-pass (strategy "auto" with grad): pairs of 8, 20 and 18 entries; chunk 40: one chunk of whole pairs;
# 20: each pair whole in its own chunk; 12: pair 0 whole, pairs 1 and 2 in pieces; 3: every pair in pieces
@pytest.mark.parametrize("dtype,frozen,chunk,tol", [
    (torch.float32, False, 40, 2e-5), (torch.float32, False, 20, 2e-5), (torch.float32, False, 12, 2e-5),
    (torch.float32, True, 12, 2e-5), (torch.float32, True, 3, 2e-5), (torch.float16, False, 12, 5e-3),
    (torch.float16, True, 20, 5e-3)])
def test_onepass_matches_reference(dtype, frozen, chunk, tol, device):
    hidden, weight, bias, labels = classic_batch(3, 23, 19, 301, [5, 11, 17, 3, 9, 1], device)
    kernel, reference, grads = run_both(hidden, weight, None if frozen else bias, labels, dtype, chunk_size=chunk,
                                        beta=0.3, nll_weight=0.7, frozen_head=frozen)
    assert len(grads) == (1 if frozen else 3)
    check(kernel, reference, grads, tol)


def test_onepass_plan_aligns_chunks_to_pairs():
    from sealong_kernels.orpo_onepass import plan_chunks

    plan = [(c.start, c.end, c.pair0, c.pair1, c.piece, c.closes) for c in plan_chunks([5, 3, 11, 9, 2, 2], 12)]
    # pair 0 (8 entries) whole; pair 1 (20) in pieces inside its chosen (11) and rejected (9) answers; pair 2 whole
    assert plan == [(0, 8, 0, 1, False, True), (8, 19, 1, 2, True, False), (19, 28, 1, 2, True, True),
                    (28, 32, 2, 3, False, True)]
    assert [(c.start, c.end) for c in plan_chunks([2, 1, 2, 1, 3, 0], 6)] == [(0, 6), (6, 9)]   # 2 pairs, then 1


def test_reference_is_trl_formula(device):
    """The reference against a direct transcription of the issue's semantics on full logits (classic)."""
    hidden, weight, bias, labels = classic_batch(2, 17, 11, 53, [4, 9, 6, 2], device, scale=3.0)
    beta = 0.1
    loss, metrics = ref.fused_linear_orpo_loss(hidden, weight, labels, bias=bias, beta=beta)
    logits = hidden @ weight.T + bias                                           # [4, T, V]
    mask = labels != -100
    tok = logits.log_softmax(-1).gather(2, labels.clamp(min=0)[..., None])[..., 0] * mask
    logps = tok.sum(1) / mask.sum(1)                                            # per-row mean
    c, r = logps[:2], logps[2:]
    nll = -tok[:2].sum() / mask[:2].sum()
    log_odds = (c - r) - (torch.log(1 - torch.exp(c)) - torch.log(1 - torch.exp(r)))
    ratio = torch.nn.functional.logsigmoid(log_odds)
    assert torch.allclose(loss, nll - beta * ratio.mean(), rtol=1e-12)
    want = {"nll_loss": nll, "logps/chosen": c.mean(), "logps/rejected": r.mean(), "log_odds_ratio": ratio.mean(),
            "log_odds_chosen": log_odds.mean(), "rewards/chosen": beta * c.mean(), "rewards/rejected": beta * r.mean(),
            "rewards/margins": beta * (c - r).mean(), "rewards/accuracies": (c > r).double().mean(),
            # TRL's logits[loss_mask].mean(): every vocabulary entry of every chosen / rejected label token
            "logits/chosen": logits[:2][mask[:2]].mean(), "logits/rejected": logits[2:][mask[2:]].mean()}
    for name, value in want.items():
        assert abs(float(metrics[name]) - float(value)) <= 1e-6 * (1 + abs(float(value))), name


def test_sft_mode_matches_reference(device):
    hidden, weight, bias, labels = classic_batch(2, 21, 13, 127, [7, 3, 12, 5], device)
    kernel, reference, grads = run_both(hidden, weight, bias, labels, torch.float32, mode="sft", chunk_size=5)
    check(kernel, reference, grads, 2e-5, metrics=["nll_loss", "logps/chosen", "logits/chosen"])
    assert "logits/rejected" not in kernel[1]
    # SFT = token-mean NLL over every labeled token of the batch
    mask = labels != -100
    logits = hidden @ weight.T + bias
    nll = -logits.log_softmax(-1).gather(2, labels.clamp(min=0)[..., None])[..., 0][mask].mean()
    assert abs(reference[0].item() - nll.item()) <= 1e-10 * abs(nll.item())


def packed_batch(pairs, v, device, lengths):
    """A packed ORPO batch: per pair, unlabeled prompt tokens then chosen / rejected response tokens in a
    shuffled order, so sequences are interleaved."""
    seq, seg, lab = [], [], []
    for p, (nc, nr) in enumerate(lengths):
        n_prompt = int(torch.randint(1, 4, ()))
        seq += [p] * (n_prompt + nc + nr)
        seg += [0] * n_prompt + [1] * nc + [2] * nr
        lab += [-100] * n_prompt + torch.randint(0, v, (nc + nr,)).tolist()
    perm = torch.randperm(len(seq))
    as_t = lambda x: torch.tensor(x, device=device)[perm.to(device)]  # noqa: E731
    return as_t(seq), as_t(seg), as_t(lab)


@pytest.mark.parametrize("strategy", ["deferred", "recompute"])
def test_packed_layout_matches_reference(strategy, device):
    v, h = 211, 17
    seq, seg, lab = packed_batch(3, v, device, [(4, 7), (9, 2), (1, 5)])
    hidden = torch.randn(seq.shape[0], h, dtype=torch.float64, device=device)
    weight = torch.randn(v, h, dtype=torch.float64, device=device) / 3
    kernel, reference, grads = run_both(hidden, weight, None, lab, torch.float32, strategy=strategy,
                                        sequence_ids=seq, segment_ids=seg, chunk_size=6,
                                        frozen_head=strategy == "deferred")
    check(kernel, reference, grads, 2e-5)


def test_shared_prompt_packing_equals_classic_pair(device):
    """prompt + chosen + rejected packed in one sequence == the classic two-row layout of the same pair."""
    p_len, c_len, r_len, h, v = 9, 6, 4, 15, 97
    sizes = (("p", p_len), ("c", c_len), ("r", r_len))
    ids = {k: torch.randint(0, v, (n,), device=device) for k, n in sizes}
    hs = {k: torch.randn(n, h, dtype=torch.float64, device=device) for k, n in sizes}
    weight = torch.randn(v, h, dtype=torch.float64, device=device) / 4
    bias = torch.randn(v, dtype=torch.float64, device=device) / 4
    # classic: rows [prompt + chosen], [prompt + rejected] padded to T, labels[t] = token t + 1 of the answer
    t = p_len + max(c_len, r_len)
    hidden_c = torch.zeros(2, t, h, dtype=torch.float64, device=device)
    labels_c = torch.full((2, t), -100, dtype=torch.long, device=device)
    for row, k in enumerate("cr"):
        n = ids[k].shape[0]
        hidden_c[row, :p_len + n] = torch.cat([hs["p"], hs[k]])
        labels_c[row, p_len - 1:p_len - 1 + n] = ids[k]
    # packed: one sequence, hidden rows [prompt, chosen, rejected]
    input_ids = torch.cat([ids["p"], ids["c"], ids["r"]])
    segments = torch.tensor([0] * p_len + [1] * c_len + [2] * r_len, device=device)
    index, labels_p, seq_p, seg_p = sk.shared_prompt_targets(input_ids, segments)
    hidden_p = torch.cat([hs["p"], hs["c"], hs["r"]])

    outs = []
    for hid, extra in ((hidden_c, {}), (hidden_p, dict(sequence_ids=seq_p, segment_ids=seg_p, hidden_index=index))):
        hid = hid.float().requires_grad_()
        w, b = weight.float().requires_grad_(), bias.float().requires_grad_()
        lab = labels_c if not extra else labels_p
        loss, metrics = sk.fused_linear_orpo_loss(hid, w, lab, bias=b, chunk_size=4, **extra)
        loss.backward()
        outs.append((loss.detach(), metrics, hid.grad, w.grad, b.grad))
    (loss_c, m_c, gh_c, gw_c, gb_c), (loss_p, m_p, gh_p, gw_p, gb_p) = outs
    assert abs(float(loss_c) - float(loss_p)) <= 1e-5 * abs(float(loss_c))
    for name in METRICS:
        assert abs(float(m_c[name]) - float(m_p[name])) <= 1e-5 * (1 + abs(float(m_c[name]))), name
    assert rel(gw_p, gw_c) <= 1e-5 and rel(gb_p, gb_c) <= 1e-5
    # the packed prompt's gradient is the sum of the two classic rows' prompt gradients
    want = torch.cat([gh_c[0, :p_len] + gh_c[1, :p_len], gh_c[0, p_len:p_len + c_len], gh_c[1, p_len:p_len + r_len]])
    assert rel(gh_p, want) <= 1e-5


def test_empty_response_raises_or_is_skipped(device):
    hidden, weight, bias, labels = classic_batch(3, 15, 9, 61, [4, 0, 6, 3, 5, 2], device)
    with pytest.raises(ValueError, match="pair 1: the chosen response has no label tokens.*skip_empty"):
        sk.fused_linear_orpo_loss(hidden.float(), weight.float(), labels)
    kernel, reference, grads = run_both(hidden, weight, bias, labels, torch.float32, skip_empty=True)
    check(kernel, reference, grads, 2e-5)
    assert float(kernel[1]["skipped_pairs"]) == 1
    # same as the batch without pair 1
    keep = torch.tensor([0, 2, 3, 5], device=device)
    loss2, _ = ref.fused_linear_orpo_loss(hidden[keep], weight, labels[keep], bias=bias)
    assert abs(reference[0].item() - loss2.item()) <= 1e-10 * abs(loss2.item())


def test_all_labels_ignored(device):
    hidden = torch.randn(4, 7, 5, device=device, requires_grad=True)
    weight = torch.randn(33, 5, device=device, requires_grad=True)
    labels = torch.full((4, 7), -100, device=device)
    with pytest.raises(ValueError, match="no label tokens"):
        sk.fused_linear_orpo_loss(hidden, weight, labels)
    loss, metrics = sk.fused_linear_orpo_loss(hidden, weight, labels, skip_empty=True)
    loss.backward()
    assert loss.item() == 0 and float(metrics["skipped_pairs"]) == 2
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_logp_near_zero_and_huge_logits(device):
    """A chosen response predicted with probability 1 (log1mexp at 0) by logits of 5000: finite, as the reference."""
    hidden, weight, bias, labels = classic_batch(2, 11, 8, 41, [3, 5, 4, 2], device)
    # pair 0's chosen row predicts token y0 with a logit of 5000 (feature 0 is on only there): logp_c = 0
    y0, on = 7, labels[0] != -100
    labels[0, on] = y0
    hidden[..., 0] = 0
    hidden[0, on, 0] = 1
    weight[:, 0] = 0
    weight[y0, 0] = 5000
    kernel, reference, grads = run_both(hidden, weight, None, labels, torch.float32, chunk_size=3)
    sums = ref.sequence_logp_sums(hidden, weight, *ref.preference_entries(labels)[:3], 4)
    assert float(sums[0]) == 0.0  # exactly probability 1: log1mexp(0) would be -inf without the clamp
    check(kernel, reference, grads, 2e-5)
    # log1mexp at and near 0 stays finite with finite gradients
    x = torch.tensor([0.0, -1e-30, -1e-8, -0.5, -0.7, -30.0], dtype=torch.float64, requires_grad=True)
    y = ref.log1mexp(x.clamp(max=ref.LOGP_MAX))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.allclose(y[2:], torch.log(1 - torch.exp(x[2:].detach())), rtol=1e-6)


def test_bad_inputs_name_the_argument(device):
    h, w = torch.randn(4, 6, 5, device=device), torch.randn(30, 5, device=device)
    labels = torch.randint(0, 30, (4, 6), device=device)
    with pytest.raises(ValueError, match="labels must be in"):
        sk.fused_linear_orpo_loss(h, w, labels + 30)
    with pytest.raises(ValueError, match="weight must be"):
        sk.fused_linear_orpo_loss(h, w[:, :4], labels)
    with pytest.raises(ValueError, match="mode"):
        sk.fused_linear_orpo_loss(h, w, labels, mode="dpo")
    with pytest.raises(ValueError, match="2B rows"):
        sk.fused_linear_orpo_loss(h[:3], w, labels[:3])
    with pytest.raises(ValueError, match="segment_ids is required"):
        sk.fused_linear_orpo_loss(h[0], w, labels[0], sequence_ids=torch.zeros(6, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="plus H"):
        sk.fused_linear_orpo_loss(h[:, :5], w, labels)
    with pytest.raises(ValueError, match="packed layout"):
        sk.fused_linear_orpo_loss(h[0, :5], w, labels[0], sequence_ids=labels[0] * 0, segment_ids=labels[0] * 0 + 1)
    with pytest.raises(ValueError, match="strategy"):
        sk.fused_linear_orpo_loss(h, w, labels, strategy="fast")
    # a negative hidden_index is a device-side assert in index_select on a GPU: a clear error instead
    packed = dict(sequence_ids=labels[0] * 0, segment_ids=torch.arange(6, device=device) % 2 + 1)
    for index, row in ((torch.arange(6, device=device) - 1, -1), (torch.arange(6, device=device) + 19, 24)):
        with pytest.raises(ValueError, match=f"hidden_index points at row {row} of a hidden with 24 rows"):
            sk.fused_linear_orpo_loss(h.reshape(-1, 5), w, labels[0], hidden_index=index, **packed)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["deferred", "recompute"])
def test_bfloat16_on_gpu(strategy):
    hidden, weight, bias, labels = classic_batch(2, 300, 128, 5003, [200, 50, 120, 299], "cuda")
    kernel, reference, grads = run_both(hidden, weight, bias, labels, torch.bfloat16, strategy=strategy,
                                        chunk_size=128)
    check(kernel, reference, grads, 3e-2)


@pytest.mark.parametrize("rows_per_program,dtype", [(1, torch.float32), (16, torch.float16)])
def test_row_kernel_lse_target_and_gradient(rows_per_program, dtype, device):
    """The Triton row kernel alone: several vocabulary blocks with a tail (V = 2500), C = 37 rows; 1 row per
    program is the GPU configuration, 16 the interpreter's."""
    from sealong_kernels.orpo import logits_rows

    logits = (torch.randn(37, 2500, dtype=torch.float64, device=device) * 4).to(dtype)
    targets = torch.randint(0, 2500, (37,), device=device)
    z = logits.double()
    lse_want = z.logsumexp(-1)
    g_want = torch.nn.functional.one_hot(targets, 2500).double() - z.softmax(-1)
    lse, target_logit, zsum = logits_rows(logits, targets, write_grad=True, rows_per_program=rows_per_program)
    assert rel(lse, lse_want) <= 1e-6 and torch.equal(target_logit, z.gather(1, targets[:, None])[:, 0].float())
    assert rel(zsum, z.sum(-1)) <= 1e-6
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert rel(logits, g_want) <= tol
    # the backward configuration: lse given, gradient times a per-row scale only
    again = z.to(dtype)
    scale = torch.randn(37, device=device)
    assert logits_rows(again, targets, lse=lse, write_grad=True, scale=scale, rows_per_program=rows_per_program)[1:] == (None, None)
    assert rel(again, g_want * scale.double()[:, None]) <= tol


def test_no_grad_forward_and_default_chunk(device):
    """Under torch.no_grad only the LSE pass runs (nothing is kept for a backward); same loss."""
    from sealong_kernels.orpo import default_chunk_size

    hidden, weight, bias, labels = classic_batch(1, 9, 6, 45, [4, 3], device)
    hidden, weight = hidden.float().requires_grad_(), weight.float().requires_grad_()
    with torch.no_grad():
        loss_eval, _ = sk.fused_linear_orpo_loss(hidden, weight, labels, chunk_size=2, strategy="deferred")
    loss, _ = sk.fused_linear_orpo_loss(hidden, weight, labels, chunk_size=2, strategy="deferred")
    assert not loss_eval.requires_grad and abs(loss_eval.item() - loss.item()) <= 1e-6 * abs(loss.item())
    # about M * H / V rows (a chunk's logits ~ the hidden states' size), at least 1024, capped by chunk_bytes and M
    assert default_chunk_size(33792, 4096, 128256, torch.bfloat16) == 2048                  # 525 MB of logits
    assert default_chunk_size(33792, 4096, 128256, torch.float32) == 1024                   # capped at 512 MiB
    assert default_chunk_size(33792, 4096, 128256, torch.bfloat16, chunk_bytes=2**28) == 1024
    assert default_chunk_size(131072, 4096, 128256, torch.bfloat16, chunk_bytes=2**40) == 4096
    assert default_chunk_size(2048, 4096, 128256, torch.bfloat16) == 1024                   # the matmul floor
    assert default_chunk_size(100, 16, 257, torch.float32) == 100 and default_chunk_size(5, 64, 32, torch.float32) == 5
    assert default_chunk_size(10, 8, 10**9, torch.float32) == 1


def test_cpu_fallback_without_the_interpreter(monkeypatch):
    # On CPU tensors without TRITON_INTERPRET the row work runs in plain torch (reference.logits_rows):
    # same loss and gradients as the float64 reference, within float32 LSE rounding (rel 1e-5).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    import sealong_kernels.orpo_rows as orpo_rows

    monkeypatch.setattr(orpo_rows, "_logits_rows_kernel", None)  # launching the Triton kernel would now fail
    hidden, weight, bias, labels = classic_batch(2, 11, 13, 97, [4, 6, 1, 5], "cpu")
    kernel, reference, grads = run_both(hidden, weight, bias, labels, torch.float32)
    check(kernel, reference, grads, 1e-5)
