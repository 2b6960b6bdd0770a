"""Attention benchmark: our Triton flash attention vs torch SDPA (flash backend) vs flash-attn (if installed),
a one-device simulation of a W-step ring, and the communication volume of ring / Ulysses / hybrid.

    python -m bench.bench_attention            # GPU: causal bf16, D=128, Hq=32, Hkv=8, T = 4K..32K
    python -m bench.run_all --only attention

FLOPs (causal halves the score matrix; backward = 2.5x forward, 5 matmuls against 2):
    forward      = 4 * T^2 * Hq * D / 2
    fwd + bwd    = 3.5 * forward
Ring simulation: the W ranks' steps (`sealong_kernels.ring.ring_schedule` blocks, `attend_step` with its float32
merges; backward blocks from the global out / lse / delta) run one after another on one device; efficiency =
time of one monolithic call / summed time of all ranks' steps (1.0 = splitting costs nothing), and the
projected W-GPU efficiency = monolithic / (W x slowest rank), communication not counted. The simulated
result is checked against the monolithic one (rel_err column).
"""

import contextlib
import sys

import torch

from bench.common import cpu_note, device_name, is_oom, time_ms
from sealong_kernels import attention as attn
from sealong_kernels.ring import attend_step, ring_schedule, shard_ranges

LLAMA_8B = dict(layers=32, hq=32, hkv=8, d=128, bytes=2)  # Llama-3.1-8B attention shapes, bf16


def fwd_flops(t, hq, d, causal=True):
    return 4 * t * t * hq * d / (2 if causal else 1)


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------------------
# Kernels against each other
# ---------------------------------------------------------------------------------------------------------


def _sdpa(q, k, v):
    """torch SDPA on [1, H, T, D], flash backend on CUDA (GQA natively when torch allows, else K/V repeated)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qb, kb, vb = (t.transpose(0, 1)[None] for t in (q, k, v))
    ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if q.is_cuda else contextlib.nullcontext()
    try:
        with ctx:
            torch.nn.functional.scaled_dot_product_attention(qb[..., :1, :], kb[..., :1, :], vb[..., :1, :],
                                                             is_causal=True, enable_gqa=True)
        gqa = "native GQA"
    except RuntimeError:
        g = q.shape[1] // k.shape[1]
        kb, vb = kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1)
        gqa = "K/V repeated (flash SDPA has no GQA here)"

    def run():
        with ctx:
            kw = dict(enable_gqa=True) if gqa == "native GQA" else {}
            return torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, **kw)

    return run, gqa


def _reps(device):
    """(warmup, repeat): interpreted Triton on a CPU is slow and its times mean nothing anyway."""
    return (2, 10) if str(device).startswith("cuda") else (1, 2)


def _timed(fn, device, leaves, grad):
    """Median ms of fn() (forward) or of fn() + backward (grad=True)."""
    warmup, repeat = _reps(device)
    if not grad:
        with torch.no_grad():
            return time_ms(fn, device, warmup=warmup, repeat=repeat)

    def step():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad_out(out))
        for t in leaves:
            t.grad = None

    return time_ms(step, device, warmup=warmup, repeat=repeat)


_GRADS = {}


def grad_out(out):
    key = (tuple(out.shape), out.dtype, str(out.device))
    if key not in _GRADS:
        _GRADS[key] = torch.randn_like(out)
    return _GRADS[key]


def kernel_rows(device, small):
    if small:
        lengths, hq, hkv, d, dtype = [40], 4, 2, 32, torch.float32
    else:
        lengths, hq, hkv, d, dtype = [4096, 8192, 16384, 32768], 32, 8, 128, torch.bfloat16
    try:
        import flash_attn
    except ImportError:
        flash_attn = None
    rows, notes = [], []
    for t in lengths:
        q = torch.randn(t, hq, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(t, hkv, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(t, hkv, d, device=device, dtype=dtype, requires_grad=True)
        impls = {"sealong": lambda: attn.flash_attention(q, k, v, causal=True, backend="triton")[0]}
        sdpa, gqa = _sdpa(q, k, v)
        impls["sdpa_flash" if q.is_cuda else "sdpa"] = sdpa
        if flash_attn is not None and q.is_cuda:
            impls["flash_attn"] = lambda: flash_attn.flash_attn_func(q[None], k[None], v[None], causal=True)
        notes.append(f"T={t}: SDPA with {gqa}")
        flops = fwd_flops(t, hq, d)
        for mode, grad, mult in (("fwd", False, 1.0), ("fwd+bwd", True, 3.5)):
            row = dict(T=t, mode=mode)
            for name, fn in impls.items():
                try:
                    ms = _timed(fn, device, (q, k, v), grad)
                    row[f"{name}_ms"], row[f"{name}_tflops"] = ms, tflops(mult * flops, ms)
                except Exception as err:  # an OOM or a missing backend in one column must not end the run
                    if not is_oom(err) and q.is_cuda and name == "sealong":
                        raise
                    row[f"{name}_ms"] = None
                    notes.append(f"T={t} {mode} {name}: {type(err).__name__}: {str(err)[:120]}")
            base = row.get("sdpa_flash_ms") or row.get("sdpa_ms")
            row["speedup_vs_sdpa"] = base / row["sealong_ms"] if base and row.get("sealong_ms") else None
            rows.append(row)
        del q, k, v
    notes.append("FLOPs: fwd = 4*T^2*Hq*D/2 (causal), fwd+bwd = 3.5*fwd; "
                 f"Hq={hq}, Hkv={hkv}, D={d}, {str(dtype).replace('torch.', '')}")
    return rows, notes


# ---------------------------------------------------------------------------------------------------------
# Block classes of a packed preference pair (counted from the plan the kernels run on; no timing)
# ---------------------------------------------------------------------------------------------------------


def block_rows(prompt=30720, answer=1024, block=128, dense=True):
    """Key blocks visited, blocks on the masked path and chosen blocks visited by rejected queries for one
    preference pair (prompt, chosen, rejected as segments 0, 1, 2; causal), per (block x block) pair:
    the plan (`attention_plan.block_classes`, what the kernels loop over), the dense ideal (the token-level
    rule, `dense_block_classes`) and the range kernel before the plan (causal bound only, every block masked)."""
    from sealong_kernels.attention_plan import block_classes, block_counts, dense_block_classes

    seg = torch.cat([torch.zeros(prompt), torch.ones(answer), torch.full((answer,), 2)]).to(torch.int32)
    t = seg.numel()
    kw = dict(causal=True, qseg=seg, kseg=seg)
    n = -(-t // block)
    nq_rej = answer // block  # all-rejected query blocks see the chosen answer's blocks below their diagonal
    rows = [dict(table="blocks", T=t, block=block, source="plan (kernels)",
                 **block_counts(block_classes(t, t, block, block, **kw), seg, seg, block, block))]
    if dense:
        rows.append(dict(table="blocks", T=t, block=block, source="ideal (dense rule)",
                         **block_counts(dense_block_classes(t, t, block, block, **kw), seg, seg, block, block)))
    before = n * (n + 1) // 2
    rows.append(dict(table="blocks", T=t, block=block, source="range kernel (before plan)", pairs=n * n,
                     visited=before, masked=before, full=0, empty=n * n - before,
                     chosen_blocks_visited_by_rejected_queries=nq_rej * (answer // block)))
    for r in rows:
        r["masked_pct_of_visited"] = 100.0 * r["masked"] / r["visited"]
    return rows


# ---------------------------------------------------------------------------------------------------------
# One-device ring simulation
# ---------------------------------------------------------------------------------------------------------


def _local(x, seq_len, world, rank, layout):
    return torch.cat([x[a:b] for a, b in shard_ranges(seq_len, world, rank, layout)]).contiguous()


def ring_forward_rank(q_loc, k_locs, v_locs, schedule, rank):
    out = torch.zeros(q_loc.shape, dtype=torch.float32, device=q_loc.device)
    lse = torch.full((q_loc.shape[1], q_loc.shape[0]), float("-inf"), device=q_loc.device)
    world = len(schedule)
    for s in range(world):
        src = (rank - s) % world
        attend_step(q_loc, k_locs[src], v_locs[src], out, lse, schedule[s], attn.attention_forward, softmax_scale=None)
    return out, lse


def ring_backward_rank(dout, q, out, lse, delta, k_locs, v_locs, dk_acc, dv_acc, schedule, rank):
    """One rank's backward steps; dK/dV of each shard accumulate in float32 buffers (dk_acc[src])."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    world = len(schedule)
    for s in range(world):
        src = (rank - s) % world
        for b in schedule[s]:
            rows, cols = slice(b.q_lo, b.q_hi), slice(b.k_lo, b.k_hi)
            dq_b, dk_b, dv_b = attn.attention_backward(
                dout[rows], q[rows], k_locs[src][cols], v_locs[src][cols], out[rows], lse[:, rows].contiguous(),
                delta=delta[:, rows].contiguous(), causal=b.causal, q_start=b.q_start, k_start=b.k_start)
            dq[rows] += dq_b
            dk_acc[src][cols] += dk_b
            dv_acc[src][cols] += dv_b
    return dq


def ring_rows(device, small):
    if small:
        t, hq, hkv, d, dtype, worlds = 48, 2, 1, 16, torch.float32, [2, 4]
    else:
        t, hq, hkv, d, dtype, worlds = 32768, 32, 8, 128, torch.bfloat16, [2, 4, 8]
    q = torch.randn(t, hq, d, device=device, dtype=dtype)
    k = torch.randn(t, hkv, d, device=device, dtype=dtype)
    v = torch.randn(t, hkv, d, device=device, dtype=dtype)
    dout = torch.randn_like(q)
    out, lse = attn.attention_forward(q, k, v, causal=True)
    dq_m, dk_m, dv_m = attn.attention_backward(dout, q, k, v, out, lse, causal=True)
    warmup, repeat = _reps(device)
    mono_fwd = time_ms(lambda: attn.attention_forward(q, k, v, causal=True), device, warmup=warmup, repeat=repeat)
    mono_bwd = time_ms(lambda: attn.attention_backward(dout, q, k, v, out, lse, causal=True), device,
                       warmup=warmup, repeat=repeat)
    delta = (dout.float() * out.float()).sum(-1).T.contiguous()
    rows = [dict(layout="monolithic", W=1, fwd_ms=mono_fwd, bwd_ms=mono_bwd)]
    for layout in ("zigzag", "plain"):
        for world in worlds if layout == "zigzag" else worlds[-1:]:
            loc = lambda x, r: _local(x, t, world, r, layout)  # noqa: E731
            k_locs, v_locs = [loc(k, r) for r in range(world)], [loc(v, r) for r in range(world)]
            scheds = [ring_schedule(t, world, r, layout) for r in range(world)]
            per_rank = [dict(q=loc(q, r), dout=loc(dout, r), out=loc(out, r), lse=loc(lse.T, r).T.contiguous(),
                             delta=loc(delta.T, r).T.contiguous()) for r in range(world)]
            fwd_ms = [time_ms(lambda r=r: ring_forward_rank(per_rank[r]["q"], k_locs, v_locs, scheds[r], r), device,
                              warmup=warmup, repeat=repeat) for r in range(world)]
            dk_acc = [torch.zeros(x.shape, dtype=torch.float32, device=device) for x in k_locs]
            dv_acc = [torch.zeros(x.shape, dtype=torch.float32, device=device) for x in v_locs]

            def bwd(r):
                p = per_rank[r]
                return ring_backward_rank(p["dout"], p["q"], p["out"], p["lse"], p["delta"], k_locs, v_locs,
                                          dk_acc, dv_acc, scheds[r], r)

            bwd_ms = [time_ms(lambda r=r: bwd(r), device, warmup=warmup, repeat=repeat) for r in range(world)]
            # correctness of the simulated ring: one more pass into fresh accumulators, assembled in global order
            for acc in dk_acc + dv_acc:
                acc.zero_()
            outs = [ring_forward_rank(per_rank[r]["q"], k_locs, v_locs, scheds[r], r)[0] for r in range(world)]
            dqs = [bwd(r) for r in range(world)]
            order = torch.cat([torch.arange(a, b) for r in range(world) for a, b in shard_ranges(t, world, r, layout)])
            err = max(rel(torch.cat(outs)[order.argsort()], out), rel(torch.cat(dqs)[order.argsort()], dq_m),
                      rel(torch.cat(dk_acc)[order.argsort()], dk_m), rel(torch.cat(dv_acc)[order.argsort()], dv_m))
            rows.append(dict(
                layout=layout, W=world, fwd_ms=sum(fwd_ms), bwd_ms=sum(bwd_ms),
                fwd_eff=mono_fwd / sum(fwd_ms), fwd_bwd_eff=(mono_fwd + mono_bwd) / (sum(fwd_ms) + sum(bwd_ms)),
                proj_fwd_eff=mono_fwd / (world * max(fwd_ms)),
                proj_fwd_bwd_eff=(mono_fwd + mono_bwd) / (world * max(f + b for f, b in zip(fwd_ms, bwd_ms))),
                rel_err=err))
    notes = [f"ring simulation: T={t}, Hq={hq}, Hkv={hkv}, D={d}, {str(dtype).replace('torch.', '')}, causal; "
             "fwd_ms/bwd_ms = summed over ranks; *_eff = monolithic / summed; proj_*_eff = monolithic / (W x slowest rank)"]
    return rows, notes


# ---------------------------------------------------------------------------------------------------------
# Communication volume (exact counts, no device needed)
# ---------------------------------------------------------------------------------------------------------


def comm_rows(seq_len, world=8, shapes=LLAMA_8B, step_tflops=400.0):
    """Bytes each rank sends for hybrid Ulysses degree u x ring degree r = world (u=1: ring, r=1: Ulysses).

    Ulysses all-to-all (u ranks, N/W tokens each): sends (u-1)/u * (N/W) * D * b * (Hq + 2 Hkv') before
    attention (q, k, v to head shards) and (u-1)/u * (N/W) * D * b * Hq after (out back); the backward moves
    the same (dout in, dq/dk/dv back). Hkv' = max(Hkv, u): K/V heads replicated when u > Hkv.
    Ring (r ranks, N/r tokens and Hkv'/u kv heads each after the all-to-all): r-1 steps of K+V,
    2 * (N/r) * (Hkv'/u) * D * b bytes each, forward and again backward, plus r-1 sends of the float32
    dK+dV buffer, 2 * (N/r) * (Hkv'/u) * D * 4 bytes each (the own shard's part is added at home: ring.py).
    """
    hq, hkv, d, b, layers = shapes["hq"], shapes["hkv"], shapes["d"], shapes["bytes"], shapes["layers"]
    rows = []
    u = 1
    while u <= world:
        r = world // u
        hkv_u = max(hkv, u)
        a2a = (u - 1) / u * (seq_len / world) * d * b * (2 * hq + 2 * hkv_u) if u > 1 else 0.0
        kv_step = 2 * (seq_len / r) * (hkv_u / u) * d * b if r > 1 else 0.0
        dkv_step = 2 * (seq_len / r) * (hkv_u / u) * d * 4 if r > 1 else 0.0
        ring_fwd = (r - 1) * kv_step
        ring_bwd = (r - 1) * (kv_step + dkv_step)
        layer_fwd = a2a + ring_fwd
        layer_fwd_bwd = 2 * a2a + ring_fwd + ring_bwd
        # zigzag: each ring step computes (N/r)^2 / 2 score entries per head of the rank's Hq/u heads
        step_flops = 4 * (seq_len / r) ** 2 / 2 * (hq / u) * d if r > 1 else 0.0
        step_ms = step_flops / (step_tflops * 1e12) * 1e3
        rows.append(dict(
            N=seq_len, ulysses=u, ring=r, kv_step_MB=kv_step / 1e6, a2a_MB=a2a / 1e6,
            layer_fwd_MB=layer_fwd / 1e6, layer_fwd_bwd_MB=layer_fwd_bwd / 1e6,
            model_fwd_bwd_GB=layers * layer_fwd_bwd / 1e9,
            step_compute_ms=step_ms if r > 1 else None,
            GBps_to_hide_ring=(kv_step / 1e9) / (step_ms * 1e-3) if r > 1 else None,
            layer_ms_at_50GBps=layer_fwd_bwd / 50e9 * 1e3, layer_ms_at_450GBps=layer_fwd_bwd / 450e9 * 1e3))
        u *= 2
    return rows


def run(device: str, small: bool) -> dict:
    rows, notes = kernel_rows(device, small)
    ring, ring_notes = ring_rows(device, small)
    comm = comm_rows(32768) + comm_rows(131072)
    blocks = block_rows()
    notes += ring_notes + cpu_note(device) + [
        "communication: Llama-3.1-8B (32 layers, Hq=32, Hkv=8, D=128, bf16), W=8, bytes sent per rank; "
        "formulas in bench_attention.comm_rows; GBps_to_hide_ring = K/V step bytes / zigzag step compute at 400 TFLOP/s",
        f"device: {device_name(device)}"]
    summary = [dict(T=r["T"], mode=r["mode"], sealong_tflops=r.get("sealong_tflops"),
                    speedup_vs_sdpa=r.get("speedup_vs_sdpa")) for r in rows]
    summary += [dict(T=f"ring {r['layout']} W={r['W']}", mode="fwd / fwd+bwd eff",
                     sealong_tflops=r["fwd_eff"], speedup_vs_sdpa=r["fwd_bwd_eff"]) for r in ring if r["W"] > 1]
    notes.append("blocks: one 32K preference pair (30K prompt, 1K chosen, 1K rejected; segments 0/1/2, causal), "
                 "128 x 128 block pairs; bench_attention.block_rows")
    return dict(name="attention", rows=rows + ring + comm + blocks, notes=notes, summary=summary)


def run_blocks() -> dict:
    """The block table alone (counts only, device-independent): `python -m bench.bench_attention --blocks`."""
    return dict(name="attention_blocks", rows=block_rows(),
                notes=["one 32K preference pair (30K prompt, 1K chosen, 1K rejected; segments 0/1/2, causal), "
                       "128 x 128 block pairs; plan = attention_plan.block_classes (what the kernels loop over), "
                       "ideal = the token-level rule per block pair, range kernel = causal key range, all masked"])


if __name__ == "__main__":
    if sys.argv[1:] == ["--blocks"]:
        from bench.common import format_rows, write_results

        result = run_blocks()
        print(format_rows(result["rows"]))
        print(write_results(result, "cpu"))
        sys.exit(0)
    from bench.run_all import main

    sys.exit(main(["--only", "attention"]))
