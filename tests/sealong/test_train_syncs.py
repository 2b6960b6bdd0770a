"""Counts of a training micro-step (bench/op_counts.py's TorchDispatchMode; exact, device independent): the
loss forward + backward of `sealong train` synchronizes the host 0 times and runs 3 matrix products per chunk
with a trained LM head (full fine-tuning), 2 with a frozen one (LoRA); every check and sort of the loss entries
happens where the micro-batch is built, before the forward. The interpreter path (TRITON_INTERPRET=1, as the
suite runs on a CPU) is the GPU's code path: the same Triton row kernel and the same torch ops."""

import pytest
import torch
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from bench.op_counts import OpCounter
from sealong.train.config import make_config
from sealong.train.loop import build_model
from sealong.train.mesh import TrainMesh
from sealong.train.micro import build_micro_batch, micro_loss
from sealong.train.pairs import load_pairs
from sealong.train.parallel import ParallelDims


def _setup(tmp_path, finetune, chunk, micro_pairs, layout="packed", mode="orpo"):
    from sealong.model import load_tokenizer

    model_dir, data = tiny_setup(str(tmp_path), n_pairs=4)
    cfg = make_config(dict(model=model_dir, data=data, output_dir=str(tmp_path / "out"), batch_pairs=4,
                           micro_batch_pairs=micro_pairs, finetune=finetune, lora_r=4, lora_alpha=8,
                           lora_dropout=0.0, dtype="float32", progress=False, loss_chunk_size=chunk, layout=layout,
                           mode=mode)).validate()
    pairs = load_pairs(data, load_tokenizer(model_dir), mode=mode).pairs[:micro_pairs]
    model, lm_head, _ = build_model(cfg, torch.device("cpu"))
    return cfg, model, lm_head, pairs


def count_micro_step(tmp_path, finetune, chunk=8, micro_pairs=1, layout="packed", mode="orpo"):
    """(OpCounter with phases build / model / loss / backward, number of logits chunks, vocabulary size)."""
    cfg, model, lm_head, pairs = _setup(tmp_path, finetune, chunk, micro_pairs, layout, mode)
    mesh = TrainMesh(ParallelDims())
    chosen = sum(p.chosen.numel() for p in pairs)
    with OpCounter() as rec:
        rec.phase = "build"
        micro = build_micro_batch(pairs, cfg, mesh, torch.device("cpu"), lm_head)
        rec.phase = "model"
        hiddens = [model(ids, pos, segment_ids=seg) for ids, pos, seg in micro.rows]
        # the loss on leaves: its own forward and backward, apart from the model's
        leaves = [h.detach().requires_grad_() for h in hiddens]
        rec.phase = "loss"
        loss, metrics = micro_loss(leaves, lm_head, micro, cfg, None, chosen, len(pairs))
        rec.phase = "backward"
        loss.backward()
        rec.phase = "metrics"
        metrics += 0  # the caller accumulates the device tensor, reads it once per optimizer step
    v = lm_head.weight.shape[0]
    chunks = sum(1 for p in rec.products if p[0] == "loss" and p[2][1:] == (v,))
    assert all(leaf.grad is not None for leaf in leaves)
    return rec, chunks, micro


@pytest.mark.parametrize("finetune,per_chunk", [("full", 3), ("lora", 2)])
@pytest.mark.parametrize("micro_pairs,layout", [(1, "packed"), (2, "classic")])
def test_micro_step_loss_has_no_host_sync_and_the_matmul_floor(tmp_path, finetune, per_chunk, micro_pairs, layout):
    rec, chunks, micro = count_micro_step(tmp_path, finetune, micro_pairs=micro_pairs, layout=layout)
    assert micro.loss is not None  # the one-pass path
    assert rec.count("syncs", "loss") == 0 and rec.count("syncs", "backward") == 0, rec.syncs
    assert rec.count("syncs", "build") > 0  # the counter sees the batch building's checks (it can fail)
    entries = micro.loss.rows.shape[0]
    assert chunks >= -(-entries // 8) and chunks > 1  # several chunks of at most 8 entries
    loss_products = [p for p in rec.products if p[0] == "loss"]
    assert len(loss_products) == per_chunk * chunks, loss_products
    assert rec.count("products", "backward") == 0  # the loss's backward only scales the saved gradients


def test_sft_micro_step_has_no_host_sync(tmp_path):
    rec, chunks, _ = count_micro_step(tmp_path, "lora", micro_pairs=2, mode="sft")
    assert rec.count("syncs", "loss") == 0 and rec.count("syncs", "backward") == 0, rec.syncs
    assert rec.count("products", "loss") == 2 * chunks


def test_two_pass_path_is_what_the_count_would_catch(tmp_path):
    """The two-pass `row_logp_sums` path (kept for a trained head under sequence parallelism over several
    pairs) finds its entries inside the loss call: the same counter sees its syncs there."""
    cfg, model, lm_head, pairs = _setup(tmp_path, "full", 8, 2)
    micro = build_micro_batch(pairs, cfg, TrainMesh(ParallelDims()), torch.device("cpu"), lm_head)
    micro.loss = None
    hiddens = [model(ids, pos, segment_ids=seg).detach().requires_grad_() for ids, pos, seg in micro.rows]
    with OpCounter() as rec:
        loss, _ = micro_loss(hiddens, lm_head, micro, cfg, None, sum(p.chosen.numel() for p in pairs), 2)
    assert rec.count("syncs") > 0


def test_one_pass_equals_two_pass_in_loss_metrics_and_gradients(tmp_path):
    """Same micro-step (float64 model; the row kernel's LSE is float32 either way): the one-pass loss, metric
    sums and every gradient equal the two-pass path's."""
    cfg, model, lm_head, pairs = _setup(tmp_path, "full", 8, 2, layout="classic")
    model.double()
    micro = build_micro_batch(pairs, cfg, TrainMesh(ParallelDims()), torch.device("cpu"), lm_head)
    chosen = sum(p.chosen.numel() for p in pairs)
    results = []
    for onepass in (True, False):
        model.zero_grad(set_to_none=True)
        m = micro if onepass else build_micro_batch(pairs, cfg, TrainMesh(ParallelDims()), torch.device("cpu"),
                                                    lm_head)
        if not onepass:
            m.loss = None
        hiddens = [model(ids, pos, segment_ids=seg) for ids, pos, seg in m.rows]
        loss, metrics = micro_loss(hiddens, lm_head, m, cfg, None, chosen + 5, 3)  # shares of a larger batch
        loss.backward()
        results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, m1, g1), (l2, m2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0)
    torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-9)
    for name in g1:
        err = ((g1[name] - g2[name]).norm() / g2[name].norm().clamp_min(1e-30)).item()
        assert err < 1e-5, (name, err)
