"""Fused linear ORPO loss: ours (both strategies) vs the plain-torch reference (full logits, same semantics)
vs Liger-Kernel's LigerFusedLinearORPOLoss when installed, forward + backward of one preference pair.

GPU: H=4096, V=128256, bfloat16, prompts of 4K / 16K / 32K tokens with 1K-token answers (prompt labels -100,
as SEALONG trains), with the LM head frozen (LoRA) and trained; plus the worst case of every token of a
32K-prompt pair labeled. CPU: tiny shapes, Triton interpreted (times mean nothing; the largest tensor any op
creates, in bytes, is exact).

FLOPs: work = 6 * M * H * V (M = labeled tokens; forward logits + dhidden + dweight, the issue's yardstick;
a frozen head needs 4 * M * H * V of it; the two-pass strategy adds 2 * M * H * V of recomputation).
loss_mem = peak bytes above the inputs minus the gradients' own bytes.

Counts (exact on any device): every product (aten mm / addmm / addmm_) of one forward + backward, recorded
under a TorchDispatchMode on a small problem, per chunk and per phase, with the bytes it reads and writes; and
the same plan at the GPU shapes (chunk rows from `default_chunk_size`, bytes per chunk from the shapes): the
weight gradient is one float32-accumulated product per chunk.

    python -m bench.bench_orpo            # GPU if present, else a small CPU run
"""

import sys

import torch

from bench.common import cpu_note, is_oom, matmul_peak_tflops, peak_memory_bytes, time_ms
from bench.op_counts import OpCounter
from sealong_kernels import fused_linear_orpo_loss
from sealong_kernels import reference
from sealong_kernels.orpo import default_chunk_size, loss_batch, loss_from_batch

def ProductCounter():  # noqa: N802 (the counter the tests import; bench/op_counts.py defines it)
    return OpCounter()


def count_products(strategy, train_head, chunk, m=90, h=16, v=257, bias=True, dtype=torch.float32, device="cpu",
                   pairs=3, interleave=True):
    """OpCounter of one forward + backward of the packed fused loss on m entries of `pairs` pairs (interleave:
    entry i belongs to pair i % pairs, so every pair spans the whole batch; else pair by pair). The one-pass
    path ("auto", "onepass") builds its LossBatch first, under phase "build"; the loss runs under "forward",
    its backward under "backward"."""
    hidden = torch.randn(m, h, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(v, h, dtype=dtype, device=device, requires_grad=train_head)
    b = torch.randn(v, dtype=dtype, device=device, requires_grad=train_head) if bias else None
    labels = torch.randint(0, v, (m,), device=device)
    idx = torch.arange(m, device=device)
    seq = idx % pairs if interleave else idx * pairs // m
    seg = (idx // pairs % 2 + 1) if interleave else (idx * 2 * pairs // m % 2 + 1)
    with OpCounter() as rec:
        if strategy in ("auto", "onepass"):
            rec.phase = "build"
            batch = loss_batch(hidden, weight, labels, bias=b, sequence_ids=seq, segment_ids=seg)
            rec.phase = "forward"
            loss, _ = loss_from_batch(hidden, weight, batch, bias=b, chunk_size=chunk)
        else:
            loss, _ = fused_linear_orpo_loss(hidden, weight, labels, bias=b, sequence_ids=seq, segment_ids=seg,
                                             chunk_size=chunk, strategy=strategy)
        rec.phase = "backward"
        loss.backward()
    return rec


def chunk_plan(m, h, v, elem=2, train_head=True, chunk_bytes=None, pairs=1):
    """The one-pass loss's products at M entries (`pairs` pairs of two answers of M / (2 pairs) entries each), H,
    V (elem bytes per input element): chunk rows, chunks (orpo_onepass.plan_chunks: aligned to pairs, a long
    pair in pieces inside each answer), and per full chunk the products and the bytes they read + write
    (logits, D @ W into float32, the dW addmm into the float32 accumulator, read and written once per product)."""
    from sealong_kernels.orpo_onepass import plan_chunks

    c = default_chunk_size(m, h, v, torch.bfloat16 if elem == 2 else torch.float32, chunk_bytes)
    per_seq = m // (2 * pairs)
    plan = plan_chunks([per_seq] * (2 * pairs), c)
    logits = elem * (c * h + v * h + c * v)
    dhidden = elem * (c * v + v * h) + 4 * c * h
    dw = elem * (c * v + c * h) + 2 * 4 * v * h
    per_chunk = logits + dhidden + (dw if train_head else 0)
    long_pairs = len({ch.pair0 for ch in plan if ch.piece})
    return {"M": m, "H": h, "V": v, "head": "trained" if train_head else "frozen", "chunk_rows": c,
            "chunks": len(plan), "logits_chunk_MB": c * v * elem / 1e6,
            "products_per_chunk": 3 if train_head else 2, "dW_products_per_chunk": 1 if train_head else 0,
            "product_GB_per_chunk": per_chunk / 1e9,
            "dW_product_GB_per_chunk": dw / 1e9 if train_head else None,
            "dW_TFLOP_per_chunk": 2 * c * v * h / 1e12 if train_head else None,
            "long_pairs": long_pairs,
            "fold_GB_per_long_pair": (2 * 3 * 4 * v * h) / 1e9 if train_head and long_pairs else 0.0}


def count_rows():
    """Measured (OpCounter, small float32 problem: 90 entries, chunk 16; 3 interleaved pairs of 30 entries, so
    each pair in pieces, or 15 pairs of 6 entries, two whole pairs per chunk) and planned (GPU shapes)."""
    rows = []
    for pairs in (3, 15):
        for train_head in (True, False):
            rec = count_products("auto", train_head, 16, pairs=pairs)
            chunks = sum(p[2][1:] == (257,) for p in rec.products)  # one logits product per chunk
            rows.append({"measured": "dispatch", "head": "trained" if train_head else "frozen", "pairs": pairs,
                         "chunks": chunks,
                         "fwd_products_per_chunk": rec.count("products", "forward") / chunks,
                         "bwd_products": rec.count("products", "backward"),
                         "dW_products_per_chunk": sum(p[2] == (257, 16) for p in rec.products) / chunks,
                         "host_syncs_build": rec.count("syncs", "build"),
                         "host_syncs_forward": rec.count("syncs", "forward"),
                         "host_syncs_backward": rec.count("syncs", "backward")})
    plan = [chunk_plan(m, 4096, 128256, 2, head) for m in (2 * 1024, 2 * (32768 + 1024)) for head in (True, False)]
    return rows, plan


def liger_loss():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss
    except Exception:
        return None
    module = LigerFusedLinearORPOLoss(beta=0.1)

    def run(hidden, weight, labels):
        out = module(weight, hidden, labels)
        return out[0] if isinstance(out, tuple) else out

    return run


def make_pair(prompt, answer, h, v, dtype, device, label_all=False):
    """hidden [2, prompt + answer, H] (chosen row, rejected row), weight [V, H], labels [2, prompt + answer]."""
    t = prompt + answer
    hidden = torch.randn(2, t, h, dtype=dtype, device=device)
    weight = torch.randn(v, h, dtype=dtype, device=device) * h**-0.5
    labels = torch.randint(0, v, (2, t), device=device)
    if not label_all:
        labels[:, :prompt] = -100
    return hidden, weight, labels


def largest_tensor_bytes(fn):
    """Largest tensor any op creates during fn() (CPU runs: exact, device independent)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Recorder(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Recorder.largest = max(Recorder.largest, t.numel() * t.element_size())
            return out

    with Recorder():
        fn()
    return Recorder.largest


def methods(chunk):
    ours = {s: (lambda s: lambda h, w, l: fused_linear_orpo_loss(h, w, l, chunk_size=chunk, strategy=s)[0])(s)
            for s in ("auto", "recompute")}
    out = {"ours_auto": ours["auto"], "ours_recompute": ours["recompute"],
           "torch_reference": lambda h, w, l: reference.fused_linear_orpo_loss(h, w, l)[0]}
    liger = liger_loss()
    if liger is not None:
        out["liger"] = liger
    return out


def measure(name, loss_fn, hidden, weight, labels, train_head, device, peak, repeat):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_(train_head)
    m = int((labels != -100).sum())
    h, v = weight.shape[1], weight.shape[0]

    def step():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, labels).backward()

    row = {"method": name, "tokens": labels.shape[1], "loss_tokens": m, "head": "trained" if train_head else "frozen"}
    try:
        ms = time_ms(step, device, warmup=1, repeat=repeat)
        peak_bytes = peak_memory_bytes(step, device)
    except Exception as err:
        if not is_oom(err):
            raise
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
        return dict(row, ms=None, note="out of memory")
    grad_bytes = hidden.numel() * hidden.element_size() + (weight.numel() * weight.element_size() if train_head else 0)
    flops = 6 * m * h * v
    tflops = flops / (ms * 1e-3) / 1e12
    row.update(ms=ms, tflops_6MHV=tflops, pct_of_matmul_peak=100 * tflops / peak)
    if peak_bytes is not None:
        row["loss_mem_GB"] = (peak_bytes - grad_bytes) / 1e9
    else:
        row["largest_tensor_MB"] = largest_tensor_bytes(step) / 1e6
    hidden.grad = weight.grad = None
    return row


def run(device, small):
    if small:
        h, v, dtype, answer, prompts, chunk, repeat = 48, 1001, torch.float32, 32, [64], 16, 1
    else:
        h, v, dtype, answer, prompts, chunk, repeat = 4096, 128256, torch.bfloat16, 1024, [4096, 16384, 32768], None, 5
    peak = matmul_peak_tflops(device, torch.bfloat16)
    rows = []
    cases = [(p, False, head) for p in prompts for head in (False, True)] + [(prompts[-1], True, False)]
    for prompt, label_all, train_head in cases:
        hidden, weight, labels = make_pair(prompt, answer, h, v, dtype, device, label_all=label_all)
        for name, fn in methods(chunk).items():
            row = measure(name, fn, hidden, weight, labels, train_head, device, peak, repeat)
            rows.append(dict(row, labels="all" if label_all else "answers"))
        del hidden, weight, labels
    notes = cpu_note(device) + [
        f"H={h}, V={v}, {str(dtype).replace('torch.', '')}; matmul peak measured in this run: {peak:.1f} TFLOP/s",
        "tflops_6MHV = 6*M*H*V / time (M = loss tokens); frozen head does 4*M*H*V of real work, recompute 2*M*H*V more",
        "loss_mem_GB = peak allocated above inputs minus the gradients' own bytes",
    ]
    if liger_loss() is None:
        notes.append("liger-kernel not installed: no Liger rows")
    keys = ("method", "labels", "tokens", "head", "ms", "pct_of_matmul_peak", "loss_mem_GB", "largest_tensor_MB")
    summary = [{k: r.get(k) for k in keys if k in r or k != "largest_tensor_MB"} for r in rows]
    counts, plan = count_rows()
    notes += ["ours_auto: frozen head -> deferred (G @ W in the forward), trained head -> recompute (two passes)",
              "product_counts: products per chunk counted under a TorchDispatchMode (H=16, V=257, 90 entries, "
              "chunk 16, float32, CPU); chunk_plan: the same plan at H=4096, V=128256 bfloat16 for M = 2048 (two 1K "
              "answers labeled) and M = 67584 (a 32K-prompt pair, every token labeled), bytes read + written by "
              "the backward's products per chunk"]
    return {"name": "orpo", "rows": rows, "notes": notes, "summary": summary,
            "product_counts": counts, "chunk_plan": plan}


if __name__ == "__main__":
    from bench.run_all import main

    sys.exit(main(["--only", "orpo"]))
