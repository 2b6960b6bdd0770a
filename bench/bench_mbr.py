"""MBR scores: ours (Triton), ours (CUDA C++, when built) and the torch eager baseline side by side.

    python -m bench.bench_mbr            # the GPU if there is one, else a small interpreted CPU run

Bytes moved (the floor): B·N·D·sizeof(dtype) read + B·N·4 written (no mask). Effective bandwidth = bytes /
median time, reported against the device's measured copy bandwidth (read + write bytes of a 1 GiB copy).
The eager baseline is `sealong_kernels.reference.mbr_scores` (the test oracle): upcast, normalize, bmm into a
[B, N, N] matrix, mask the diagonal and invalid pairs, row mean. FLOPs are not the limit: ours does 4·B·N·D
(two passes of multiply-adds), the baseline 2·B·N²·D.
"""

import sys

import torch

import sealong_kernels as sk
from bench.common import copy_bandwidth_gbs, cpu_note, device_name, is_oom, time_ms
from sealong_kernels import reference

GPU_SHAPES = [(4096, 32, 1024), (4096, 256, 1024)]
CPU_SHAPES = [(64, 32, 128), (8, 256, 64)]


def _impls(device):
    impls = {"eager (torch)": lambda e: reference.mbr_scores(e), "ours (Triton)": lambda e: sk.mbr_scores(e, backend="triton")}
    if str(device).startswith("cuda") and sk.mbr.cuda_extension() is not None:
        impls["ours (CUDA)"] = lambda e: sk.mbr_scores(e, backend="cuda")
    return impls


def run(device: str, small: bool) -> dict:
    shapes = CPU_SHAPES if small else GPU_SHAPES
    dtypes = [torch.float32] if small else [torch.float32, torch.bfloat16]
    repeat = 3 if small else 30
    copy_gbs = copy_bandwidth_gbs(device)
    impls = _impls(device)
    rows, summary = [], []
    for b, n, d in shapes:
        for dtype in dtypes:
            emb = torch.randn(b, n, d, device=device).to(dtype)
            nbytes = emb.numel() * emb.element_size() + b * n * 4
            want = reference.mbr_scores(emb)
            times = {}
            for name, fn in impls.items():
                try:
                    err = (fn(emb).double() - want.double()).abs().max().item()
                    ms = time_ms(lambda: fn(emb), device, warmup=1 if small else 5, repeat=repeat)
                except Exception as exc:  # an OOM of the eager baseline at large N is a result, not a crash
                    if not is_oom(exc):
                        raise
                    rows.append({"B": b, "N": n, "D": d, "dtype": str(dtype)[6:], "impl": name, "ms": None, "note": "OOM"})
                    continue
                times[name] = ms
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append({"B": b, "N": n, "D": d, "dtype": str(dtype)[6:], "impl": name, "ms": ms,
                             "GB/s": gbs, "% copy BW": 100 * gbs / copy_gbs, "max |diff|": err})
            base = times.get("eager (torch)")
            for row in rows[-len(times):]:
                if base and row.get("ms"):
                    row["x eager"] = base / row["ms"]
            best = min((k for k in times if k.startswith("ours")), key=times.get)
            summary.append({"shape": f"{b}x{n}x{d} {str(dtype)[6:]}", "best": best, "ms": times[best],
                            "% copy BW": rows[-len(times) + list(times).index(best)]["% copy BW"],
                            "x eager": base / times[best] if base else None})
            del emb, want
    notes = [f"device: {device_name(device)}; measured copy bandwidth {copy_gbs:.1f} GB/s (read + write)",
             "bytes = B*N*D*sizeof(dtype) + B*N*4; GB/s = bytes / median time; goal on an H100: >= 80% of copy "
             "bandwidth and >= 3x eager",
             "ours (CUDA) appears only when sealong_kernels._C is built (python -m sealong_kernels.cuda_build)"]
    return {"name": "mbr", "rows": rows, "summary": summary, "notes": notes + cpu_note(device)}


if __name__ == "__main__":
    from bench.run_all import main

    sys.exit(main(["--only", "mbr"]))
