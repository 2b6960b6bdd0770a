"""The CPU attention path (sealong/model/sdpa.py): fused SDPA pieces equal the masked reference in float64, and
no call builds a mask larger than its own block."""

import pytest
import torch
import torch.nn.functional as F

from sealong.model.llama import default_attention, masked_sdpa_attention
from sealong.model.sdpa import causal_block_sdpa, prefix_decode_sdpa, sdpa_attention, segment_runs
from sealong_kernels import reference


def qkv(t, hq=6, hkv=2, d=8, grad=False):
    make = lambda h: torch.randn(t, h, d, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    return make(hq), make(hkv), make(hkv)


@pytest.fixture
def sdpa_masks(monkeypatch):
    """Shapes of every attn_mask handed to SDPA (None for is_causal / unmasked calls), and each call's q.dim()."""
    seen, dims, real = Calls(), [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(None if attn_mask is None else tuple(attn_mask.shape))
        dims.append(q.dim())
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    seen.dims = dims
    return seen


class Calls(list):
    pass


def pair_segments(p, c, r, pad=0):
    return torch.cat([torch.zeros(p - 1), torch.ones(c + 1), torch.full((r + 1 + pad,), 2)]).int()


CASES = {
    "causal": dict(),
    "packed pair": dict(segment_ids=pair_segments(9, 4, 3)),
    "segments interleaved": dict(segment_ids=torch.tensor([0, 0, 1, 1, 0, 2, 2, 1, 0, 2, 2, 2, 1, 1, 0, 0, 0]).int()),
    "cu_seqlens": dict(cu_seqlens=torch.tensor([0, 5, 5, 12, 17])),
    "cu_seqlens and segments": dict(cu_seqlens=torch.tensor([0, 7, 17]),
                                    segment_ids=torch.cat([torch.tensor([0, 0, 1, 1, 2, 2, 2]), pair_segments(5, 2, 2)]).int()),
}


@pytest.mark.parametrize("case", CASES)
def test_sdpa_attention_matches_the_masked_reference_forward_and_backward(case, sdpa_masks):
    kwargs = CASES[case]
    t = 17
    q, k, v = qkv(t, grad=True)
    dout = torch.randn(t, 6, 8, dtype=torch.float64)
    ref = masked_sdpa_attention(q, k, v, softmax_scale=0.3, **kwargs)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    sdpa_masks.clear()
    sdpa_masks.dims.clear()
    ours = sdpa_attention(q, k, v, softmax_scale=0.3, **kwargs)
    grads = torch.autograd.grad(ours, (q, k, v), dout)
    assert set(sdpa_masks.dims) == {4}  # 3-D inputs take torch's unfused math path on the CPU
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    masks = [m for m in sdpa_masks if m is not None]
    assert all(m[0] < t and m[0] * m[1] < t * t // 2 for m in masks), sdpa_masks[:-1]  # never the stream's [T, T]
    if "segment_ids" not in kwargs:
        assert not masks  # causal and block-diagonal pieces: is_causal only


def test_packed_pair_masks_are_the_answer_blocks_only(sdpa_masks):
    p, c, r = 20, 5, 3
    q, k, v = qkv(p + c + r + 1)
    sdpa_attention(q, k, v, segment_ids=pair_segments(p, c, r))
    assert sdpa_masks == [None, (c + 1, p - 1 + c + 1), (r + 1, p - 1 + r + 1)]
    assert segment_runs(pair_segments(p, c, r)) == [(0, p - 1, 0), (p - 1, p + c, 1), (p + c, p + c + r + 1, 2)]


def test_cpu_default_attention_is_the_sdpa_path():
    assert default_attention("cpu") is sdpa_attention


@pytest.mark.parametrize("lq", [1, 5, 12])
def test_causal_block_is_the_reference_at_q_start(lq):
    q, _, _ = qkv(lq)
    _, k, v = qkv(12)
    want = reference.attention_forward(q, k, v, causal=True, softmax_scale=0.4, q_start=12 - lq, k_start=0)[0]
    torch.testing.assert_close(causal_block_sdpa(q, k, v, 0.4), want, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="queries are the last keys"):
        causal_block_sdpa(*qkv(13)[:1], k, v)


def test_prefix_decode_sdpa_matches_the_reference_with_empty_prompts_and_rows():
    cu_q = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)
    cu_p = torch.tensor([0, 10, 14, 14, 25], dtype=torch.int32)
    q, _, _ = qkv(8)
    _, k, v = qkv(25)
    out, lse = prefix_decode_sdpa(q, k, v, cu_q, cu_p, 0.35)
    want, want_lse = reference.prefix_decode_attention(q, k, v, cu_q, cu_p, 0.35)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-10)
    assert lse.dtype == torch.float64 and bool(torch.isinf(lse[:, 3:7]).all())  # an empty prefix: -inf, out 0
    out32, lse32 = prefix_decode_sdpa(q.float(), k.float(), v.float(), cu_q, cu_p, 0.35)
    assert out32.dtype == torch.float32 and lse32.dtype == torch.float32
    torch.testing.assert_close(out32, want.float(), atol=1e-5, rtol=1e-5)
