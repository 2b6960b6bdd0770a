"""Block classes (empty / full / partial per pair of query and key blocks): the plan against its dense twin, the
kernels on every class at odd sizes against the float64 reference, and the block counts of a 32K-token
preference pair (30K prompt, two 1K answers, block 128) from the kernel's own plan."""

import pytest
import torch

from sealong_kernels import attention as attn
from sealong_kernels import reference as ref
from sealong_kernels.attention_plan import (EMPTY, FULL, PARTIAL, block_classes, block_counts, dense_block_classes,
                                            varlen_plan)
from tests.kernels.test_flash_attention import check, preference_segments, rand_qkv


def seq_of(cu, t):
    return varlen_plan(torch.tensor(cu), t).seq_idx


def pair_segments(*parts):
    """Segment ids of packed preference pairs: parts = (prompt, chosen, rejected, prompt, chosen, rejected, ...)."""
    return torch.cat([torch.full((n,), i % 3, dtype=torch.int32) for i, n in enumerate(parts)])


CASES = {  # name: (tq, tk, plan block, kwargs of block_classes without tensors built below)
    "pair, causal": dict(t=61, block=8, seg=(29, 13, 19)),
    "two pairs packed": dict(t=83, block=8, seg=(21, 9, 11, 25, 7, 10), cu=(0, 41, 83)),
    "packed, no segments": dict(t=70, block=16, cu=(0, 5, 53, 53, 70)),
    "not causal, segments": dict(t=45, block=8, seg=(20, 11, 14), causal=False),
}


def classes_of(case, dense):
    t, block = case["t"], case["block"]
    kw = dict(causal=case.get("causal", True))
    if "cu" in case:
        kw["seq_idx"] = seq_of(case["cu"], t)
    if "seg" in case:
        kw["qseg"] = kw["kseg"] = pair_segments(*case["seg"])
    return (dense_block_classes if dense else block_classes)(t, t, block, block, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_plan_is_the_dense_classes(name):
    """Visits exactly the pairs that see something; never full where one pair is hidden. The plan may mask a
    pair the dense rule finds full: a key block mixing segment 0 with the query's own segment, or one cut by
    the end of the tokens."""
    plan, ideal = classes_of(CASES[name], False), classes_of(CASES[name], True)
    assert torch.equal(plan == EMPTY, ideal == EMPTY)
    assert not ((plan == FULL) & (ideal != FULL)).any()
    assert ((plan == PARTIAL) & (ideal == FULL)).sum() <= plan.shape[0]  # one boundary column at most per row
    assert {EMPTY, PARTIAL, FULL} <= set(plan.unique().tolist()) or name == "not causal, segments"


def test_ring_step_plan_with_offsets():
    """A ring step: queries at 40..71, keys at 8..39 with their own segment ids (q_start != k_start)."""
    qseg, kseg = pair_segments(0, 9, 23), pair_segments(17, 15)
    kw = dict(causal=True, q_start=40, k_start=8, qseg=qseg, kseg=kseg)
    plan, ideal = block_classes(32, 32, 8, 8, **kw), dense_block_classes(32, 32, 8, 8, **kw)
    assert torch.equal(plan == EMPTY, ideal == EMPTY) and torch.equal(plan == FULL, (ideal == FULL) & (plan == FULL))
    assert (plan == EMPTY).any() and (plan == FULL).any()


@pytest.mark.parametrize("layout", ["pair", "packed pairs"])
def test_kernels_on_every_block_class(layout, device):
    """Forward and backward with the plan (interpreter tile 16 = plan block) at odd sizes vs float64."""
    if layout == "pair":
        seg = preference_segments(37, 21, 19, device)
        kw = dict(causal=True, segment_ids=seg)
    else:
        seg = pair_segments(35, 17, 18, 19, 9, 13).to(device)
        kw = dict(causal=True, segment_ids=seg, cu_seqlens=torch.tensor([0, 70, 111], dtype=torch.int32, device=device))
    t = seg.numel()
    classes = block_classes(t, t, 16, 16, causal=True, qseg=seg, kseg=seg,
                            seq_idx=seq_of(kw["cu_seqlens"].tolist(), t) if "cu_seqlens" in kw else None)
    assert {EMPTY, PARTIAL, FULL} <= set(classes.unique().tolist())
    check(*rand_qkv(t, t, 2, 1, 16, torch.float32, device), **kw)


def test_rejected_queries_never_load_chosen_keys(device):
    """Chosen keys and values are NaN: block-aligned answers, so any visit of a chosen block by a rejected or
    prompt query block would put NaN into its rows (0 * NaN), masked or not."""
    seg = preference_segments(48, 32, 32, device)
    q, k, v = rand_qkv(112, 112, 2, 1, 16, torch.float32, device)
    k[48:80] = float("nan")
    v[48:80] = float("nan")
    out, lse = attn.attention_forward(q, k, v, causal=True, segment_ids=seg)
    keep = torch.cat([torch.arange(48), torch.arange(80, 112)])
    out_r, _ = ref.attention_forward(q[keep].double(), k[keep].double(), v[keep].double(), causal=True,
                                     segment_ids=seg[keep])
    assert torch.isfinite(out[keep]).all() and (out[keep] - out_r).abs().max() < 1e-5


def test_preference_pair_32k_block_counts():
    """30K prompt + 1K chosen + 1K rejected, block 128: the plan the kernels run on."""
    seg = torch.cat([torch.zeros(30720), torch.ones(1024), torch.full((1024,), 2)]).to(torch.int32)
    t = seg.numel()
    counts = block_counts(block_classes(t, t, 128, 128, causal=True, qseg=seg, kseg=seg), seg, seg, 128, 128)
    prompt, answer = 240, 8  # blocks
    ideal_visited = prompt * (prompt + 1) // 2 + 2 * (answer * prompt + answer * (answer + 1) // 2)
    assert counts["visited"] == ideal_visited == 32832
    assert counts["masked"] == t // 128  # the diagonal blocks only
    assert counts["masked"] < 0.05 * counts["visited"]
    assert counts["chosen_blocks_visited_by_rejected_queries"] == 0
