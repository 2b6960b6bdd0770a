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

    assert gpu_config(12 * 3, 40, 600, 2 * 1)[:4] == (64, 64, 4, 2)  # BLOCK_M, BLOCK_N, warps, 2 key splits
    monkeypatch.setattr(dec, "_launch_config", gpu_config)
    q, k, v, cu_q, cu_p = make([12, 1], [600, 77], 6, 2, 40, torch.float32, device)
    out, lse = prefix_decode_attention(q, k, v, cu_q, cu_p)
    ref_out, ref_lse = reference.prefix_decode_attention(q.double(), k.double(), v.double(), cu_q, cu_p)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
