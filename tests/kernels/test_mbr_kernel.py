"""MBR score kernels (Triton, CUDA C++) against the float64 reference, and the pair selection rule.

Error bound (derived in kernels/sealong_kernels/mbr.py): every sum is float32 and |u_i . S| <= n_valid, so the absolute error
of a score is a few float32 ulps times n/(n-1): the tests allow 2e-6 absolute and 1e-6 relative
(||out - ref|| / ||ref|| over the finite entries), with the reference in float64 on the same (rounded) inputs.
The kernel has no tl.dot, so bfloat16 is exact under the interpreter too and is tested here.
"""

import pytest
import torch

import sealong_kernels as sk
from sealong_kernels import mbr as mbr_module
from sealong_kernels import reference

ABS_TOL, REL_TOL = 2e-6, 1e-6


def _inputs(b, n, d, dtype, device, mask_p=0.3):
    # a shared direction plus noise: realistic cosines around 0.5 rather than ~0
    emb = (torch.randn(b, 1, d) + 0.8 * torch.randn(b, n, d)).to(dtype).to(device)
    mask = torch.rand(b, n) > mask_p
    mask[0] = False  # a row with no valid sample
    if b > 1:
        mask[1] = False
        mask[1, n // 2] = True  # a row with exactly one
    return emb, mask.to(device)


def _assert_close(out, ref):
    assert out.dtype == torch.float32
    ref = ref.to(out.device)
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    assert not torch.isnan(out).any()
    fin = torch.isfinite(ref)
    err = (out[fin].double() - ref[fin]).abs()
    if err.numel():
        assert err.max() <= ABS_TOL, f"max abs error {err.max():.3g}"
        assert err.norm() <= REL_TOL * ref[fin].norm() + ABS_TOL, f"rel error {err.norm() / ref[fin].norm():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 37, 123), (3, 2, 16), (2, 7, 4099), (3, 256, 40)])
def test_triton_matches_float64_reference(dtype, shape, device):
    emb, mask = _inputs(*shape, dtype, device)
    out = sk.mbr_scores(emb, mask, backend="triton")
    _assert_close(out, reference.mbr_scores(emb.double(), mask))
    assert out[0].isneginf().all()  # no valid sample
    if shape[0] > 1:
        assert out[1, shape[1] // 2] == 0.0 and torch.isneginf(out[1]).sum() == shape[1] - 1


@pytest.mark.parametrize("normalize,include_self", [(False, False), (True, True), (False, True)])
def test_triton_modes(normalize, include_self, device):
    emb, mask = _inputs(4, 19, 45, torch.float32, device)
    if not normalize:
        emb = emb / 8  # keep dot products O(1) so the absolute bound applies
    out = sk.mbr_scores(emb, mask, normalize=normalize, include_self=include_self, backend="triton")
    _assert_close(out, reference.mbr_scores(emb.double(), mask, normalize, include_self))


def test_triton_strided_input_no_mask_zero_vector(device):
    base = torch.randn(6, 50, 3, dtype=torch.float32, device=device)
    emb = base.transpose(0, 2)  # [3, 50, 6], non-contiguous
    emb[1, 4] = 0.0  # a zero vector: similarity 0 to everything, never NaN
    out = sk.mbr_scores(emb, backend="triton")
    _assert_close(out, reference.mbr_scores(emb.double()))
    assert out[1, 4] == 0.0


def test_reference_is_the_paper_definition():
    emb = torch.randn(2, 6, 9, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    scores = reference.mbr_scores(emb, mask)
    authors = reference.mbr_scores(emb, mask, include_self=True)
    for b in range(2):
        idx = mask[b].nonzero()[:, 0].tolist()
        for i in idx:
            cos = [torch.nn.functional.cosine_similarity(emb[b, i], emb[b, j], dim=0) for j in idx if j != i]
            assert torch.allclose(scores[b, i], torch.stack(cos).mean())
            # authors: (sum of others + 1) / n
            assert torch.allclose(authors[b, i], (torch.stack(cos).sum() + 1) / len(idx))
    assert torch.isneginf(scores[0, 2]) and torch.isneginf(authors[0, 2])
    assert torch.equal(scores.argsort(-1), authors.argsort(-1))  # same ranking


def test_empty_batch_and_empty_rows(device):
    assert sk.mbr_scores(torch.randn(0, 5, 8, device=device), backend="triton").shape == (0, 5)
    chosen, rejected = sk.select_pairs(torch.zeros(3, 0))
    assert chosen.tolist() == rejected.tolist() == [-1, -1, -1]


def test_zero_samples_per_row_every_backend(device, monkeypatch):
    """N = 0 gives scores [B, 0] on every path; the CUDA extension (which rejects N = 0) is not called."""
    emb = torch.randn(3, 0, 8, device=device)
    for backend in ("reference", "triton"):
        assert sk.mbr_scores(emb, backend=backend).shape == (3, 0)

    class NoCall:
        def mbr_scores(self, *args, **kwargs):
            raise AssertionError("the extension was called for an empty row")

    monkeypatch.setattr(mbr_module, "cuda_extension", lambda: NoCall())
    assert mbr_module.mbr_scores_cuda(emb).shape == (3, 0)


def test_auto_backend_on_cpu_is_the_reference():
    emb = torch.randn(3, 5, 8)
    assert torch.equal(sk.mbr_scores(emb), reference.mbr_scores(emb).float())


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="emb"):
        sk.mbr_scores(torch.randn(4, 5))
    with pytest.raises(ValueError, match="emb"):
        sk.mbr_scores(torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        sk.mbr_scores(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="N=2000"):
        sk.mbr_scores(torch.randn(1, 2000, 4))
    with pytest.raises(ValueError, match="backend"):
        sk.mbr_scores(torch.randn(1, 3, 4), backend="numpy")
    with pytest.raises(ValueError, match="NaN"):
        sk.select_pairs(torch.tensor([[0.1, float("nan")]]))
    with pytest.raises(ValueError, match="scores"):
        sk.select_pairs(torch.zeros(3, dtype=torch.long))


def _weights(b, n, device):
    """Certainty-like peer weights in [0.5, 2], with one zero weight per row."""
    w = 0.5 + 1.5 * torch.rand(b, n, dtype=torch.float64)
    w[:, n // 3] = 0.0
    return w.to(device)


@pytest.mark.parametrize("include_self", [False, True])
def test_weighted_reference_is_the_float64_loop(include_self):
    """s_i = sum_{j valid (j != i)} w_j cos(e_i, e_j) / sum_{j valid (j != i)} w_j, spelled out as a loop."""
    emb = torch.randn(3, 7, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    w = _weights(3, 7, "cpu")
    w[1, :] = 0.0
    w[1, 4] = 3.0  # row 1: only sample 4 has weight; its own peers weigh 0 in all
    scores = reference.mbr_scores(emb, mask, include_self=include_self, weights=w)
    for b in range(3):
        for i in range(7):
            if not mask[b, i]:
                assert torch.isneginf(scores[b, i])
                continue
            peers = [j for j in range(7) if mask[b, j] and (include_self or j != i)]
            num = sum(w[b, j] * torch.nn.functional.cosine_similarity(emb[b, i], emb[b, j], dim=0) for j in peers)
            den = sum(w[b, j] for j in peers)
            expect = num / den if den > 0 else 0.0
            assert abs(float(scores[b, i]) - float(expect)) < 1e-12, (b, i)
    if not include_self:
        assert scores[1, 4] == 0.0 and scores[2, 2] == 0.0  # no weighted peer / no peer
    sim = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).transpose(1, 2)
    assert torch.equal(reference.mbr_scores_from_similarity(sim, mask, include_self, w), scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 37, 123), (3, 2, 16), (2, 9, 301)])
@pytest.mark.parametrize("include_self", [False, True])
def test_triton_weighted_matches_float64_reference(dtype, shape, include_self, device):
    emb, mask = _inputs(*shape, dtype, device)
    w = _weights(shape[0], shape[1], device).float()
    out = sk.mbr_scores(emb, mask, include_self=include_self, backend="triton", weights=w)
    _assert_close(out, reference.mbr_scores(emb.double(), mask, include_self=include_self, weights=w.double()))
    assert out[0].isneginf().all()
    if shape[0] > 1 and not include_self:
        assert out[1, shape[1] // 2] == 0.0  # one valid sample: no peer


@pytest.mark.parametrize("include_self", [False, True])
def test_weights_of_ones_are_the_unweighted_scores(include_self, device):
    """Exactly in the reference; in the Triton kernel up to float32 rounding (its weighted variant walks D in
    blocks half as wide: `_block_sizes`)."""
    emb, mask = _inputs(4, 19, 45, torch.float32, device)
    ones = torch.ones(4, 19, device=device)
    plain = sk.mbr_scores(emb, mask, include_self=include_self, backend="reference")
    assert torch.equal(sk.mbr_scores(emb, mask, include_self=include_self, backend="reference", weights=ones), plain)
    plain = sk.mbr_scores(emb, mask, include_self=include_self, backend="triton")
    _assert_close(sk.mbr_scores(emb, mask, include_self=include_self, backend="triton", weights=ones), plain.double())
    sim = torch.randn(4, 19, 19, dtype=torch.float64)
    assert torch.equal(reference.mbr_scores_from_similarity(sim, mask.cpu(), include_self, ones.cpu().double()),
                       reference.mbr_scores_from_similarity(sim, mask.cpu(), include_self))


def test_bad_weights_name_the_argument():
    emb = torch.randn(2, 3, 4)
    for bad in (torch.ones(2, 4), torch.ones(2, 3, dtype=torch.long), torch.tensor([[1.0, -1.0, 1.0]] * 2),
                torch.tensor([[1.0, float("nan"), 1.0]] * 2), [[1.0] * 3] * 2):
        with pytest.raises(ValueError, match="weights"):
            sk.mbr_scores(emb, weights=bad)


def _lower_half(scores_row, chosen):
    valid = [j for j in range(len(scores_row)) if scores_row[j] > float("-inf")]
    others = sorted((j for j in valid if j != chosen), key=lambda j: (scores_row[j], -j))
    return set(others[: len(valid) // 2])


def test_select_pairs_lower_half_rule_and_determinism():
    b, n = 200, 9
    scores = torch.randn(b, n)
    scores[torch.rand(b, n) < 0.3] = float("-inf")
    scores[:, 3] = scores[:, 5]  # ties
    chosen, rejected = sk.select_pairs(scores, torch.Generator().manual_seed(7))
    assert chosen.dtype == rejected.dtype == torch.int64
    again = sk.select_pairs(scores, torch.Generator().manual_seed(7))
    assert torch.equal(chosen, again[0]) and torch.equal(rejected, again[1])
    other = sk.select_pairs(scores, torch.Generator().manual_seed(8))[1]
    assert not torch.equal(rejected, other)
    for r in range(b):
        row = scores[r].tolist()
        n_valid = sum(s > float("-inf") for s in row)
        if n_valid == 0:
            assert chosen[r] == -1 and rejected[r] == -1
            continue
        best = max(s for s in row if s > float("-inf"))
        assert chosen[r] == row.index(best)  # first index among ties
        if n_valid == 1:
            assert rejected[r] == -1
            continue
        assert rejected[r].item() in _lower_half(row, chosen[r].item())
        assert rejected[r] != chosen[r]


def test_select_pairs_uniform_over_lower_half_and_odd_counts():
    # n_valid = 7 -> lower half = the 3 lowest others; with all scores equal: chosen 0, half {6, 5, 4}
    scores = torch.tensor([[0.5, 0.1, 0.9, -0.3, 0.2, 0.0, 0.4, float("-inf")]]).repeat(30000, 1)
    chosen, rejected = sk.select_pairs(scores, torch.Generator().manual_seed(0))
    assert (chosen == 2).all()
    counts = torch.bincount(rejected, minlength=8).float()
    assert set(counts.nonzero()[:, 0].tolist()) == {3, 5, 1}
    assert (counts[[1, 3, 5]] / 10000 - 1).abs().max() < 0.06  # 6 sigma ~ 0.05 for 10000 draws per member
    ties = torch.zeros(1, 7)
    c, r = sk.select_pairs(ties, torch.Generator().manual_seed(1))
    assert c.item() == 0 and r.item() in {6, 5, 4}


def test_select_pairs_chosen_mask_never_picks_truncated():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.9, 0.8, 0.1, 0.5]])
    finished = torch.tensor([[False, True, True, True], [False, False, False, False]])
    chosen, rejected = sk.select_pairs(scores, torch.Generator().manual_seed(0), chosen_mask=finished)
    assert chosen.tolist() == [1, 0]  # best finished one; no finished one: best overall
    assert rejected[0].item() in {2, 3}  # lower half of the 3 others: the 2 lowest
    assert rejected[1].item() in {2, 3}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_match_reference(backend, dtype):
    if backend == "cuda" and sk.mbr.cuda_extension() is None:
        pytest.skip("sealong_kernels._C is not built (python -m sealong_kernels.cuda_build)")
    for shape in [(5, 37, 123), (4096, 32, 1024), (33, 256, 1000), (3, 7, 4099)]:
        emb, mask = _inputs(*shape, dtype, "cuda")
        out = sk.mbr_scores(emb, mask, backend=backend)
        _assert_close(out, reference.mbr_scores(emb.double(), mask))
        out = sk.mbr_scores(emb, None, backend=backend, include_self=True)
        _assert_close(out, reference.mbr_scores(emb.double(), None, include_self=True))
        w = _weights(shape[0], shape[1], "cuda").float()
        if backend == "cuda":
            with pytest.raises(ValueError, match="weights"):
                sk.mbr_scores(emb, mask, backend=backend, weights=w)
        out = sk.mbr_scores(emb, mask, backend="triton" if backend == "triton" else "auto", weights=w)  # auto: Triton
        _assert_close(out, reference.mbr_scores(emb.double(), mask, weights=w.double()))


@pytest.mark.gpu
def test_gpu_no_similarity_matrix_in_memory():
    b, n, d = 4096, 256, 256
    emb = torch.randn(b, n, d, device="cuda", dtype=torch.float16)
    for backend in ["triton"] + (["cuda"] if sk.mbr.cuda_extension() is not None else []):
        sk.mbr_scores(emb, backend=backend)  # compile first
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sk.mbr_scores(emb, backend=backend)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra < b * n * n * 4 // 16, f"{backend}: {extra} bytes beyond the inputs"
