"""Compile report cases for every non-attention `@triton.jit` kernel of sealong_kernels, at every tile its launcher
can choose, for `bench.aot.compile_stats` (ahead of time, sm_80 and sm_90, a real launch's alignment).

Kernels and the launcher that picks their configuration:

* orpo._logits_rows_kernel   `orpo.row_launch_config` (GPU: 1 row, BLOCK_V = min(next_pow2(V), 4096), 8 warps) in
                             its three modes: forward (LSE), deferred forward (LSE + G), backward (scaled G);
* mbr._mbr_scores_kernel     `mbr._block_sizes(N, D)` for N = 16 ... 512 (MAX_N), D short (37) and long (4096),
                             unweighted, and with peer weights (`_block_sizes(N, D, weighted=True)`);
* decode._prefix_decode_kernel  `decode._launch_config` (BLOCK_M 16 ... 128, BLOCK_N by head dim), partial out
                             float32 (several key splits) or in q's dtype (one split);
* decode._merge_splits_kernel   `decode.merge_block_m(D)`, out in q's dtype, by row (prefix kernel) or by slot
                             (HAS_ROWS, the cascade's);
* decode._cascade_decode_kernel `decode.cascade_tile_config` + `decode.samples_per_tile` (BLOCK_M 16, 32; G 4, 1),
                             partial out float32 (several key splits) or in q's dtype (one split);
* ring_merge._merge_kernel   `ring_merge._merge_triton` (BLOCK_T 16 for D > 64, else 32; 4 warps).

Each case is a dict {fn, arg_types, constexprs, num_warps, num_stages, divisible_ints} plus labels (name,
kernel, dtype, tile): the shape `bench/compile_report.py` uses for the attention kernels.

    TRITON_INTERPRET=0 python -m bench.compile_cases_kernels     # compiles every case for sm_80 and sm_90 and
                                                                 # writes bench/results/compile_kernels_<triton>_<date>.json
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import triton

from sealong_kernels import decode, mbr, orpo, ring_merge

ARCHS = (80, 90)
ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
HEAD_DIMS = (64, 128, 256)


LAUNCH_STAGES = 3  # the launchers of these kernels pass no num_stages: Triton's default, 3, is what runs


def _case(name, fn, arg_types, constexprs, num_warps, divisible_ints=(), num_stages=LAUNCH_STAGES, **labels):
    return dict(fn=fn, arg_types=arg_types, constexprs=constexprs, num_warps=num_warps, num_stages=num_stages,
                divisible_ints=tuple(divisible_ints), name=name, kernel=fn.__name__, **labels)


def loss_row_cases():
    """The row kernel of the fused loss in its three modes: V = 128256 (BLOCK_V 4096, the largest tile) in
    bfloat16 and float32, V = 1000 (BLOCK_V 1024) in bfloat16."""
    modes = {"forward": (True, False, False), "deferred": (True, True, False), "backward": (False, True, True)}
    out = []
    for dtype, v in (("bf16", 128256), ("fp32", 128256), ("bf16", 1000)):
        block_r, block_v, warps = orpo.row_launch_config(v, on_gpu=True)
        for mode, (lse, grad, scale) in modes.items():
            types = dict(logits_ptr="*" + dtype, stride_row="i32", targets_ptr="*i64", lse_ptr="*fp32",
                         target_logit_ptr="*fp32", zsum_ptr="*fp32", scale_ptr="*fp32", C="i32", V="i32")
            const = dict(BLOCK_R=block_r, BLOCK_V=block_v, COMPUTE_LSE=lse, WRITE_GRAD=grad, HAS_SCALE=scale)
            divisible = ("stride_row", "V") if v % 16 == 0 else ()
            out.append(_case(f"loss_rows/{mode}/{dtype}/V{v}", orpo._logits_rows_kernel, types, const, warps,
                             divisible, dtype=dtype, tile=[block_r, block_v]))
    return out


def mbr_cases():
    """MBR scores: every tile `_block_sizes` picks for N = 16 ... 512 with a short and a long embedding in float32
    (the kernel computes in float32 whatever it loads), the smallest and largest BLOCK_N in bfloat16, and the
    peer-weighted variant (HAS_WEIGHTS, --scorer mbr+certainty; its own tiles) for N = 16, 64, 256, 512 in float32."""
    out, seen = [], set()
    for dtype, ns, weighted in (("fp32", (16, 32, 64, 128, 256, 512), False), ("bf16", (16, 512), False),
                                ("fp32", (16, 64, 256, 512), True)):
        for n in ns:
            for d in (37, 4096):
                block_n, block_d, warps = mbr._block_sizes(n, d, weighted)
                if (dtype, weighted, block_n, block_d, warps) in seen:
                    continue
                seen.add((dtype, weighted, block_n, block_d, warps))
                types = dict(E="*" + dtype, M="*i1", W="*fp32", OUT="*fp32", N="i32", D="i32", stride_eb="i32",
                             stride_en="i32", stride_ed="i32", stride_mb="i32", stride_mn="i32", stride_wb="i32",
                             stride_wn="i32", stride_ob="i32", eps="fp32")
                const = dict(HAS_MASK=True, HAS_WEIGHTS=weighted, NORMALIZE=True, INCLUDE_SELF=False, BLOCK_N=block_n,
                             BLOCK_D=block_d)
                divisible = ("N", "stride_mb", "stride_ob") + (("stride_wb",) if weighted else ()) + (
                    ("D", "stride_eb", "stride_en") if d % 16 == 0 else ())
                name = f"mbr/{dtype}{'/weighted' if weighted else ''}/N{n}/D{d}"
                out.append(_case(name, mbr._mbr_scores_kernel, types, const, warps, divisible, dtype=dtype,
                                 tile=[block_n, block_d]))
    return out


def decode_cases():
    """Prefix decode: every BLOCK_M the launcher picks (rows 16 ... 128) for head dims 64, 128, 256 in bfloat16
    (partials float32; one split writes q's dtype at the largest tile) and float32 (IEEE dots, 16 x 16); G = 4."""
    out = []
    strides = ["stride_qm", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_os", "stride_om",
               "stride_oh", "stride_ls", "stride_lh", "stride_lm"]
    for d in HEAD_DIMS:
        for rows, dtype, out_dtype in [(16, "bf16", "fp32"), (32, "bf16", "fp32"), (64, "bf16", "fp32"),
                                       (128, "bf16", "fp32"), (128, "bf16", "bf16"), (128, "fp32", "fp32")]:
            if d == 256 and rows == 128 and out_dtype == "fp32" and dtype == "bf16":
                continue  # the launcher caps BLOCK_M at 64 for head dim 256: the rows = 64 case
            block_m, block_n, warps, _, _ = decode._launch_config(rows, d, 4096, 8, elem=ELEM[dtype])
            types = dict(Q="*" + dtype, K="*" + dtype, V="*" + dtype, OUT="*" + out_dtype, LSE="*fp32", CuQ="*i32",
                         CuP="*i32", n_kv_heads="i32", row_tiles="i32", keys_per_split="i32", scale_log2="fp32",
                         **{s: "i32" for s in strides})
            const = dict(G=4, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n,
                         IEEE=dtype == "fp32")
            divisible = [s for s in strides if s != "stride_lm"] + ["keys_per_split"]
            out.append(_case(f"decode/{dtype}/out_{out_dtype}/D{d}/M{block_m}", decode._prefix_decode_kernel, types,
                             const, warps, divisible, dtype=dtype, tile=[block_m, block_n]))
        for dtype in ("bf16",) + (("fp32",) if d == 256 else ()):
            for has_rows in (False, True):  # the prefix kernel's merge; the cascade's, by slot (Rows)
                md = dict(PartOut="*fp32", PartLse="*fp32", Out="*" + dtype, Lse="*fp32", Rows="*i64", M="i32",
                          n_splits="i32", n_slots="i32", stride_ps="i32", stride_pm="i32", stride_ph="i32",
                          stride_ls="i32", stride_lh="i32", stride_om="i32", stride_oh="i32", stride_oh2="i32")
                const = dict(HEAD_DIM=d, BLOCK_M=decode.merge_block_m(d), BLOCK_D=max(16, triton.next_power_of_2(d)),
                             HAS_ROWS=has_rows)
                divisible = ("stride_ps", "stride_pm", "stride_ph", "stride_om", "stride_oh")
                out.append(_case(f"decode_merge/{dtype}/D{d}{'/rows' if has_rows else ''}", decode._merge_splits_kernel,
                                 md, const, 4, divisible, dtype=dtype, tile=[const["BLOCK_M"], const["BLOCK_D"]]))
    return out


def cascade_cases():
    """Cascade decode: every BLOCK_M `decode.cascade_tile_config` picks (16, 32; 16 at head dim 256) for head dims
    64, 128, 256 in bfloat16 with G = 4 (float32 partials, as when the keys are split; one split writes q's dtype
    at the largest tile), G = 1 at the largest tile (SPT = 32: the widest ownership tile),
    float16 at the largest tile. Not float32: it spills (16 x 16 IEEE tiles: 8-52 B at head dim 64, 472-480 B at
    128, ~1.9 KB at 256, Triton 3.9) and the sampler does not launch it on a GPU (`decode.cascade_compiles_clean`).
    The lse strides of a real launch are the number of slots (any value): not marked divisible."""
    out = []
    strides = ["stride_qm", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_kss", "stride_kst",
               "stride_ksh", "stride_vss", "stride_vst", "stride_vsh", "stride_knm", "stride_knh", "stride_vnm",
               "stride_vnh", "stride_os", "stride_om", "stride_oh", "stride_ls", "stride_lh", "stride_lm"]
    for d in HEAD_DIMS:
        top = 16 if d == 256 else 32  # cascade_tile_config's largest BLOCK_M
        combos = [(16, 4, "bf16", "fp32"), (top, 4, "bf16", "fp32"), (top, 4, "bf16", "bf16"), (top, 1, "bf16", "fp32"),
                  (top, 4, "fp16", "fp32")]  # float32: never launched on a GPU (decode.cascade_compiles_clean)
        for rows, g, dtype, out_dtype in dict.fromkeys(combos):
            block_m, block_n, warps = decode.cascade_tile_config(rows, d, ELEM[dtype])
            spt = decode.samples_per_tile(block_m, g)
            types = dict(Q="*" + dtype, K="*" + dtype, V="*" + dtype, KS="*" + dtype, VS="*" + dtype, KNew="*" + dtype,
                         VNew="*" + dtype, OUT="*" + out_dtype, LSE="*fp32", Rows="*i64", Write="*i64", CuQ="*i32",
                         CuP="*i32", n_slots="i32", n_kv_heads="i32", row_tiles="i32", keys_per_split="i32",
                         scale_log2="fp32", **{s: "i32" for s in strides})
            const = dict(G=g, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n,
                         SPT=spt, SUFFIX_N=block_n, PARTIAL=out_dtype == "fp32", IEEE=False)
            divisible = [s for s in strides if s not in ("stride_ls", "stride_lh", "stride_lm")] + ["keys_per_split"]
            out.append(_case(f"cascade/{dtype}/out_{out_dtype}/D{d}/M{block_m}/G{g}", decode._cascade_decode_kernel,
                             types, const, warps, divisible, dtype=dtype, tile=[block_m, block_n], spt=spt))
    return out


def ring_merge_cases():
    """The ring step's merge: float32 accumulators, the incoming partial in bfloat16 (float32 at head dim 256)."""
    out = []
    for d in HEAD_DIMS:
        block_t = 16 if d > 64 else 32  # ring_merge._merge_triton's rule
        for dtype in ("bf16",) + (("fp32",) if d == 256 else ()):
            types = dict(Out="*fp32", Lse="*fp32", OutB="*" + dtype, LseB="*fp32", T="i32", stride_ot="i32",
                         stride_oh="i32", stride_bt="i32", stride_bh="i32", stride_lh="i32", stride_lbh="i32")
            const = dict(HEAD_DIM=d, BLOCK_T=block_t, BLOCK_D=max(16, triton.next_power_of_2(d)))
            divisible = ("stride_ot", "stride_oh", "stride_bt", "stride_bh")
            out.append(_case(f"ring_merge/{dtype}/D{d}", ring_merge._merge_kernel, types, const, 4, divisible,
                             dtype=dtype, tile=[block_t, const["BLOCK_D"]]))
    return out


def cases():
    """Every case of every non-attention kernel (see the module docstring)."""
    return loss_row_cases() + mbr_cases() + decode_cases() + cascade_cases() + ring_merge_cases()


def compile_all(case_list=None, archs=ARCHS):
    """compile_stats of every case for every arch -> JSON-able rows (the case's labels, the arch, the stats)."""
    from bench.aot import compile_many

    jobs, labels = [], []
    for case in case_list if case_list is not None else cases():
        options = {k: case[k] for k in ("num_warps", "num_stages", "divisible_ints")}
        label = {k: v for k, v in case.items() if k not in ("fn", "arg_types", "constexprs") and k not in options}
        for arch in archs:
            jobs.append((case["fn"], case["arg_types"], case["constexprs"], dict(options, arch=arch)))
            labels.append(dict(label, constexprs=dict(case["constexprs"])))
    return [dict(label, **stats, constexprs=label["constexprs"]) for label, stats in zip(labels, compile_many(jobs))]


def problems(rows):
    """Rows that spill registers or request more shared memory than the architecture allows."""
    return [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["shared"] > r["shared_limit"]]


def main(argv=None):
    rows = compile_all()
    bad = problems(rows)
    date = datetime.date.today().isoformat()
    path = os.path.join(os.path.dirname(__file__), "results", f"compile_kernels_{triton.__version__}_{date}.json")
    result = {"name": "compile_kernels", "triton": triton.__version__, "date": date, "archs": list(ARCHS),
              "cases": len(rows), "problems": [r["name"] + f" sm_{r['arch']}" for r in bad],
              "max_registers": max(r["registers"] for r in rows), "rows": rows}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)
    for r in rows:
        print(f"{r['name']:40s} sm_{r['arch']}  regs {r['registers']:3d}  spills {r['spill_stores']}/{r['spill_loads']}"
              f"  shared {r['shared']:6d} / {r['shared_limit']}")
    print(f"{len(rows)} compiles, {len(bad)} problems; wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
