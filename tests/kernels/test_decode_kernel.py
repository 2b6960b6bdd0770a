"""Shared-prefix decode attention kernel (kernels/sealong_kernels/decode.py) against its float64 reference twin."""

import pytest
import torch

from sealong_kernels import reference
from sealong_kernels.decode import prefix_decode_attention


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(samples, prefixes, hq, hkv, d, dtype, device):
    m, p = sum(samples), sum(prefixes)
    q = torch.randn(m, hq, d, dtype=dtype, device=device)
    k = torch.randn(p, hkv, d, dtype=dtype, device=device)
    v = torch.randn(p, hkv, d, dtype=dtype, device=device)
    cu_q = torch.tensor([0] + samples, device=device).cumsum(0).to(torch.int32)
    cu_p = torch.tensor([0] + prefixes, device=device).cumsum(0).to(torch.int32)
    return q, k, v, cu_q, cu_p


# (dtype, bound on ||out - ref|| / ||ref|| against float64)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_prefix_decode_matches_reference(device, dtype, tol, num_splits):
    # prompts with 3, 5 and 2 samples over prefixes of 37, 5 and 0 tokens; GQA 6 query heads on 2 kv heads; D=24
    q, k, v, cu_q, cu_p = make([3, 5, 2], [37, 5, 0], 6, 2, 24, dtype, device)
    out, lse = prefix_decode_attention(q, k, v, cu_q, cu_p, num_splits=num_splits)
    ref_out, ref_lse = reference.prefix_decode_attention(q.double(), k.double(), v.double(), cu_q, cu_p)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (6, 10) and lse.dtype == torch.float32
    assert rel_err(out[:8], ref_out[:8]) < tol
    assert rel_err(lse[:, :8], ref_lse[:, :8]) < 1e-5
    # the prompt without a prefix: out 0, lse -inf, never NaN
    assert torch.equal(out[8:], torch.zeros_like(out[8:]))
    assert torch.isneginf(lse[:, 8:]).all()


def test_merge_with_suffix_is_exact(device):
    """prefix (kernel) merged with the sample's own suffix by log-sum-exp = attention over prefix + suffix."""
    n, p, s, hq, hkv, d = 4, 29, 7, 4, 1, 16
    q, k, v, cu_q, cu_p = make([n], [p], hq, hkv, d, torch.float32, device)
    ks, vs = torch.randn(n, s, hkv, d, device=device), torch.randn(n, s, hkv, d, device=device)
    out_p, lse_p = prefix_decode_attention(q, k, v, cu_q, cu_p)
    for i in range(n):
        out_s, lse_s = reference.attention_forward(q[i : i + 1], ks[i], vs[i], causal=False)
        merged, _ = reference.merge_attention_partials(out_p[i : i + 1], lse_p[:, i : i + 1], out_s, lse_s)
        full, _ = reference.attention_forward(
            q[i : i + 1].double(), torch.cat([k, ks[i]]).double(), torch.cat([v, vs[i]]).double(), causal=False
        )
        assert rel_err(merged, full) < 1e-5


def test_bad_shapes_named(device):
    q, k, v, cu_q, cu_p = make([2], [5], 6, 4, 16, torch.float32, device)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        prefix_decode_attention(q, k, v, cu_q, cu_p)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_prefix_decode_bf16_gpu(d):
    q, k, v, cu_q, cu_p = make([32, 7], [4099, 1000], 32, 8, d, torch.bfloat16, "cuda")
    out, lse = prefix_decode_attention(q, k, v, cu_q, cu_p)
    ref_out, ref_lse = reference.prefix_decode_attention(q.float(), k.float(), v.float(), cu_q, cu_p)
    assert rel_err(out, ref_out) < 1e-2
    assert rel_err(lse, ref_lse) < 1e-3


def test_gpu_tile_config_under_interpreter(device, monkeypatch):
    """The block sizes and key splits a GPU would pick (not the interpreter's 16x16), on a 600-token prefix."""
    from unittest import mock

    import sealong_kernels.decode as dec

    original = dec._launch_config

    def gpu_config(*args):
        with mock.patch.object(dec, "interpreting", lambda: False):
            return original(*args)

    assert gpu_config(12 * 3, 40, 600, 2 * 1)[:4] == (64, 64, 8, 2)  # BLOCK_M, BLOCK_N, warps, 2 key splits
    monkeypatch.setattr(dec, "_launch_config", gpu_config)
    q, k, v, cu_q, cu_p = make([12, 1], [600, 77], 6, 2, 40, torch.float32, device)
    out, lse = prefix_decode_attention(q, k, v, cu_q, cu_p)
    ref_out, ref_lse = reference.prefix_decode_attention(q.double(), k.double(), v.double(), cu_q, cu_p)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_odd_sizes_and_split_merge(device, num_splits):
    """Odd sizes everywhere (D = 20, G = 3, prefixes 1, 53, 19 tokens, 7 / 1 / 4 samples) and 1, 2 or 5 key splits:
    the split merge kernel (several splits, some with no key for the shorter prefixes) against float64."""
    q, k, v, cu_q, cu_p = make([7, 1, 4], [1, 53, 19], 9, 3, 20, torch.float32, device)
    out, lse = prefix_decode_attention(q, k, v, cu_q, cu_p, num_splits=num_splits, softmax_scale=0.3)
    ref_out, ref_lse = reference.prefix_decode_attention(q.double(), k.double(), v.double(), cu_q, cu_p, 0.3)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-6


def test_merge_splits_kernel_alone(device):
    """merge_splits on hand-made partials: 4 splits, rows where some or all splits are empty (lse -inf)."""
    from sealong_kernels.decode import merge_splits

    s, m, hq, d = 4, 37, 3, 24
    part_out = torch.randn(s, m, hq, d, device=device)
    part_lse = torch.randn(s, hq, m, device=device) * 3
    part_lse[1:, :, 5] = float("-inf")           # row 5: only split 0 saw keys
    part_lse[:, 1, 9] = float("-inf")            # row 9, head 1: no split saw a key
    part_out[1:, 5] = 0
    part_out[:, 9, 1] = 0
    out = torch.empty(m, hq, d, dtype=torch.float16, device=device)
    lse = torch.empty(hq, m, device=device)
    merge_splits(part_out, part_lse, out, lse)
    want_out, want_lse = part_out[0].double(), part_lse[0].double()
    for i in range(1, s):
        want_out, want_lse = reference.merge_attention_partials(want_out, want_lse, part_out[i].double(),
                                                                part_lse[i].double())
    assert out.dtype == torch.float16 and rel_err(out, want_out) < 1e-3
    assert torch.isneginf(lse[1, 9]) and torch.equal(out[9, 1], torch.zeros_like(out[9, 1]))
    finite = torch.isfinite(want_lse)
    assert rel_err(lse[finite], want_lse[finite]) < 1e-6 and torch.equal(torch.isfinite(lse), finite)


def test_grid_is_folded_below_the_cuda_limit(device, monkeypatch):
    """20000 prompts x 8 kv heads = 160000 (prompt, kv head) blocks: more than CUDA's 65535 for a grid's second or
    third dimension. The launch folds them into the first dimension (limit 2^31 - 1)."""
    import sealong_kernels.decode as dec

    assert dec.launch_grid(3, 20000, 8, 4) == (3 * 20000 * 8, 4)
    with pytest.raises(ValueError, match="decode grid too large"):
        dec.launch_grid(1, 1, 1, 70000)

    class Launched(Exception):
        pass

    class Recorder:  # stands in for the kernel: records the grid of the launch, then stops
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise Launched(grid)
            return launch

    monkeypatch.setattr(dec, "_prefix_decode_kernel", Recorder())
    n, hq, hkv, d = 20000, 32, 8, 16
    q = torch.zeros(n, hq, d, device=device)
    k = torch.zeros(n, hkv, d, device=device)
    cu = torch.arange(n + 1, device=device, dtype=torch.int32)  # one sample and one prefix token per prompt
    with pytest.raises(Launched) as launched:
        dec.prefix_decode_attention(q, k, k, cu, cu)
    grid = launched.value.args[0]
    assert len(grid) == 2 and grid[1] <= dec.MAX_GRID_YZ and grid[0] >= n * hkv, grid


def test_cu_tensors_dtype_device_and_coverage_named(device):
    q, k, v, cu_q, cu_p = make([2, 3], [5, 4], 4, 2, 16, torch.float32, device)
    with pytest.raises(TypeError, match="cu_q must be int32 on q's device .* got torch.int64"):
        prefix_decode_attention(q, k, v, cu_q.long(), cu_p)
    with pytest.raises(TypeError, match="cu_prefix must be int32"):
        prefix_decode_attention(q, k, v, cu_q, cu_p.float())
    if device == "cuda":
        with pytest.raises(TypeError, match="cu_prefix must be int32 on q's device"):
            prefix_decode_attention(q, k, v, cu_q, cu_p.cpu())
    with pytest.raises(ValueError, match=r"cu_q\[-1\] = 4 must equal the number of query rows M = 5"):
        prefix_decode_attention(q, k, v, torch.tensor([0, 2, 4], dtype=torch.int32, device=device), cu_p)
