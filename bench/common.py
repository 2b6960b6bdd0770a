"""Shared measuring tools for bench/: timing with device events, the device's own copy bandwidth and matmul
peak (measured in the same run, so ratios compare like with like), peak memory, and the results writer.

Every benchmark module exposes `run(device: str, small: bool) -> dict` with at least
`{"name": ..., "rows": [dict, ...], "notes": [str, ...]}`; `bench.run_all` calls each and writes
`bench/results/<name>_<device-slug>_<date>.json`. On a CPU the benchmarks run small and say that their
times mean nothing for GPUs; byte and FLOP counts stay exact.
"""

import datetime
import json
import os
import platform
import re
import statistics
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def device_name(device):
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def device_slug(device):
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()[:40]


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup=3, repeat=20):
    """Median wall time of fn() in milliseconds: CUDA events on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if str(device).startswith("cuda"):
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device, nbytes=None):
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    nbytes = nbytes or (1 << 30 if str(device).startswith("cuda") else 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeat=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_peak_tflops(device, dtype=torch.bfloat16, n=None):
    """Measured dense matmul throughput (n x n x n) in TFLOP/s for `dtype` on `device`."""
    n = n or (8192 if str(device).startswith("cuda") else 512)
    if not str(device).startswith("cuda") and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, repeat=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def peak_memory_bytes(fn, device):
    """Peak bytes allocated on a CUDA device above what was allocated before fn() ran (None on CPU)."""
    if not str(device).startswith("cuda"):
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def is_oom(err):
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def cpu_note(device):
    if str(device).startswith("cuda"):
        return []
    return ["ran small on a CPU (Triton interpreted): the times mean nothing for GPUs; counts are exact"]


def write_results(result, device):
    """Write one benchmark's result dict to bench/results/ atomically; return the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    date = datetime.date.today().isoformat()
    result = dict(result, device=device_name(device), date=date, torch=torch.__version__)
    path = os.path.join(RESULTS_DIR, f"{result['name']}_{device_slug(device)}_{date}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)
    return path


def format_rows(rows):
    """A plain fixed-width table of a list of dicts (the union of their keys, in first-seen order)."""
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
