"""Exact byte counts of bench_attention's communication table (Llama-3.1-8B shapes, W = 8)."""

import pytest

bench_attention = pytest.importorskip("bench.bench_attention")


def test_comm_volume_formulas():
    rows = {(r["ulysses"], r["ring"]): r for r in bench_attention.comm_rows(32768, world=8)}
    assert set(rows) == {(1, 8), (2, 4), (4, 2), (8, 1)}
    # ring: a K+V shard of 4096 tokens x 8 kv heads x 128 x 2 bytes per step, 7 steps forward
    assert rows[(1, 8)]["kv_step_MB"] * 1e6 == pytest.approx(2 * 4096 * 8 * 128 * 2)
    assert rows[(1, 8)]["layer_fwd_MB"] * 1e6 == pytest.approx(7 * 2 * 4096 * 8 * 128 * 2)
    # backward: K+V again (7 steps) plus the float32 dK+dV buffer 7 times (the own shard's part is added at home)
    ring_fwd_bwd = 14 * 2 * 4096 * 8 * 128 * 2 + 7 * 2 * 4096 * 8 * 128 * 4
    assert rows[(1, 8)]["layer_fwd_bwd_MB"] * 1e6 == pytest.approx(ring_fwd_bwd)
    # Ulysses: 7/8 of q, k, v and out (32 + 8 + 8 + 32 heads) of 4096 tokens, twice with the backward
    a2a = 7 / 8 * 4096 * 128 * 2 * (32 + 8 + 8 + 32)
    assert rows[(8, 1)]["a2a_MB"] * 1e6 == pytest.approx(a2a) and rows[(8, 1)]["kv_step_MB"] == 0
    assert rows[(8, 1)]["layer_fwd_bwd_MB"] * 1e6 == pytest.approx(2 * a2a)
    # hybrid 2 x 4: all-to-all over 2 ranks, then a ring of 4 over 8192 tokens with 4 kv heads each
    assert rows[(2, 4)]["a2a_MB"] * 1e6 == pytest.approx(1 / 2 * 4096 * 128 * 2 * 80)
    assert rows[(2, 4)]["kv_step_MB"] * 1e6 == pytest.approx(2 * 8192 * 4 * 128 * 2)


def test_flop_formula():
    assert bench_attention.fwd_flops(4096, 32, 128) == 4 * 4096 * 4096 * 32 * 128 / 2
    assert bench_attention.fwd_flops(4096, 32, 128, causal=False) == 4 * 4096 * 4096 * 32 * 128


def test_block_rows_of_a_preference_pair():
    """The bench's block table at a small size: plan == dense ideal, the range kernel's counts by formula."""
    rows = {r["source"]: r for r in bench_attention.block_rows(prompt=96, answer=32, block=16)}
    plan, ideal, before = rows["plan (kernels)"], rows["ideal (dense rule)"], rows["range kernel (before plan)"]
    assert {k: plan[k] for k in ("visited", "masked", "empty")} == {k: ideal[k] for k in ("visited", "masked", "empty")}
    assert plan["chosen_blocks_visited_by_rejected_queries"] == 0 and before["chosen_blocks_visited_by_rejected_queries"] == 4
    assert before["visited"] == before["masked"] == 10 * 11 // 2 and plan["masked"] == 10
