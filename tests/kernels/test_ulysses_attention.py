"""Ulysses and hybrid (Ulysses x ring) attention in 2, 3 and 4 gloo processes vs single-process attention.

Same oracle and tolerance as test_ring_attention (float32 ranks on the plain-torch raw ops vs the float64
reference on the whole sequence, relative error < 1e-5 for out, lse, dq, dk, dv). Covers GQA with a degree
above the number of K/V heads (replicated K/V), preference segments, packed sequences (cu_seqlens) and
the hybrid 2 x 2 built from sealong.train.parallel's mesh and its model-facing attention callable.
"""

import pytest
import torch
import torch.distributed as dist
from gloo_harness import run_distributed
from test_ring_attention import check_against_reference, make_case, run_case

from sealong.train.parallel import ParallelDims, attention_for, build_mesh, mesh_ranks, shard_index
from sealong_kernels.ulysses import communication_bytes, kv_replication, sequence_index, ulysses_attention


def ulysses_worker(rank, world, cases, hybrid_cases):
    results = []
    for case in cases:
        index = sequence_index(case["q"].shape[0], 1, world, rank)
        if case.get("via_mesh"):  # Ulysses only (ring 1) through the model-facing callable, causal
            attention = attention_for(build_mesh(ParallelDims.from_world(world, sp=world, ulysses=world)))
            attend = lambda q, k, v, seg: attention(q, k, v, segment_ids=seg, cu_seqlens=case.get("cu_seqlens"))  # noqa: E731
        else:
            attend = lambda q, k, v, seg: ulysses_attention(  # noqa: E731
                q, k, v, dist.group.WORLD, case["causal"], segment_ids=seg, cu_seqlens=case.get("cu_seqlens"))
        results.append(run_case(case, index, attend))
    if hybrid_cases:
        for layout in ("zigzag", "plain"):
            mesh = build_mesh(ParallelDims.from_world(world, sp=world, ulysses=2, layout=layout))
            assert (mesh.ulysses_rank, mesh.ring_rank) == (rank % 2, rank // 2)
            attention = attention_for(mesh)
            for case in (c for c in hybrid_cases if c["layout"] == layout):
                index = shard_index(case["q"].shape[0], mesh.dims, mesh.sp_rank)
                results.append(run_case(case, index, lambda q, k, v, seg: attention(q, k, v, segment_ids=seg)))
        results.append(count_hybrid_bytes(hybrid_cases[-1], mesh))
        mesh = build_mesh(ParallelDims.from_world(world, sp=2))  # dp 2 x sp 2: check group membership
        for axis in ("dp", "sp", "ulysses", "ring"):
            ranks = [dist.get_global_rank(mesh.group(axis), i) for i in range(dist.get_world_size(mesh.group(axis)))]
            assert ranks in mesh_ranks(mesh.dims)[axis] and rank in ranks, (axis, ranks)
    if world == 3:  # rank 0 holds 4 tokens, the others 6: every rank raises, naming the shapes
        q, k = torch.randn(4 if rank == 0 else 6, 3, 4), torch.randn(4 if rank == 0 else 6, 3, 4)
        try:
            ulysses_attention(q, k, k, dist.group.WORLD)
            results.append(None)
        except ValueError as err:
            results.append(str(err))
    return results


def count_hybrid_bytes(case, mesh):
    """Bytes this rank sends in all-to-alls and isends during one forward and one backward of the hybrid."""
    sent = {"n": 0}
    a2a, batch = dist.all_to_all_single, dist.batch_isend_irecv

    def counting_a2a(out, inp, *args, **kwargs):
        p = dist.get_world_size(kwargs["group"])
        sent["n"] += inp.numel() * inp.element_size() * (p - 1) // p  # the own chunk stays
        return a2a(out, inp, *args, **kwargs)

    def counting_batch(ops):
        sent["n"] += sum(o.tensor.numel() * o.tensor.element_size() for o in ops if o.op.__name__ == "isend")
        return batch(ops)

    dist.all_to_all_single, dist.batch_isend_irecv = counting_a2a, counting_batch
    try:
        index = shard_index(case["q"].shape[0], mesh.dims, mesh.sp_rank)
        q, k, v = (case[n][index].clone().requires_grad_() for n in ("q", "k", "v"))
        out = attention_for(mesh)(q, k, v)
        fwd = sent["n"]
        out.backward(case["dout"][index])
        return {"fwd": fwd, "bwd": sent["n"] - fwd}
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = a2a, batch


def test_kv_replication_rule():
    assert kv_replication(32, 8, 4) == 1
    assert kv_replication(32, 8, 16) == 2  # 2 q heads and 1 kv head per rank
    assert kv_replication(6, 2, 3) == 3
    assert kv_replication(8, 1, 8) == 8
    with pytest.raises(ValueError, match=r"Ulysses degree 3 must divide the number of query heads \(4\)"):
        kv_replication(4, 2, 3)
    with pytest.raises(ValueError, match=r"q heads \(6\) must be a multiple of k/v heads \(4\)"):
        kv_replication(6, 4, 2)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ulysses_and_hybrid_match_single_process_attention(world):
    if world == 2:
        cu = torch.tensor([0, 5, 13, 18], dtype=torch.int32)
        cases = [make_case(18, 4, 2, 8, segments=True),                      # GQA, degree <= kv heads
                 make_case(18, 4, 1, 8),                                     # MQA: kv head replicated twice
                 {**make_case(18, 2, 2, 8), "cu_seqlens": cu, "via_mesh": True}]  # packed, via attention_for
        hybrid = []
    elif world == 3:
        cases = [make_case(15, 6, 2, 8, segments=True),                      # each kv head replicated 3 times
                 make_case(15, 3, 3, 8, causal=False)]
        hybrid = []
    else:
        cases = [make_case(20, 8, 2, 8)]
        hybrid = [make_case(24, 4, 2, 8, layout="zigzag", segments=True),    # 2 x 2 over the mesh
                  make_case(16, 4, 1, 8, layout="plain")]
    per_rank = run_distributed(ulysses_worker, world, args=(cases, hybrid))
    if world == 3:  # the last result of each rank: the message of the shape mismatch
        for message in (r.pop() for r in per_rank):
            assert message is not None and "Ulysses group must hold the same shard shape" in message
            assert "(4, 3, 4, 3, 0)" in message and "(6, 3, 4, 3, 0)" in message
    if hybrid:  # the last result of each rank: bytes sent by the plain-layout hybrid, vs the formula
        sent = [r.pop() for r in per_rank]
        seq_len, hq, d = hybrid[-1]["q"].shape
        want = communication_bytes(seq_len, hq, hybrid[-1]["k"].shape[1], d, ulysses=2, ring=2, dtype_bytes=4)
        assert all(s == {"fwd": want["fwd"], "bwd": want["bwd"]} for s in sent), (sent, want)
    check_against_reference([*cases, *hybrid], per_rank, skip=("lse",))  # Ulysses returns no lse
