"""Flash attention in Triton: packed sequences, GQA, segment visibility, global position offsets, LSE out.

Layers, in reading order:
  1. `@triton.jit` kernels, in `sealong_kernels.attention_kernels`: the visibility rule, forward (online
     softmax), backward preprocess (delta), dK/dV (one program per key block and kv head, looping over the
     query heads of its group or a split of them, no atomics), dQ (one program per query block and query head).
  2. Launch wrappers `attention_forward` / `attention_backward`: the raw ops, same signatures as their
     twins in `sealong_kernels.reference` (the ring and Ulysses code calls them per step). Plans
     (`attention_plan`: the batch's VarlenPlan, the block classes) and tiles (`attention_tiles`) live apart.
  3. The public `flash_attention`, with backend dispatch: the Triton path through this module's torch.library
     ops `sealong::flash_attention_fwd/bwd` (torch.compile traces them), the reference path through
     `_FlashAttention`.

Math (per query head h, kv head h // G, G = Hq // Hkv, scale = D ** -0.5 unless given):
    S = scale * Q K^T (masked: -inf where not visible),  lse = logsumexp_j S,  O = exp(S - lse) V
    backward:  P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  delta = rowsum(dO * O)
               dQ = scale * dS K,  dK = scale * dS^T Q
The kernels use exp2 internally (S * log2(e)); the stored LSE is converted back to natural log, so partial
results of a ring merge exactly with `lse = log(exp(lse_a) + exp(lse_b))`.

Visibility (see `reference.attention_mask`): key j is visible from query i iff (not causal or
q_start + i >= k_start + j) and (same packed sequence of cu_seqlens) and (kseg[j] == 0 or kseg[j] == qseg[i]).
A query row that sees no key gets out = 0 and lse = -inf.

Work skipping: with packed sequences or segments, a query block loops over the key blocks of its row of the
block-class plan (`attention_plan.block_lists`: empty pairs never visited, full pairs without the mask, partial
pairs with it; loads bounded by its sequences' key range); without them, over the key range it can see (causal:
up to its last query's position), the key blocks every query sees whole without the mask. The dK/dV kernel does
the same over query blocks. Tiles: on a GPU the fastest of
`attention_tiles.launchable_tiles` (spill-free in ahead-of-time compiles for sm_90 / sm_80 under Triton 3.6 and
3.9, pipelined, their compiled shared memory checked against the device's limit), measured once per size bucket
and cached; 16 x 16 under the interpreter. A dtype / head dim without a launchable tile (float32 where every
compile spills) runs the reference path instead (`without_tile`).
"""

import importlib.util
from typing import Optional

import torch
import triton

from . import reference
from .runtime import interpreting, triton_available
from .attention_plan import BlockPlan, VarlenPlan, block_lists, content_version, varlen_plan  # noqa: F401 (re-exported)
from .attention_tiles import launchable_tiles
from .attention_kernels import (  # layer 1: the @triton.jit kernels
    _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_fwd_kernel,
)

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None  # imported lazily when used


# ---------------------------------------------------------------------------------------------------------
# 2. Launch wrappers: the raw ops (same signatures as reference.attention_forward / attention_backward)
# ---------------------------------------------------------------------------------------------------------


INTERPRETER_TILE = (16, 16, 1, 1)  # interpreted programs are slow per element: small tiles, many programs
PLAN_BLOCK = 128  # block classes are planned per 128 x 128 (every GPU tile divides it); the interpreter: its tile


def _plan_key(tq, tk, flags, q_start, k_start):
    plan_m = plan_n = INTERPRETER_TILE[0] if interpreting() else PLAN_BLOCK
    return (int(tq), int(tk), plan_m, plan_n, bool(flags["CAUSAL"]), int(q_start), int(k_start), bool(flags["HAS_SEQ"]),
            bool(flags["HAS_SEG"]))


def _plan_blocks(tq, tk, flags, q_start, k_start, cu_seqlens, segment_ids, k_segment_ids, seq_idx, qseg, kseg,
                 block_plan=None):
    """(block lists by query blocks, by key blocks, PLAN_M, PLAN_N) for calls with packed sequences or segments
    (`attention_plan.block_lists`), else dummies with HAS_PLAN off. block_plan: the caller's BlockPlan (built
    once per batch, `block_plan`), used as given; without one (a caller that passes none) the lists are cached
    on the batch's own tensor (the plan's seq_idx, which the custom ops pass through unchanged, else the segment
    ids) under the content versions of the inputs, when q and k carry the same segments."""
    plan_m = plan_n = INTERPRETER_TILE[0] if interpreting() else PLAN_BLOCK
    if not (flags["HAS_SEQ"] or flags["HAS_SEG"]) or tq == 0 or tk == 0:
        return seq_idx[:1], seq_idx[:1], plan_m, plan_n, False
    if block_plan is not None:
        return block_plan.rows, block_plan.cols, plan_m, plan_n, True
    plan = cu_seqlens if isinstance(cu_seqlens, VarlenPlan) else None
    # the batch's own tensors (the same objects in every layer: the custom ops pass them through)
    # a view (a ring block's slice of the segments) counts as its base plus where it lies in it
    inputs = [t for t in ((plan.cu_seqlens, plan.seq_idx) if plan is not None else ()) + (segment_ids, k_segment_ids)
              if t is not None]
    bases = [t if t._base is None else t._base for t in inputs]
    cache, version = None, None
    if inputs:
        cache = bases[0].__dict__.setdefault("_sealong_blocks", {})
        version = content_version(*inputs)
        if version is not None:
            version += tuple((t.storage_offset(), t.numel()) for t in inputs)
    rows, cols = block_lists(tq, tk, plan_m, plan_n, causal=flags["CAUSAL"], q_start=q_start, k_start=k_start,
                             seq_idx=seq_idx if flags["HAS_SEQ"] else None, qseg=qseg if flags["HAS_SEG"] else None,
                             kseg=kseg if flags["HAS_SEG"] else None, cache=cache, device=seq_idx.device,
                             version=version, companions=bases[1:])
    return rows, cols, plan_m, plan_n, True
def block_plan(tq, tk=None, *, causal=True, q_start=0, k_start=0, cu_seqlens=None, segment_ids=None,
               k_segment_ids=None, device=None):
    """The BlockPlan of attention calls with this geometry (q of Tq tokens against Tk keys, the batch's packed
    sequences and / or segment ids), for `flash_attention(..., block_plan=...)`: build it once per batch and
    pass it to every layer (forward and backward), so no layer builds or looks up block lists. None where the
    calls have nothing to plan (no sequences, no segments, no tokens). Fixed-size device ops, no host sync."""
    tk = tq if tk is None else tk
    flags = dict(CAUSAL=bool(causal), HAS_SEQ=cu_seqlens is not None, HAS_SEG=segment_ids is not None)
    if not (flags["HAS_SEQ"] or flags["HAS_SEG"]) or tq == 0 or tk == 0:
        return None
    ref = segment_ids if segment_ids is not None else (cu_seqlens.seq_idx if isinstance(cu_seqlens, VarlenPlan)
                                                       else cu_seqlens)
    dev = device if device is not None else ref.device
    seq_idx = None
    if cu_seqlens is not None:
        plan = cu_seqlens if isinstance(cu_seqlens, VarlenPlan) else varlen_plan(cu_seqlens, tq, device=dev)
        seq_idx = plan.seq_idx.to(dev)
    qseg = kseg = None
    if segment_ids is not None:
        qseg = segment_ids.to(device=dev, dtype=torch.int32)
        kseg = qseg if k_segment_ids is None else k_segment_ids.to(device=dev, dtype=torch.int32)
    key = _plan_key(tq, tk, flags, q_start, k_start)
    rows, cols = block_lists(tq, tk, key[2], key[3], causal=flags["CAUSAL"], q_start=q_start, k_start=k_start,
                             seq_idx=seq_idx, qseg=qseg, kseg=kseg, device=dev)
    return BlockPlan(rows, cols, key)


def _check_block_plan(block_plan, tq, tk, causal, q_start, k_start, cu_seqlens, segment_ids):
    """A caller's plan must be the plan of this call's geometry (a plan of another batch shape would give the
    wrong visibility): host-side comparison of its key, no device read."""
    if block_plan is None:
        return
    flags = dict(CAUSAL=bool(causal), HAS_SEQ=cu_seqlens is not None, HAS_SEG=segment_ids is not None)
    want = _plan_key(tq, tk, flags, q_start, k_start)
    if block_plan.key != want:
        raise ValueError(f"block_plan was built for (Tq, Tk, PLAN_M, PLAN_N, causal, q_start, k_start, sequences, "
                         f"segments) = {block_plan.key}, this call is {want}")


_TUNED = {}  # (kind, arch, BLOCK_D, dtype, flags, log2 bucket of Tq * Tk) -> the fastest launchable tile


def _device_arch(device):
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _shared_limit(device):
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None) or 227 * 1024


def _tiles_for(kind, head_dim, dtype, device):
    """The launchable tiles of `attention_tiles` for this device: spill-free in ahead-of-time compiles, recorded
    shared memory within the device's per-block limit."""
    tiles = launchable_tiles(kind, head_dim, dtype, _device_arch(device), _shared_limit(device))
    if not tiles:
        raise ValueError(f"no {kind} tile of head dim {head_dim} ({dtype}) fits this GPU's shared memory")
    return tiles


def without_tile(kinds, head_dim, dtype, arch, shared_limit=None):
    """True when one of these kernel kinds has no launchable tile for this head dim, dtype and arch (float32 at
    head dims whose compiles all spill, or a tile over the device's shared memory): such a call runs the reference
    path, the same math in plain torch, instead of failing."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or not 0 < head_dim <= 256:
        return False  # _check_inputs says what is wrong
    return any(not launchable_tiles(kind, head_dim, dtype, arch, shared_limit) for kind in kinds)


def _use_reference(q, kinds):
    """The reference serves this call: no Triton here, or (on a GPU) no launchable tile for it."""
    if not triton_available(q):
        return True
    if interpreting() or not q.is_cuda:
        return False
    return without_tile(kinds, q.shape[-1], q.dtype, _device_arch(q.device), _shared_limit(q.device))


def choose_tile(key, tiles, run, bench=None):
    """The fastest of `tiles` for `key`, measured once per key and cached (small calls included: the key's size
    bucket keeps a tile tuned on a short call from serving a long one). run(tile) launches the kernel with that
    tile (the kernels overwrite their whole outputs, so repeated launches are harmless); bench(fn) -> ms."""
    if key not in _TUNED:
        if len(tiles) == 1:
            _TUNED[key] = tiles[0]
        else:
            if bench is None:
                from triton.testing import do_bench as bench
            _TUNED[key] = min(tiles, key=lambda t: bench(lambda: run(t)))
    return _TUNED[key]


def _precision(dtype):
    # fp32 inputs (CPU tests, GPU checks) must not silently round to tf32; 16-bit inputs use the tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _cu_tensor(cu_seqlens):
    """The cu_seqlens tensor of a plan (or the tensor / None itself), for the plain-torch twins."""
    return cu_seqlens.cu_seqlens if isinstance(cu_seqlens, VarlenPlan) else cu_seqlens


_DUMMIES = {}  # device -> the int32 placeholder passed for absent id / plan pointers (never read by the kernels)


def _dummy(device):
    """One placeholder per device, not a fresh allocation (and memset) per call."""
    if device not in _DUMMIES:
        _DUMMIES[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _DUMMIES[device]


def _check_accumulators(tensors, shapes, what):
    """Accumulators a call adds into in place: float32 (float64 on the reference path), the given shapes, last dim
    contiguous (row strides may be those of a larger tensor: a ring block's slice)."""
    for t, shape in zip(tensors, shapes):
        if t is None:  # a backward part not asked for (see attention_backward)
            continue
        if tuple(t.shape) != tuple(shape) or t.dtype not in (torch.float32, torch.float64) or (t.numel() and t.stride(-1) != 1):
            raise ValueError(f"{what} accumulators must be float32 {[tuple(x) for x in shapes]} with a contiguous last dim, "
                             f"got {[None if x is None else (tuple(x.shape), x.dtype, x.stride()) for x in tensors]}")


def _check_inputs(q, k, v, q_start, k_start, cu_seqlens, segment_ids, k_segment_ids):
    """Validate shapes; return (seq_idx, cu_seqlens, qseg, kseg) int32 tensors on q's device (or dummies)."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k, v must be [T, H, D], got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if k.shape != v.shape or k.shape[2] != d:
        raise ValueError(f"k and v must be [Tk, Hkv, D={d}], got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if d > 256:
        raise ValueError(f"head dim {d} is not supported (at most 256)")
    dev = q.device
    dummy = _dummy(dev)
    seq_idx = cu = qseg = kseg = dummy
    if cu_seqlens is not None:
        if tq != tk or q_start != k_start:
            raise ValueError(f"cu_seqlens needs q and k to be the same tokens (Tq={tq}, Tk={tk}, q_start={q_start}, k_start={k_start})")
        plan = cu_seqlens if isinstance(cu_seqlens, VarlenPlan) else varlen_plan(cu_seqlens, tq, device=dev)
        if plan.total != tq:
            raise ValueError(f"the varlen plan covers {plan.total} tokens, q has {tq}")
        seq_idx, cu = plan.seq_idx.to(dev), plan.cu_seqlens.to(dev)
    if segment_ids is not None or k_segment_ids is not None:
        if segment_ids is None:
            raise ValueError("k_segment_ids needs segment_ids for the queries")
        qseg = segment_ids.to(device=dev, dtype=torch.int32).contiguous()
        kseg = qseg if k_segment_ids is None else k_segment_ids.to(device=dev, dtype=torch.int32).contiguous()
        if qseg.shape != (tq,) or kseg.shape != (tk,):
            raise ValueError(f"segment_ids must be [Tq]={tq} and k_segment_ids [Tk]={tk}, got {tuple(qseg.shape)} and {tuple(kseg.shape)}")
    return seq_idx, cu, qseg, kseg


def _last_dim_contiguous(*ts):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


GQA_SPLITS = None  # force the dK/dV split of the query-head group (tests); None: `gqa_splits` decides


def gqa_splits(tk, hkv, group, device, block_n=64):
    """Programs per kv head of the dK/dV grid: 1, or (when key blocks x kv heads fill less than two waves of the
    GPU's SMs) the largest divisor of the query-head group up to what fills two waves; each split sums its share
    of the group into its own float32 dK / dV, summed afterwards."""
    if GQA_SPLITS is not None:
        return GQA_SPLITS if group % GQA_SPLITS == 0 else 1
    if interpreting() or not torch.cuda.is_available() or group == 1:
        return 1
    programs = triton.cdiv(tk, block_n) * hkv
    waves = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(waves, programs) if programs < waves else 1
    return max(s for s in range(1, group + 1) if group % s == 0 and s <= want)


def _launch(kernel, kind, grid, args, flags, head_dim, scores):
    """Launch `kernel` (forward, dQ or dK/dV) with grid(meta) -> grid tuple, meta holding BLOCK_M and BLOCK_N.

    Interpreter: small tiles. GPU: the cached fastest of the launchable tiles for this size bucket."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    meta = dict(flags, HEAD_DIM=head_dim, BLOCK_D=block_d)

    def run(tile):
        bm, bn, warps, stages = tile
        kernel[grid(dict(BLOCK_M=bm, BLOCK_N=bn))](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                   num_stages=stages)

    if interpreting():
        return run(INTERPRETER_TILE)
    q = args[0]
    tiles = _tiles_for(kind, head_dim, q.dtype, q.device)
    same = tuple(sorted((k, v) for k, v in flags.items() if k != "ACCUMULATE"))
    key = (kind, _device_arch(q.device), block_d, q.dtype, same, max(int(scores), 1).bit_length())
    try:
        if flags.get("ACCUMULATE"):  # adds into its outputs: launched once, never benchmarked (that would add
            # twice); the tile its non-accumulating twin was tuned to (the same tile set, compiled clean), else the first
            run(_TUNED.get(key, tiles[0]))
        else:
            run(choose_tile(key, tiles, run))
    except triton.runtime.errors.OutOfResources as err:
        raise ValueError(f"head dim {head_dim} does not fit this GPU's shared memory ({err})") from err


def attention_forward(q, k, v, *, causal=True, softmax_scale=None, q_start=0, k_start=0,
                      cu_seqlens=None, segment_ids=None, k_segment_ids=None, out_dtype=None, block_plan=None,
                      accumulate=None):
    """Raw forward: -> (out [Tq, Hq, D] in q's dtype, lse [Hq, Tq] float32, natural log). See module docstring.

    Runs our Triton kernel on CUDA (or on CPU under TRITON_INTERPRET=1), else (or without a launchable tile for
    this dtype and head dim) the reference. out_dtype: the
    output's dtype (default q's). block_plan: the caller's BlockPlan of this geometry (`block_plan`; None: built
    or found in the cache).

    accumulate: (out [Tq, Hq, D], lse [Hq, Tq]) float32 accumulators holding a partial result over other keys (a
    ring's; views of larger tensors are fine, the last dim contiguous): this call's keys are merged into them in
    place, in the kernel's epilogue (`_attn_fwd_kernel` ACCUMULATE: no partial tensors, no merge kernel), and
    they are returned. Rows with lse = -inf (no key seen yet) must hold out = 0."""
    if accumulate is not None:
        _check_accumulators(accumulate, (q.shape, (q.shape[1], q.shape[0])), "forward")
    if _use_reference(q, ("fwd",)) or (accumulate is not None and accumulate[0].dtype != torch.float32):
        return reference.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, q_start=q_start,
                                           k_start=k_start, cu_seqlens=_cu_tensor(cu_seqlens), segment_ids=segment_ids,
                                           k_segment_ids=k_segment_ids, out_dtype=out_dtype, accumulate=accumulate)
    seq_idx, cu, qseg, kseg = _check_inputs(q, k, v, q_start, k_start, cu_seqlens, segment_ids, k_segment_ids)
    q, k, v = _last_dim_contiguous(q, k, v)
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    if accumulate is not None:
        out, lse = accumulate
    else:
        out = q.new_empty(q.shape, dtype=out_dtype or q.dtype)  # contiguous, as the op's fake implementation says
        lse = torch.empty(hq, tq, dtype=torch.float32, device=q.device)
    if tq == 0 or (accumulate is not None and tk == 0):  # no keys: the accumulators are the result
        return out, lse
    flags = dict(CAUSAL=bool(causal), HAS_SEQ=cu_seqlens is not None, HAS_SEG=segment_ids is not None,
                 PRECISION=_precision(q.dtype))
    rows, _, plan_m, plan_n, has_plan = _plan_blocks(tq, tk, flags, q_start, k_start, cu_seqlens, segment_ids,
                                                     k_segment_ids, seq_idx, qseg, kseg, block_plan)
    flags.update(HAS_PLAN=has_plan, PLAN_M=plan_m, PLAN_N=plan_n)
    if accumulate is not None:  # a separate compile: the non-accumulating kernel is the one it always was
        flags.update(ACCUMULATE=True)
    args = (q, k, v, out, lse, seq_idx, cu, qseg, kseg, rows,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            lse.stride(0), tq, tk, int(q_start), int(k_start), hq // hkv, scale * LOG2E)
    _launch(_attn_fwd_kernel, "fwd", lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), hq), args, flags, d, tq * tk)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, *, delta=None, causal=True, softmax_scale=None, q_start=0, k_start=0,
                       cu_seqlens=None, segment_ids=None, k_segment_ids=None, block_plan=None, accumulate=None):
    """Raw backward from the given (possibly global, merged) out and lse -> (dq, dk, dv), all float32.

    delta = rowsum(dout * out) [Hq, Tq] float32 is computed by the preprocess kernel when not given (a ring
    passes the global one). dk, dv are summed over the query heads of each kv head inside the kernel.
    accumulate: (dq [Tq, Hq, D], dk, dv [Tk, Hkv, D]) float32 gradients (a ring step's; views are fine, the last
    dim contiguous) that this call's gradients are added to in place, in the kernels' epilogues (ACCUMULATE), and
    returned: no gradient tensors are allocated. The dK/dV grid then runs one split per kv head (each program
    owns its key rows; `gqa_splits` > 1 would need a partial buffer per split). (dq, None, None) runs only the dQ
    kernel, (None, dk, dv) only the dK/dV kernel: a ring computes its own shard's two parts at different times."""
    if accumulate is not None:
        reference.check_backward_parts(accumulate)
        _check_accumulators(accumulate, (q.shape, k.shape, k.shape), "backward")
    given = None if accumulate is None else next(t for t in accumulate if t is not None)
    if _use_reference(q, ("dkdv", "dq")) or (given is not None and given.dtype != torch.float32):
        return reference.attention_backward(dout, q, k, v, out, lse, delta=delta, causal=causal,
                                            softmax_scale=softmax_scale, q_start=q_start, k_start=k_start,
                                            cu_seqlens=_cu_tensor(cu_seqlens), segment_ids=segment_ids,
                                            k_segment_ids=k_segment_ids, accumulate=accumulate)
    seq_idx, cu, qseg, kseg = _check_inputs(q, k, v, q_start, k_start, cu_seqlens, segment_ids, k_segment_ids)
    q, k, v, dout = _last_dim_contiguous(q, k, v, dout.to(q.dtype))
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if dout.shape != q.shape or lse.shape != (hq, tq):
        raise ValueError(f"dout must be {tuple(q.shape)} and lse [Hq, Tq]={(hq, tq)}, got {tuple(dout.shape)}, {tuple(lse.shape)}")
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    lse = lse.to(torch.float32).contiguous()
    if delta is None:
        out = _last_dim_contiguous(out)[0]
        delta = torch.empty(hq, tq, dtype=torch.float32, device=q.device)
        if tq > 0:
            bm = 16 if interpreting() else 64
            _attn_bwd_delta_kernel[(triton.cdiv(tq, bm), hq)](
                out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), tq,
                HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=bm)
    delta = delta.to(torch.float32).contiguous()
    if delta.shape != (hq, tq):
        raise ValueError(f"delta must be [Hq, Tq]={(hq, tq)}, got {tuple(delta.shape)}")
    if tq == 0 or tk == 0:
        if accumulate is not None:
            return tuple(accumulate)
        return (torch.zeros(tq, hq, d, dtype=torch.float32, device=q.device),
                torch.zeros(tk, hkv, d, dtype=torch.float32, device=q.device),
                torch.zeros(tk, hkv, d, dtype=torch.float32, device=q.device))
    # every program stores its whole tile (zeros where it saw nothing), so no memset is needed
    group = hq // hkv
    flags = dict(CAUSAL=bool(causal), HAS_SEQ=cu_seqlens is not None, HAS_SEG=segment_ids is not None,
                 PRECISION=_precision(q.dtype))
    if accumulate is not None:  # add into the caller's gradients (a separate compile, ACCUMULATE)
        splits = 1
        dq, dk, dv = accumulate
        if dk is not None:
            dk, dv = dk.unsqueeze(0), dv.unsqueeze(0)  # views: [1, Tk, Hkv, D]
        flags.update(ACCUMULATE=True)
    else:
        splits = gqa_splits(tk, hkv, group, q.device)
        dq = torch.empty(tq, hq, d, dtype=torch.float32, device=q.device)
        dk = torch.empty(splits, tk, hkv, d, dtype=torch.float32, device=q.device)
        dv = torch.empty(splits, tk, hkv, d, dtype=torch.float32, device=q.device)
    rows, cols, plan_m, plan_n, has_plan = _plan_blocks(tq, tk, flags, q_start, k_start, cu_seqlens, segment_ids,
                                                        k_segment_ids, seq_idx, qseg, kseg, block_plan)
    flags.update(HAS_PLAN=has_plan, PLAN_M=plan_m, PLAN_N=plan_n)
    common = (tq, tk, int(q_start), int(k_start), hq // hkv, scale)
    strides_in = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1))
    if dk is not None:
        _launch(_attn_bwd_dkdv_kernel, "dkdv", lambda meta: (triton.cdiv(tk, meta["BLOCK_N"]), hkv, splits),
                (q, k, v, dout, lse, delta, dk, dv, seq_idx, cu, qseg, kseg, cols, *strides_in,
                 dk.stride(1), dk.stride(2), dv.stride(1), dv.stride(2), dk.stride(0), dv.stride(0),
                 tq, tk, int(q_start), int(k_start), group, group // splits, scale), flags, d, tq * tk)
    if dq is not None:
        _launch(_attn_bwd_dq_kernel, "dq", lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), hq),
                (q, k, v, dout, lse, delta, dq, seq_idx, cu, qseg, kseg, rows, *strides_in, dq.stride(0),
                 dq.stride(1), *common),
                flags, d, tq * tk)
    if accumulate is not None:
        return tuple(accumulate)
    if splits == 1:
        return dq, dk[0], dv[0]
    return dq, dk.sum(0), dv.sum(0)


# ---------------------------------------------------------------------------------------------------------
# 3. The torch.library custom ops (torch.compile traces them), autograd Function, backends, public function
# ---------------------------------------------------------------------------------------------------------
#
# The Triton path as `torch.library` custom ops, so `torch.compile(fullgraph=True)` traces a layer that calls
# `flash_attention` without a graph break: the compiler sees two opaque ops with fake (shape-only)
# implementations and an autograd rule, never the launch code.
#
#     sealong::flash_attention_fwd(q, k, v, ...) -> (out [Tq, Hq, D] in q's dtype, lse [Hq, Tq] float32)
#     sealong::flash_attention_bwd(dout, q, k, v, out, lse, ...) -> (dq, dk, dv) float32
#
# A varlen plan travels as its two tensors (cu_seqlens, seq_idx): the ops rebuild it without validating (the
# caller built and validated it once per batch), so neither op reads anything on the host.


Tensor = torch.Tensor


def _plan(q, cu_seqlens, seq_idx):
    return None if cu_seqlens is None else VarlenPlan(cu_seqlens, seq_idx, q.shape[0])


def _blocks(rows, cols):
    """The caller's block plan as the ops carry it (its two tensors; the geometry was checked before dispatch)."""
    return None if rows is None else BlockPlan(rows, cols, None)


@torch.library.custom_op("sealong::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: Optional[float], q_start: int,
                        k_start: int, cu_seqlens: Optional[Tensor], seq_idx: Optional[Tensor],
                        segment_ids: Optional[Tensor], k_segment_ids: Optional[Tensor], block_rows: Optional[Tensor],
                        block_cols: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, q_start=q_start, k_start=k_start,
                             cu_seqlens=_plan(q, cu_seqlens, seq_idx), segment_ids=segment_ids,
                             k_segment_ids=k_segment_ids, block_plan=_blocks(block_rows, block_cols))


@flash_attention_fwd.register_fake
def _(q, k, v, causal, softmax_scale, q_start, k_start, cu_seqlens, seq_idx, segment_ids, k_segment_ids, block_rows,
      block_cols):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("sealong::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                        softmax_scale: Optional[float], q_start: int, k_start: int, cu_seqlens: Optional[Tensor],
                        seq_idx: Optional[Tensor], segment_ids: Optional[Tensor],
                        k_segment_ids: Optional[Tensor], block_rows: Optional[Tensor],
                        block_cols: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale, q_start=q_start,
                              k_start=k_start, cu_seqlens=_plan(q, cu_seqlens, seq_idx), segment_ids=segment_ids,
                              k_segment_ids=k_segment_ids, block_plan=_blocks(block_rows, block_cols))


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, softmax_scale, q_start, k_start, cu_seqlens, seq_idx, segment_ids,
      k_segment_ids, block_rows, block_cols):
    f32 = dict(dtype=torch.float32)
    return q.new_empty(q.shape, **f32), k.new_empty(k.shape, **f32), v.new_empty(v.shape, **f32)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, q_start, k_start, cu_seqlens, seq_idx, segment_ids, k_segment_ids, rows, cols = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens, seq_idx, segment_ids, k_segment_ids, rows, cols)
    ctx.args = (causal, softmax_scale, q_start, k_start)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, seq_idx, segment_ids, k_segment_ids, rows, cols = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(dout.contiguous(), q, k, v, out, lse, *ctx.args, cu_seqlens, seq_idx,
                                     segment_ids, k_segment_ids, rows, cols)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 10)


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention_op(q, k, v, causal, softmax_scale, q_start, k_start, plan, segment_ids, k_segment_ids,
                       block_plan=None):
    """(out, lse) through the custom ops; lse carries no gradient."""
    cu, seq_idx = (None, None) if plan is None else (plan.cu_seqlens, plan.seq_idx)
    rows, cols = (None, None) if block_plan is None else (block_plan.rows, block_plan.cols)
    out, lse = flash_attention_fwd(q, k, v, bool(causal), None if softmax_scale is None else float(softmax_scale),
                                   int(q_start), int(k_start), cu, seq_idx, segment_ids, k_segment_ids, rows, cols)
    return out, lse.detach()


class _FlashAttention(torch.autograd.Function):
    """out, lse = attention(q, k, v); backward from the saved out and lse only (no recomputed normalizer).

    use_ref: the plain-torch twin (float64-capable) instead of the Triton raw ops."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, q_start, k_start, cu_seqlens, segment_ids, k_segment_ids, use_ref):
        kw = dict(causal=causal, softmax_scale=softmax_scale, q_start=q_start, k_start=k_start,
                  cu_seqlens=_cu_tensor(cu_seqlens) if use_ref else cu_seqlens, segment_ids=segment_ids,
                  k_segment_ids=k_segment_ids)
        out, lse = (reference.attention_forward if use_ref else attention_forward)(q, k, v, **kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kw, ctx.use_ref = kw, use_ref
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = (reference.attention_backward if ctx.use_ref else attention_backward)(dout, q, k, v, out, lse, **ctx.kw)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


def _flash_attn_fits(q, k, causal, q_start, k_start, segment_ids, k_segment_ids):
    """flash-attn's varlen kernel computes this call exactly: CUDA, 16-bit, no segments, no causal offsets."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] % 8 != 0 or q.shape[-1] > 256:
        return False
    if segment_ids is not None or k_segment_ids is not None:
        return False
    return not causal or (q_start == k_start and q.shape[0] == k.shape[0])


def _flash_attn_varlen(q, k, v, causal, softmax_scale, cu_seqlens):
    import flash_attn

    tq, tk = q.shape[0], k.shape[0]
    if cu_seqlens is None:
        cu_q = torch.tensor([0, tq], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, tk], dtype=torch.int32, device=q.device)
        max_q, max_k = tq, tk
    else:
        plan = varlen_plan(cu_seqlens, tq, device=q.device)  # a plan built by the caller: no host sync here
        cu_q = cu_k = plan.cu_seqlens
        max_q = max_k = plan.max_seqlen if plan.max_seqlen is not None else int((cu_q[1:] - cu_q[:-1]).max())
    out, lse, _ = flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
                                                    softmax_scale=softmax_scale, causal=causal, return_attn_probs=True)
    if lse.shape != (q.shape[1], tq):  # older releases pad the LSE per sequence: not this contract
        raise RuntimeError(f"flash-attn returned lse of shape {tuple(lse.shape)}; use backend='triton'")
    return out, lse.float()


def flash_attention_backend(q, k, causal=True, *, q_start=0, k_start=0, segment_ids=None, k_segment_ids=None):
    """The backend `flash_attention(..., backend="auto")` picks for this call: "flash_attn" (installed and the
    call fits its varlen kernel), else "triton" (CUDA, or CPU with TRITON_INTERPRET=1), else "reference"."""
    if _HAS_FLASH_ATTN and _flash_attn_fits(q, k, causal, q_start, k_start, segment_ids, k_segment_ids):
        return "flash_attn"
    return "triton" if triton_available(q) else "reference"


def flash_attention(q, k, v, causal=True, cu_seqlens=None, softmax_scale=None, *, segment_ids=None,
                    k_segment_ids=None, q_start=0, k_start=0, backend="auto", block_plan=None):
    """Exact attention over packed sequences -> (out [Tq, Hq, D], lse [Hq, Tq] float32, natural log).

    q [Tq, Hq, D], k, v [Tk, Hkv, D] with Hq % Hkv == 0: query head h reads kv head h // (Hq // Hkv) (GQA/MQA,
    K/V never repeated in memory). float16 / bfloat16 (float32 for tests), D up to 256. Differentiable in
    q, k, v; lse carries no gradient. softmax_scale defaults to D ** -0.5.

    Visibility of key j from query i (all must hold):
      causal:       q_start + i >= k_start + j           causal, q_start = k_start = 0, T = 4:
      cu_seqlens:   same packed sequence ([S+1] int32)        k 0 1 2 3
      segment_ids:  kseg[j] == 0 or kseg[j] == qseg[i]     q0 x . . .
                                                           q1 x x . .
                                                           q2 x x x .
                                                           q3 x x x x
    Segment ids [T] int32 implement the shared-prompt preference packing: 0 = prompt, 1 = chosen, 2 = rejected
    (rejected tokens see the prompt and themselves, never the chosen answer). q_start / k_start are global
    positions of the first query / key, so one call computes a ring step. A row that sees no key: out 0, lse -inf.
    cu_seqlens may be a `VarlenPlan` (`varlen_plan(cu_seqlens, T)`, built once per batch): then the call validates
    nothing and reads nothing on the host (a raw tensor is validated here, one host sync per call).

    block_plan: the BlockPlan of this call's geometry (`block_plan(...)`, built once per batch and passed to
    every layer; the Triton backend uses it as given, the others need none). None: the Triton backend builds
    the block lists or finds them in its content-versioned cache (one build per batch when every layer
    passes the same segment-id / plan tensors).
    """
    if cu_seqlens is not None and (q.shape[0] != k.shape[0] or q_start != k_start):
        # checked before dispatch: flash-attn's varlen call would read k with q's boundaries without complaint
        raise ValueError(f"cu_seqlens needs q and k to be the same tokens (Tq={q.shape[0]}, Tk={k.shape[0]}, "
                         f"q_start={q_start}, k_start={k_start})")
    if backend == "auto":
        backend = flash_attention_backend(q, k, causal, q_start=q_start, k_start=k_start, segment_ids=segment_ids,
                                          k_segment_ids=k_segment_ids)
    if backend == "flash_attn":
        if not _flash_attn_fits(q, k, causal, q_start, k_start, segment_ids, k_segment_ids):
            raise ValueError("backend='flash_attn' needs CUDA 16-bit inputs without segment_ids or causal offsets")
        return _flash_attn_varlen(q, k, v, causal, softmax_scale, cu_seqlens)
    if backend not in ("triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'flash_attn', 'triton' or 'reference', got {backend!r}")
    if backend == "triton" and not triton_available(q):
        raise ValueError(f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1, got device {q.device}")
    if backend == "triton":  # the torch.library ops (torch.compile traces them); cu_seqlens validated once here
        plan = None if cu_seqlens is None else varlen_plan(cu_seqlens, q.shape[0], device=q.device)
        _check_block_plan(block_plan, q.shape[0], k.shape[0], causal, q_start, k_start, cu_seqlens, segment_ids)
        return flash_attention_op(q, k, v, causal, softmax_scale, q_start, k_start, plan, segment_ids, k_segment_ids,
                                  block_plan)
    return _FlashAttention.apply(q, k, v, causal, softmax_scale, q_start, k_start, cu_seqlens, segment_ids,
                                 k_segment_ids, True)

