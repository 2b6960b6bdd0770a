"""Before / after compiles of the ring's attention calls (ahead of time, sm_90 and sm_80, as a real launch: 16-byte
aligned pointers, strides and lengths): the kernels as they were (the ring's forward wrote a float32 partial,
merged by a separate kernel; the backward wrote fresh gradients) and the ACCUMULATE variants that merge / add into
the ring's accumulators in their epilogues, with the non-accumulating twins of the same flags. Records: registers,
spills, shared memory, main-loop buffers (bench/aot.py).

    TRITON_INTERPRET=0 PYTHONPATH=<old tree>:<old tree>/kernels python -m bench.compile_ring_compare --tag before
    TRITON_INTERPRET=0 python -m bench.compile_ring_compare --tag after
    python -m bench.compile_ring_compare --table        # both files side by side

Run from the repository root (`--tag before` imports bench / sealong_kernels from the PYTHONPATH given, e.g. a
`git archive` of the parent commit); writes bench/results/ring_compile_<tag>_triton-<version>.json (not compile_*: the compile reports' glob).
"""

import argparse
import inspect
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HEAD_DIMS = (64, 128)


def cases():
    """(name, case) pairs: every launchable tile per kernel / arch / head dim in the ring's flag sets."""
    from bench import compile_report as R
    from sealong_kernels.attention_tiles import ARCHS, KINDS, launchable_tiles

    accumulating = "accumulate" in inspect.signature(R.attention_case).parameters
    combos = (("bf16", (True, False, True)), ("fp16", (True, False, False)))
    out = []
    for kind in KINDS:
        for arch in ARCHS:
            for d in HEAD_DIMS:
                for dtype, flags in combos:
                    for tile in launchable_tiles(kind, d, dtype, arch):
                        base = R.attention_case(kind, d, dtype, tile, flags, arch)
                        if kind == "fwd":  # the ring asked for float32 partials (out_dtype), merged afterwards
                            base = dict(base, arg_types=dict(base["arg_types"], Out="*fp32"))
                        name = f"{kind}/sm_{arch}/d{d}/{dtype}/{'seg' if flags[2] else 'plain'}/{tile}"
                        out.append((name + "/plain", base))
                        if accumulating:
                            out.append((name + "/accumulate", R.attention_case(kind, d, dtype, tile, flags, arch,
                                                                                accumulate=True)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", choices=("before", "after"))
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args(argv)
    import triton

    if args.table:
        rows = {}
        for tag in ("before", "after"):
            path = os.path.join(RESULTS, f"ring_compile_{tag}_triton-{triton.__version__}.json")
            for r in json.load(open(path))["records"]:
                rows.setdefault(r["name"].rsplit("/", 1)[0], {})[(tag, r["name"].rsplit("/", 1)[1])] = r
        print(f"{'case':45} {'before (plain)':22} {'after (plain)':22} {'after (accumulate)':22}")
        for name, got in rows.items():
            cells = []
            for key in (("before", "plain"), ("after", "plain"), ("after", "accumulate")):
                r = got.get(key)
                cells.append("-" if r is None else r.get("error", "")[:20] or
                             f"{r['registers']}r {r['spill_stores']}/{r['spill_loads']}s {r['shared'] // 1024}K "
                             f"{[lp['buffers'] for lp in r['loops']]}")
            print(f"{name:45} " + " ".join(f"{c:22}" for c in cells))
        return 0
    from bench.compile_report import compile_case

    records = []
    for name, case in cases():
        r = compile_case(case, case["archs"][0])
        r["name"] = name
        records.append(r)
        print(name, r.get("error") or (r["registers"], r["spill_stores"], r["spill_loads"], r["shared"],
                                       [lp["buffers"] for lp in r["loops"]]), file=sys.stderr, flush=True)
    path = os.path.join(RESULTS, f"ring_compile_{args.tag}_triton-{triton.__version__}.json")
    with open(path, "w") as f:
        json.dump(dict(name="compile_ring", triton=triton.__version__, tag=args.tag, records=records), f, indent=1)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
