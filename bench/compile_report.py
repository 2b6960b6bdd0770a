"""Compile report: every attention kernel compiled ahead of time for sm_90 and sm_80 as a real launch would
(16-byte aligned pointers and strides; lengths and offsets marked multiples of 16, and at head dims 64 / 128 also
not), every tile the launcher can choose at the num_stages it launches with, head dims 64 / 128 / 256, bfloat16,
float16 and float32; per compile `ptxas -v` registers, spill stores / loads and stack, the shared memory it
requests (`metadata.shared`), the buffers and async waits of every main loop (TTGIR), the wgmma shapes (PTX) and
the tile's `attention_tiles.cost_model` score. No GPU needed (bench/aot.py).

    TRITON_INTERPRET=0 python -m bench.compile_report                 # -> bench/results/compile_<date>_triton-<v>.json
    TRITON_INTERPRET=0 python -m bench.compile_report --candidates    # every candidate tile (all flags on)
    TRITON_INTERPRET=0 python -m bench.compile_report --fresh         # recompile all (else today's records are kept)
    python -m bench.compile_report --table                            # TILES / SHARED literals from candidate files

Cases come from providers: functions returning case dicts

    dict(fn=<@triton.jit>, arg_types={name: "*bf16" | "*fp32" | "*i32" | "i32" | "fp32"}, constexprs={...},
         num_warps=4, num_stages=3, divisible_ints=(names,), labels={...}, archs=(90, 80))

(`archs` optional, default both). `PROVIDERS` lists the attention cases; `--all-kernels` adds the other kernels'
cases (bench/compile_cases_kernels.py, which also writes its own report, bench/results/compile_kernels_*.json).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
HEAD_DIMS = (64, 128, 256)
DTYPES = ("bf16", "fp16")
# (dtype, (CAUSAL, HAS_SEQ, HAS_SEG)) per launchable tile: packed preference pairs in training (the block-class
# plan path) in bfloat16, a plain causal call (the key-range path) in float16; both dtypes and both code paths
COMBOS = (("bf16", (True, True, True)), ("fp16", (True, False, False)))
FP32_NAMES = {"Lse", "Delta", "DK", "DV", "DQ"}
I32_NAMES = {"SeqIdx", "CuSeqlens", "QSeg", "KSeg", "Blocks"}
# a long call's lengths and offsets are multiples of 16 (stride_lh: the forward's LSE row stride, Tq, or a ring
# accumulator's T_local)
LEN_NAMES = ("Tq", "Tk", "q_start", "k_start", "stride_lh")
# (dtype, (CAUSAL, HAS_SEQ, HAS_SEG)) of the ring's accumulating calls (ACCUMULATE: merged into float32 out / lse,
# gradients added in place): packed preference pairs (segments, the plan path) and a plain causal ring
RING_COMBOS = (("bf16", (True, False, True)), ("fp16", (True, False, False)))
UNALIGNED_DIMS = (64, 128)  # head dims also compiled with lengths / offsets not multiples of 16 (odd T, ring blocks)


def _attention_arg_types(fn, dtype):
    """Triton types of an attention kernel's arguments: 16-bit Q/K/V/O/dO, float32 LSE / delta / gradients."""
    types = {}
    for name in fn.arg_names:
        if name in FP32_NAMES:
            types[name] = "*fp32"
        elif name in I32_NAMES:
            types[name] = "*i32"
        elif name in ("Q", "K", "V", "Out", "DOut"):
            types[name] = "*" + dtype
        elif name in ("qk_scale", "sm_scale"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def attention_case(kind, head_dim, dtype, tile, flags, arch, aligned_lengths=True, accumulate=False):
    """One case for the forward ("fwd"), dQ ("dq") or dK/dV ("dkdv") kernel with this tile and flag set
    (aligned_lengths=False: Tq, Tk, q_start, k_start not multiples of 16, as odd lengths and ring blocks;
    accumulate: the ring's ACCUMULATE variant, the forward's Out a float32 accumulator)."""
    from sealong_kernels import attention_kernels as K
    from sealong_kernels.attention import PLAN_BLOCK
    from sealong_kernels.attention_tiles import block_d_of

    fn = {"fwd": K._attn_fwd_kernel, "dq": K._attn_bwd_dq_kernel, "dkdv": K._attn_bwd_dkdv_kernel}[kind]
    bm, bn, warps, stages = tile
    causal, seq, seg = flags
    block_d = block_d_of(head_dim)
    # the launcher plans block classes (HAS_PLAN) whenever packed sequences or segments are on
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_SEQ=seq,
                  HAS_SEG=seg, PRECISION="ieee" if dtype == "fp32" else "tf32", HAS_PLAN=seq or seg, PLAN_M=PLAN_BLOCK, PLAN_N=PLAN_BLOCK)
    divisible = tuple(n for n in fn.arg_names if (n.startswith("stride") and n not in LEN_NAMES)
                      or (aligned_lengths and n in LEN_NAMES))
    arg_types = _attention_arg_types(fn, dtype)
    labels = dict(kind=kind, head_dim=head_dim, block_d=block_d, dtype=dtype, tile=list(tile), causal=causal,
                  has_seq=seq, has_seg=seg, has_plan=seq or seg, aligned_lengths=aligned_lengths)
    consts["ACCUMULATE"] = accumulate
    if accumulate:
        labels["accumulate"] = True
        if kind == "fwd":
            arg_types["Out"] = "*fp32"
    return dict(fn=fn, arg_types=arg_types, constexprs=consts, num_warps=warps,
                num_stages=stages, divisible_ints=divisible, archs=(arch,), labels=labels)


def _small_kernel_cases():
    """The backward preprocess (delta) and the ring merge, as `attention_backward` / `merge_partials_` launch them."""
    from sealong_kernels import attention_kernels as K
    from sealong_kernels.ring_merge import _merge_kernel

    cases = []
    for d in HEAD_DIMS:
        for dtype in DTYPES:
            fn = K._attn_bwd_delta_kernel
            consts = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=64)
            cases.append(dict(fn=fn, arg_types=_attention_arg_types(fn, dtype), constexprs=consts, num_warps=4,
                              num_stages=3, divisible_ints=tuple(n for n in fn.arg_names if n.startswith("stride") or n == "T"),
                              labels=dict(kind="delta", head_dim=d, dtype=dtype, tile=[64, d, 4, 3])))
            block_t = 16 if d > 64 else 32
            types = dict(Out="*fp32", Lse="*fp32", OutB="*" + dtype, LseB="*fp32")
            arg_types = {n: types.get(n, "i32") for n in _merge_kernel.arg_names if n not in ("HEAD_DIM", "BLOCK_T", "BLOCK_D")}
            cases.append(dict(fn=_merge_kernel, arg_types=arg_types,
                              constexprs=dict(HEAD_DIM=d, BLOCK_T=block_t, BLOCK_D=d), num_warps=4, num_stages=3,
                              divisible_ints=tuple(n for n in arg_types if n.startswith("stride") or n == "T"),
                              labels=dict(kind="ring_merge", head_dim=d, dtype=dtype, tile=[block_t, d, 4, 3])))
    return cases


def attention_cases(head_dims=HEAD_DIMS, combos=COMBOS, kinds=None, archs=None, first_only=False,
                    unaligned_dims=UNALIGNED_DIMS, fp32=True):
    """Every tile `launchable_tiles` can return, per kernel, head dim, arch and COMBOS entry, with aligned lengths
    and (head dims in unaligned_dims) with lengths / offsets that are not multiples of 16; the float32 tiles in
    both COMBOS flag sets; plus delta and merge (first_only: the first tile per kernel, head dim and arch; kinds /
    archs: a subset)."""
    from sealong_kernels.attention_tiles import ARCHS, KINDS, launchable_tiles

    cases = []
    for kind in kinds or KINDS:
        for arch in archs or ARCHS:
            for d in head_dims:
                runs = [(dtype, flags, True) for dtype, flags in combos]
                runs += [(dtype, flags, False) for dtype, flags in combos if d in unaligned_dims]
                runs += [("fp32", flags, True) for _, flags in combos] if fp32 else []
                for dtype, flags, aligned in runs:
                    tiles = launchable_tiles(kind, d, dtype, arch)
                    cases += [attention_case(kind, d, dtype, tile, flags, arch, aligned)
                              for tile in tiles[:1 if first_only else None]]
    return cases + (_small_kernel_cases() if kinds is None else [])


def ring_cases(head_dims=HEAD_DIMS, combos=RING_COMBOS, kinds=None, archs=None, twins=True):
    """The ring's accumulating variants (`attention_forward(..., accumulate=)` / `attention_backward(...,
    accumulate=)`): every launchable tile per kernel, head dim, arch and RING_COMBOS entry, lengths multiples of 16
    (ring blocks of a real launch: T_local / 2 and its offsets); twins: also the non-accumulating compile of the
    same flags (segments without packed sequences is not a COMBOS flag set), to compare with."""
    from sealong_kernels.attention_tiles import ARCHS, KINDS, launchable_tiles

    return [attention_case(kind, d, dtype, tile, flags, arch, True, accumulate=acc)
            for kind in kinds or KINDS for arch in archs or ARCHS for d in head_dims for dtype, flags in combos
            for tile in launchable_tiles(kind, d, dtype, arch) for acc in ((True, False) if twins else (True,))
            if acc or flags not in [f for _, f in COMBOS]]


def ci_cases():
    """The subset the CPU test compiles live (a dozen compiles): the first launchable tile of every kernel at head
    dim 128 for sm_90 (training flags, bf16), the dK/dV kernel also with lengths not multiples of 16 (fp16, the
    plain causal path) and at head dim 64, and the delta / merge kernels at 128."""
    cases = attention_cases((128,), COMBOS[:1], kinds=("fwd", "dq", "dkdv"), archs=(90,), first_only=True,
                            unaligned_dims=(), fp32=False)
    cases += attention_cases((64,), COMBOS[:1], kinds=("dkdv",), archs=(90,), first_only=True, unaligned_dims=(),
                             fp32=False)
    cases += [c for c in attention_cases((128,), COMBOS[1:], kinds=("dkdv",), archs=(90,), first_only=True, fp32=False)
              if not c["labels"]["aligned_lengths"]]
    cases += ring_cases((128,), RING_COMBOS[:1], kinds=("fwd",), archs=(90,), twins=False)  # the ring's epilogue
    small = [c for c in _small_kernel_cases() if c["labels"]["head_dim"] == 128 and c["labels"]["dtype"] == "bf16"]
    return cases + [dict(c, archs=(90,)) for c in small]


def candidate_cases(head_dims=HEAD_DIMS):
    """Every CANDIDATES tile at bf16 and every FP32_CANDIDATES tile at fp32, with all visibility flags on (the most
    code), for building the tile table."""
    from sealong_kernels.attention_tiles import CANDIDATES, FP32_CANDIDATES, FP32_HEAD_DIMS

    return [attention_case(kind, d, dtype, tile, (True, True, True), arch)
            for dtype, table, dims in (("bf16", CANDIDATES, head_dims), ("fp32", FP32_CANDIDATES, FP32_HEAD_DIMS))
            for (kind, arch), tiles in table.items() for d in dims for tile in tiles]


PROVIDERS = [attention_cases, ring_cases]


def providers():
    """PROVIDERS (the attention kernels, here) and the other kernels' cases (bench/compile_cases_kernels.py)."""
    from bench import compile_cases_kernels

    return [*PROVIDERS, compile_cases_kernels.cases]


def compile_case(case, arch):
    """compile_stats of one case for one arch, with the case's labels; a failed compile is recorded, not raised."""
    from bench.aot import compile_stats

    record = dict(case.get("labels", {}), kernel=case["fn"].__name__, arch=arch)
    try:
        record.update(compile_stats(case["fn"], case["arg_types"], case["constexprs"], arch=arch,
                                    num_warps=case.get("num_warps", 4), num_stages=case.get("num_stages", 2),
                                    divisible_ints=tuple(case.get("divisible_ints", ())),
                                    unaligned=tuple(case.get("unaligned", ()))))
    except Exception as err:  # noqa: BLE001 -- an out-of-resources or lowering error is a result of the report
        record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return record


def run_cases(cases, log=None):
    from bench.aot import fork_map

    jobs = [(i, case, arch) for i, case in enumerate(cases) for arch in case.get("archs", (90, 80))]
    records = fork_map(lambda job: compile_case(job[1], job[2]), jobs)  # one compile per core at a time
    for (i, case, arch), r in zip(jobs, records):
        if r.get("kind") in ("fwd", "dq", "dkdv") and "error" not in r:
            r["cost"] = cost(r)
        if log:
            print(f"[{i + 1}/{len(cases)}] {r['kernel']} sm_{arch} {r.get('head_dim')} {r.get('dtype')} {r.get('tile')}: "
                  f"{r.get('error') or ''}regs {r.get('registers')} spills {r.get('spill_stores')}/{r.get('spill_loads')} "
                  f"shared {r.get('shared')}", file=log, flush=True)
    return records


def write_report(records, tag=""):
    """bench/results/compile_<date>[_<tag>]_triton-<version>.json, atomically; returns the path."""
    import triton

    date = datetime.date.today().isoformat()
    name = f"compile_{date}{'_' + tag if tag else ''}_triton-{triton.__version__}.json"
    path = os.path.join(RESULTS_DIR, name)
    body = dict(name="compile", triton=triton.__version__, date=date, command=" ".join(["python -m bench.compile_report", *sys.argv[1:]]),
                records=records)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
    os.replace(tmp, path)
    return path


def clean(record):
    return "error" not in record and record["spill_stores"] == 0 and record["spill_loads"] == 0 \
        and record["shared"] <= record["shared_limit"]


def violations(records):
    """The records that spill, fail to compile or request more shared memory than their arch allows, as text."""
    return [f"{r['kernel']} sm_{r['arch']} d={r.get('head_dim')} {r.get('dtype')} tile {r.get('tile')}: "
            f"{r.get('error') or ''}spills {r.get('spill_stores')}/{r.get('spill_loads')} B, shared {r.get('shared')} B"
            for r in records if not clean(r)]


def pipelined(record):
    """Every main loop of the compile has >= 3 buffers (`bench.aot.loop_structure`)."""
    return bool(record.get("loops")) and min(loop["buffers"] for loop in record["loops"]) >= 3


def cost(record):
    """`attention_tiles.cost_model` of an attention record (its tile, registers, shared memory, wgmma shapes)."""
    from sealong_kernels.attention_tiles import cost_model

    return cost_model(record["kind"], record["arch"], tuple(record["tile"]), record["registers"], record["shared"],
                      record.get("wgmma", {}))


def table_from(paths, reports=()):
    """TILES / SHARED / BOUNDED from candidate files of several Tritons: per (kind, arch, elem, block_d) among the
    tiles clean and pipelined in every file, the best by `cost` (its worst score over the files); where none is
    (16-bit only), the pipelined tile whose worst spill over all files is least, with that bound (BOUNDED).
    `reports` (full compile reports) add their records of the same tiles in the other flag sets and with
    unaligned lengths: a tile that spills there is not clean either. A report holds only the tiles launched when
    it was written, so tiles it showed spilling are kept out by `attention_tiles.REJECTED`."""
    from sealong_kernels.attention_tiles import CANDIDATES, FP32_CANDIDATES, MAX_TILES, REJECTED, elem_bytes_of

    ok, shared, seen, worst, score = {}, {}, {}, {}, {}
    for path in [*paths, *reports]:
        candidates = path in paths
        for r in json.load(open(path))["records"]:
            if r.get("kind") not in ("fwd", "dq", "dkdv"):
                continue
            key = (r["kind"], r["arch"], elem_bytes_of(r["dtype"]), r["block_d"], tuple(r["tile"]))
            seen[key] = seen.get(key, 0) + candidates
            ok[key] = ok.get(key, True) and clean(r) and pipelined(r)
            spill = float("inf") if "error" in r or r["shared"] > r["shared_limit"] or not pipelined(r) \
                else max(r["spill_stores"], r["spill_loads"])
            worst[key] = max(worst.get(key, 0), spill)
            if "error" not in r:
                shared[key] = max(shared.get(key, 0), r["shared"])
                score[key] = min(score.get(key, 1.0), cost(r)["score"])
    tiles, table_shared, bounded = {}, {}, {}
    for kind, arch, elem, block_d in sorted({k[:4] for k in ok}):
        cands = (CANDIDATES if elem == 2 else FP32_CANDIDATES)[(kind, arch)]
        complete = [t for t in cands if seen.get((kind, arch, elem, block_d, t)) == len(paths)
                    and (kind, arch, elem, block_d, t) not in REJECTED]
        good = sorted((t for t in complete if ok[(kind, arch, elem, block_d, t)]),
                      key=lambda t: -score[(kind, arch, elem, block_d, t)])[:MAX_TILES]  # stable: candidate order
        if not good and complete and elem == 2:
            best = min(complete, key=lambda t: worst[(kind, arch, elem, block_d, t)])
            if worst[(kind, arch, elem, block_d, best)] < float("inf"):
                good = [best]
                bounded[(kind, arch, block_d)] = (best, int(worst[(kind, arch, elem, block_d, best)]))
        if good:
            tiles.setdefault((kind, arch, elem), {})[block_d] = good
            table_shared.update({(kind, arch, block_d, elem, t): shared[(kind, arch, elem, block_d, t)] for t in good})
    return tiles, table_shared, bounded


def cost_table(records):
    """The attention records as a text table: tile, registers, spills, shared KB, loop buffers, wgmma shapes and
    the cost model (mma x reuse x occupancy = score)."""
    lines = [f"{'kernel':5} arch  d   dtype aligned tile              regs spills  shared buffers wgmma (count)   "
             "mma  reuse occ  score"]
    for r in records:
        if r.get("kind") not in ("fwd", "dq", "dkdv") or "error" in r:
            continue
        c, wg = r.get("cost") or cost(r), " ".join(f"{k}:{v}" for k, v in sorted(r.get("wgmma", {}).items()))
        lines.append(f"{r['kind']:5} sm_{r['arch']} {r['head_dim']:3} {r['dtype']:5} {str(r.get('aligned_lengths', True)):7} "
                     f"{str(tuple(r['tile'])):17} {r['registers']:4} {r['spill_stores']:3}/{r['spill_loads']:<3} "
                     f"{r['shared'] // 1024:4}K  {[l['buffers'] for l in r['loops']]!s:7} {wg or '-':15} "
                     f"{c['mma']:.2f} {c['reuse']:.2f}  {c['occupancy']:.2f} {c['score']:.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", action="store_true", help="compile every candidate tile (bf16, all flags on)")
    parser.add_argument("--table", action="store_true", help="print TILES / SHARED from the candidate result files")
    parser.add_argument("--ci", action="store_true", help="compile the CI subset only; print JSON, write nothing")
    parser.add_argument("--all-kernels", action="store_true",
                        help="also the other kernels' cases (bench/compile_cases_kernels.py; their own report and test)")
    parser.add_argument("--fresh", action="store_true",
                        help="compile every case again (by default today's report of this Triton keeps its records)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.table:
        latest = {}
        for kind in ("candidates", "full"):  # the newest candidate file and full report per Triton version
            for p in sorted(glob.glob(os.path.join(RESULTS_DIR, "compile_*_triton-*.json"))):
                if ("_candidates_" in p) == (kind == "candidates"):
                    latest[(kind, p.rsplit("_triton-", 1)[1])] = p
        tiles, shared, bounded = table_from([p for (k, _), p in latest.items() if k == "candidates"],
                                            [p for (k, _), p in latest.items() if k == "full"])
        print("# from", ", ".join(os.path.basename(p) for p in latest.values()))
        print("TILES.update(" + repr(tiles) + ")")
        print("SHARED.update(" + repr(shared) + ")")
        print("BOUNDED.update(" + repr(bounded) + ")")
        return 0
    log = None if args.quiet else sys.stderr
    if args.ci:
        records = run_cases(ci_cases(), log)
        print("RECORDS" + json.dumps(records))
        return 0
    if args.candidates:  # today's candidate file of this Triton, if any, keeps its records: only new tiles compile
        import triton

        key = lambda r: (r["kind"], r["arch"], r["dtype"], r["head_dim"], tuple(r["tile"]))  # noqa: E731
        old = os.path.join(RESULTS_DIR, f"compile_{datetime.date.today().isoformat()}_candidates_triton-{triton.__version__}.json")
        kept = {key(r): r for r in json.load(open(old))["records"]} if os.path.exists(old) and not args.fresh else {}
        cases = candidate_cases()
        new = run_cases([c for c in cases if key(dict(c["labels"], arch=c["archs"][0])) not in kept], log)
        fresh = {key(r): r for r in new}
        records = [fresh.get(k) or kept[k] for k in (key(dict(c["labels"], arch=c["archs"][0])) for c in cases)]
        path = write_report(records, "candidates")
    else:  # today's report of this Triton, if any, keeps the records of cases still launched: only new ones compile
        import triton

        def key(r):
            return (r.get("kernel"), r["arch"], r.get("kind"), r.get("dtype"), r.get("head_dim"), tuple(r.get("tile", ())),
                    r.get("causal"), r.get("has_seq"), r.get("has_seg"), r.get("aligned_lengths"), r.get("name"),
                    r.get("accumulate", False))

        old = os.path.join(RESULTS_DIR, f"compile_{datetime.date.today().isoformat()}_triton-{triton.__version__}.json")
        kept = ({key(r): r for r in json.load(open(old))["records"] if "error" not in r}
                if os.path.exists(old) and not args.fresh else {})
        cases = [dict(c, archs=(a,)) for p in (providers() if args.all_kernels else PROVIDERS) for c in p()
                 for a in c.get("archs", (90, 80))]
        ckey = [key(dict(c.get("labels", {}), kernel=c["fn"].__name__, arch=c["archs"][0])) for c in cases]
        fresh = iter(run_cases([c for c, k in zip(cases, ckey) if k not in kept], log))
        records = [kept[k] if k in kept else next(fresh) for k in ckey]
        path = write_report(records)
    bad = [r for r in records if not clean(r)]
    print(f"{path}: {len(records)} compiles, {len(bad)} with spills, errors or too much shared memory")
    print(cost_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
