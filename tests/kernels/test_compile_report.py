"""The attention kernels as a real launch compiles them for sm_90 and sm_80 (16-byte aligned pointers and strides;
lengths multiples of 16 or not), read from the `ptxas -v` log of Triton's own ptxas call, the TTGIR / PTX and the
SASS (nvdisasm: where local memory is touched), without a GPU.

* The committed compile reports (bench/results/compile_<date>_triton-<v>.json, from `python -m bench.compile_report`
  under Triton 3.6 and 3.9) hold every tile `launchable_tiles` returns at head dims 64 / 128 / 256 (bf16, fp16 and
  the float32 entries), at head dims 64 / 128 also with lengths not multiples of 16, in every flag set the
  launchers use (the ring's included): spill-free at 64 / 128, within the documented bound at 256 (BOUNDED),
  within 227 KB (sm_90) / 163 KB (sm_80), every main loop (the listed loops of the
  block plan included) pipelined with >= 3 buffers.
* The ring's accumulating variants (ACCUMULATE: the forward merges into float32 out / lse in its epilogue, the
  backward adds into the given gradients) are in the same reports, every launchable tile in the ring's flag sets:
  as clean as their non-accumulating twins and pipelined with the same buffers and stages.
* A live compile, in a subprocess (this session interprets Triton), of a small subset under this machine's Triton
  (`bench.compile_report.ci_cases`, 8 compiles, the ring forward's epilogue among them).
* The other kernels' compile cases use the num_stages their launchers run with (Triton's default).
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from sealong_kernels.attention_tiles import ARCHS, BOUNDED, KINDS, launchable_tiles

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "bench", "results")
KERNEL = {"fwd": "_attn_fwd_kernel", "dq": "_attn_bwd_dq_kernel", "dkdv": "_attn_bwd_dkdv_kernel"}
LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def latest_reports():
    """The newest full report per Triton version."""
    latest = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "compile_*_triton-*.json"))):
        if "_candidates_" not in path:
            latest[path.rsplit("_triton-", 1)[1][: -len(".json")]] = path
    return latest


def test_spills_only_at_head_dim_256():
    """Head dim 256 may spill (BOUNDED); at 64 and 128 every entry has a clean tile. dK/dV at 128 on sm_90 had none
    before (16, 32, 4, 4) gave way to (32, 32, 8, 4): it spilled 8-24 B under Triton 3.6 (fp16 odd lengths, the
    ring's flag set), outside its loops."""
    assert all(key[2] == 256 for key in BOUNDED), BOUNDED


def _index(records):
    index = {}
    for r in records:
        key = (r["kernel"], r["arch"], r.get("head_dim"), r.get("dtype"), tuple(r.get("tile", ())), r.get("aligned_lengths", True))
        index.setdefault(key, []).append(r)
    return index


def _reports():
    reports = latest_reports()
    assert {v.rsplit(".", 1)[0] for v in reports} >= {"3.6", "3.9"}, sorted(reports)
    return {version: json.load(open(path))["records"] for version, path in reports.items()}


def test_reports_of_both_tritons_cover_every_launchable_tile():
    for version, records in _reports().items():
        index = _index(records)
        for kind in KINDS:
            for arch in ARCHS:
                for d in (64, 128, 256):
                    for dtype in ("bf16", "fp16", "fp32"):
                        tiles = launchable_tiles(kind, d, dtype, arch)
                        assert tiles or dtype == "fp32", f"no launchable {kind} tile at head dim {d} on sm_{arch}"
                        for tile in tiles:
                            for aligned in (True, False) if d in (64, 128) and dtype != "fp32" else (True,):
                                found = index.get((KERNEL[kind], arch, d, dtype, tile, aligned))
                                assert found, f"{version}: {kind} sm_{arch} d={d} {dtype} {tile} aligned={aligned} not compiled"
                                # no spill-free tile: the documented bound of BOUNDED, over every flag set (the
                                # ring's accumulating variants too)
                                bound = BOUNDED.get((kind, arch, d), (None, 0))[1] if dtype != "fp32" else 0
                                for r in found:
                                    spill = max(r["spill_stores"], r["spill_loads"]) if "error" not in r else None
                                    assert spill is not None and spill <= bound, r
                                    assert r["shared"] <= LIMIT[arch], r
                                    assert r["num_stages"] == tile[3], r


def test_every_attention_main_loop_is_pipelined_three_deep():
    """Every main loop of every compiled attention kernel (range loops and the block plan's listed loops) has >= 3
    copy buffers in the TTGIR; the plan path has its two listed loops (full and partial blocks) per kernel."""
    for version, records in _reports().items():
        for r in records:
            if r.get("kind") not in KERNEL:
                continue
            assert r["loops"], r
            assert min(loop["buffers"] for loop in r["loops"]) >= 3, (version, r["kernel"], r["arch"], r["tile"], r["loops"])
            if r["has_plan"]:
                assert len(r["loops"]) == 2, r["loops"]


def test_dkdv_has_no_narrow_wgmma_at_head_dims_64_and_128():
    """No m64n16k16 in the launched dK/dV kernels (shared-memory bound: a quarter of the tensor cores' peak).
    At head dim 64 the sm_90 tile keeps 128 keys and runs wgmma; at 128 every wgmma tile spills in some flag set
    (the candidate and full reports), so the chosen tile runs mma.sync (no wgmma at all)."""
    for version, records in _reports().items():
        for r in records:
            if r.get("kind") == "dkdv" and r["arch"] == 90 and r["head_dim"] in (64, 128) and r["dtype"] != "fp32":
                assert "m64n16k16" not in r["wgmma"], (version, r["head_dim"], r["tile"], r["wgmma"])
                if r["head_dim"] == 64:
                    assert r["wgmma"] and r["tile"][1] == 128, (version, r["tile"], r["wgmma"])


def test_ring_accumulating_variants_are_clean_and_pipelined_like_their_twins():
    """Every launchable tile of every kernel in the ring's flag sets (RING_COMBOS) compiled with ACCUMULATE under
    both Tritons, beside its twin (the non-accumulating compile of the same kernel, arch, head dim, dtype, tile and
    flags): the launched num_stages, the twin's main-loop buffers, within the shared-memory limit, and at head dims
    64 / 128 0 spills wherever the twin has none (the earlier dK/dV tile (16, 32, 4, 4) at head dim 128 on sm_90
    spilled 16 B in the ring's flag set and 24 B accumulating, under Triton 3.6). At head dim 256, where dK/dV
    compiles spill (BOUNDED), the accumulating epilogue adds at most 32 B (measured: 8-16 B)."""
    from bench.compile_report import RING_COMBOS

    for version, records in _reports().items():
        plain, acc = {}, {}
        for r in records:
            if r.get("kind") in KERNEL and r.get("aligned_lengths", True):
                key = (r["kernel"], r["arch"], r["head_dim"], r["dtype"], tuple(r["tile"]), r["causal"], r["has_seq"],
                       r["has_seg"])
                (acc if r.get("accumulate") else plain)[key] = r
        for kind in KINDS:
            for arch in ARCHS:
                for d in (64, 128, 256):
                    for dtype, flags in RING_COMBOS:
                        for tile in launchable_tiles(kind, d, dtype, arch):
                            key = (KERNEL[kind], arch, d, dtype, tile, *flags)
                            r, twin = acc.get(key), plain.get(key)
                            assert r and twin, f"{version}: ring {kind} sm_{arch} d={d} {dtype} {tile} not compiled"
                            assert "error" not in r and r["shared"] <= LIMIT[arch], (version, r)
                            assert r["num_stages"] == twin["num_stages"] == tile[3], (version, r)
                            assert [lp["buffers"] for lp in r["loops"]] == [lp["buffers"] for lp in twin["loops"]], \
                                (version, key, r["loops"], twin["loops"])
                            spill, twin_spill = (max(x["spill_stores"], x["spill_loads"]) for x in (r, twin))
                            extra = 32 if d == 256 else (8 if twin_spill else 0)
                            assert spill <= twin_spill + extra, (version, key, spill, twin_spill)


def test_cost_model_prefers_wide_wgmma_resident_rows_and_occupancy():
    from sealong_kernels.attention_tiles import cost_model

    wide = cost_model("dkdv", 90, (32, 128, 8, 3), 220, 58368, {"m64n32k16": 16, "m64n64k16": 8})
    narrow = cost_model("dkdv", 90, (32, 64, 8, 3), 251, 83456, {"m64n16k16": 64, "m64n64k16": 8})
    assert (wide["mma"], wide["reuse"], narrow["mma"], narrow["reuse"]) == (0.5, 1.0, 0.25, 0.5)
    assert wide["score"] > narrow["score"]
    assert cost_model("fwd", 80, (128, 64, 8, 4), 255, 132608, {})["occupancy"] == 1.0  # one block of 8 warps
    assert cost_model("fwd", 90, (64, 32, 4, 3), 255, 131584, {})["occupancy"] == 0.5  # 4 warps, shared: 1 block


def test_other_kernels_are_reported_at_the_stages_they_launch_with():
    """decode, ORPO-row, MBR and merge kernels are launched without num_stages (Triton's default); their compile
    cases use that default."""
    import inspect

    from triton.backends.nvidia.compiler import CUDAOptions

    from bench import compile_cases_kernels as C
    from sealong_kernels import decode, mbr, orpo, ring_merge

    for module in (decode, mbr, orpo, ring_merge):
        assert "num_stages" not in inspect.getsource(module), module.__name__
    assert {c["num_stages"] for c in C.cases()} == {CUDAOptions.num_stages}
    for path in newest_kernel_reports().values():
        rows = json.load(open(path))["rows"]
        assert {r["num_stages"] for r in rows} == {CUDAOptions.num_stages}, path


def newest_kernel_reports():
    """{Triton version: path} of the newest bench/results/compile_kernels_<triton>_<date>.json per version."""
    newest = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "compile_kernels_*_*.json"))):
        newest[os.path.basename(path).split("_")[2]] = path
    assert {v.rsplit(".", 1)[0] for v in newest} >= {"3.6", "3.9"}, sorted(newest)
    return newest


def test_committed_kernel_reports_of_both_tritons_are_clean():
    """The newest committed report of each Triton (`python -m bench.compile_cases_kernels` under 3.6, the GPU
    machines', and 3.9, this machine's) has no spill and no shared memory over the limit: the live compile
    (test_compile_cases_kernels.py) runs this machine's Triton only, and Triton 3.6 allocates registers differently
    (the cascade tiles chosen under 3.9 spilled 8-28 B under 3.6)."""
    for version, path in newest_kernel_reports().items():
        report = json.load(open(path))
        assert report["problems"] == [], (version, report["problems"])
        assert {r["kernel"] for r in report["rows"]} >= {"_cascade_decode_kernel", "_prefix_decode_kernel"}, version


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile and run the real thing")
def test_live_compile_of_the_ci_subset():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "bench.compile_report", "--ci", "--quiet"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from bench.compile_report import violations

    records = json.loads(proc.stdout.split("RECORDS", 1)[1])
    assert len(records) == 8 and {r["arch"] for r in records} == {90}
    assert sum(bool(r.get("accumulate")) for r in records) == 1
    assert any(not r.get("aligned_lengths", True) for r in records)  # odd lengths / offsets compiled too
    assert violations(records) == []
    for r in records:
        if r.get("kind") in KERNEL:
            assert min(loop["buffers"] for loop in r["loops"]) >= 3, r
