"""Cascade decode (kernels/sealong_kernels/decode.py `cascade_decode_attention`): prefix + own suffix + merge of a
decode step in one kernel, against the float64 reference (sealong_kernels.reference.cascade_decode_attention),
and the cache write of the new token it does in the same launch."""

import pytest
import torch

from sealong_kernels import reference
from sealong_kernels.decode import cascade_decode_attention


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(samples, prefixes, writes, hq, hkv, d, dtype, device, length=None, gen=None):
    """A decode step: prompt b has len(samples[b]) samples in the slots listed (None: a sample not decoding); slot s
    writes suffix row writes[s] (-1: no suffix); slots not listed are idle. Prefix b has prefixes[b] tokens."""
    slots = len(writes)
    length = length or max(writes) + 2
    r = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    q, k_new, v_new = r(slots, hq, d), r(slots, hkv, d), r(slots, hkv, d)
    kp, vp = r(sum(prefixes), hkv, d), r(sum(prefixes), hkv, d)
    ks, vs = r(slots, length, hkv, d), r(slots, length, hkv, d)
    rows = torch.tensor([slots if s is None else s for b in samples for s in b], dtype=torch.int64, device=device)
    cu_q = torch.tensor([0] + [len(b) for b in samples], device=device).cumsum(0).to(torch.int32)
    cu_p = torch.tensor([0] + list(prefixes), device=device).cumsum(0).to(torch.int32)
    write = torch.tensor(writes, dtype=torch.int64, device=device)
    return q, k_new, v_new, kp, vp, ks, vs, rows, write, cu_q, cu_p


def run_both(args, scale=None, num_splits=None, span=None):
    q, k_new, v_new, kp, vp, ks, vs, rows, write, cu_q, cu_p = args
    ks_k, vs_k = ks.clone(), vs.clone()
    n_rows = (cu_q[1:] - cu_q[:-1]).tolist()
    out, lse = cascade_decode_attention(q, k_new, v_new, kp, vp, ks_k, vs_k, rows, write, cu_q, cu_p, scale,
                                        max_rows=max(n_rows), max_prefix=int((cu_p[1:] - cu_p[:-1]).max()),
                                        span=span or int(write.max()) + 1, num_splits=num_splits)
    ks_r, vs_r = ks.double(), vs.double()
    ref_out, ref_lse = reference.cascade_decode_attention(q.double(), k_new.double(), v_new.double(), kp.double(),
                                                          vp.double(), ks_r, vs_r, rows, write, cu_q, cu_p, scale)
    live = sorted(s for s in rows.tolist() if s < q.shape[0])
    return out, lse, ref_out, ref_lse, live, (ks_k, vs_k, ks_r, vs_r)


# 4 prompts over 11 slots: 3 / 5 / 2 / 1 samples (one not decoding), prefixes of 37, 5, 0 and 18 tokens; slots
# with suffix rows -1 (no suffix key), 0 (only the new token) and odd lengths; slots 9 and 10 idle
SAMPLES = [[3, 0, 7], [1, None, 5, 8, 2], [4, 6], [None]]
PREFIXES = [37, 5, 0, 18]
WRITES = [0, 22, 3, -1, 16, 0, 9, 35, 1, 4, 0]


# (dtype, bound on ||out - ref|| / ||ref|| against float64: float32 IEEE dots; float16 inputs, P rounded to
# float16 for the P @ V product, float32 accumulation)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("d, hq, hkv", [(64, 4, 2), (40, 9, 3)])  # G = 2 and G = 3 (rows of a sample split tiles)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_cascade_matches_reference(device, dtype, tol, d, hq, hkv, num_splits):
    args = make(SAMPLES, PREFIXES, WRITES, hq, hkv, d, dtype, device)
    out, lse, ref_out, ref_lse, live, (ks_k, vs_k, ks_r, vs_r) = run_both(args, 0.3, num_splits)
    assert out.dtype == dtype and out.shape == args[0].shape and lse.shape == (hq, 11) and lse.dtype == torch.float32
    assert live == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert rel_err(out[live], ref_out[live]) < tol
    assert rel_err(lse[:, live], ref_lse[:, live]) < 1e-5
    assert torch.isfinite(out[live]).all()
    # the new token's k, v were written at row write[s] of every decoding slot (and nowhere else)
    assert torch.equal(ks_k.double(), ks_r) and torch.equal(vs_k.double(), vs_r)


def test_prefix_only_and_suffix_only_rows(device):
    """A slot without suffix (write -1) gets plain prefix attention; a slot of a prompt without prefix plain
    attention over its cached suffix and new token; a slot with neither: out 0, lse -inf."""
    args = make([[0, 1], [2, 3]], [7, 0], [-1, 5, 4, -1], 2, 1, 16, torch.float32, device)
    out, lse, ref_out, ref_lse, live, _ = run_both(args)
    q, k_new, v_new, kp, vp, ks, vs = (t.double() for t in args[:7])
    want, _ = reference.attention_forward(q[:1], kp, vp, causal=False)
    assert rel_err(out[:1], want) < 1e-5
    want, _ = reference.attention_forward(q[2:3], torch.cat([ks[2, :4], k_new[2:3]]), torch.cat([vs[2, :4], v_new[2:3]]),
                                          causal=False)
    assert rel_err(out[2:3], want) < 1e-5
    assert rel_err(out[1], ref_out[1]) < 1e-5
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.isneginf(lse[:, 3]).all()


def test_one_prompt_many_samples_and_long_suffixes(device):
    """One prompt whose 20 samples span two row tiles (G = 1), suffixes longer than a key tile, several splits over
    prefix and suffix keys together (the last split takes what the bound `span` leaves over: span too small)."""
    gen = torch.Generator().manual_seed(3)
    writes = torch.randint(-1, 40, (20,), generator=gen).tolist()
    args = make([list(range(19, -1, -1))], [21], writes, 2, 2, 24, torch.float32, device, gen=gen)
    for splits, span in ((None, None), (4, None), (4, 5)):
        out, lse, ref_out, ref_lse, live, caches = run_both(args, num_splits=splits, span=span)
        assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-6
        assert torch.equal(caches[0].double(), caches[2])


def test_gpu_tiles_under_interpreter(device, monkeypatch):
    """The tiles and key splits a GPU would pick (32 rows x 32 keys, 8 samples per tile of G = 4, SPT 16, 4 warps, key
    splits to fill 264 programs) instead of the interpreter's 16 x 16, float16, head dim 64, 37 samples."""
    from unittest import mock

    import sealong_kernels.decode as dec

    def on_gpu(fn):
        def config(*args):
            with mock.patch.object(dec, "interpreting", lambda: False):
                return fn(*args)
        return config

    tile, split = on_gpu(dec.cascade_tile_config), on_gpu(dec._split_config)
    assert tile(37 * 4, 64) == (32, 32, 4) and tile(37 * 4, 128) == (32, 32, 8) and tile(99, 256) == (16, 32, 8)
    assert tile(8, 128) == (16, 32, 4) and tile(8, 64) == (16, 64, 4)
    assert dec.samples_per_tile(32, 4) == 16 and dec.samples_per_tile(32, 3) == 16 and dec.samples_per_tile(32, 1) == 32
    monkeypatch.setattr(dec, "cascade_tile_config", tile)
    monkeypatch.setattr(dec, "_split_config", split)
    gen = torch.Generator().manual_seed(5)
    writes = torch.randint(-1, 70, (40,), generator=gen).tolist()
    args = make([list(range(37)), [37, None, 38], [39]], [300, 1, 0], writes, 8, 2, 64, torch.float16, device, gen=gen)
    out, lse, ref_out, ref_lse, live, caches = run_both(args)
    assert rel_err(out[live], ref_out[live]) < 3e-3 and rel_err(lse[:, live], ref_lse[:, live]) < 1e-5
    assert torch.equal(caches[0].double(), caches[2]) and torch.equal(caches[1].double(), caches[3])
