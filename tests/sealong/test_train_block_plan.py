"""One block plan per batch, passed explicitly: the model builds the attention's block plan once per forward
(`flash_attention_callable.plan_blocks`) and hands it to every layer, forward and backward, so a training
micro-step builds one plan per row whatever the number of layers, with the content-version cache switched off
(the cache stays only for callers that pass no plan); a segment-id buffer refilled in place gets a new plan
and the right visibility. Counted with attention_plan.BUILDS under the Triton interpreter."""

import pytest
import torch
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from sealong_kernels import attention, attention_plan
from sealong.model.llama import flash_attention_callable, masked_sdpa_attention
from sealong.train.config import make_config
from sealong.train.loop import build_model
from sealong.train.mesh import TrainMesh
from sealong.train.micro import build_micro_batch, micro_step_loss
from sealong.train.pairs import load_pairs
from sealong.train.parallel import ParallelDims


@pytest.fixture
def no_cache(monkeypatch):
    """The content-version cache off: every build the layers do not get from the caller's plan is counted."""
    monkeypatch.setattr(attention, "content_version", lambda *t: None)


def _tiny(tmp_path, layers=3, micro_pairs=2):
    from sealong.model import load_tokenizer

    model_dir, data = tiny_setup(str(tmp_path), n_pairs=4, layers=layers)
    cfg = make_config(dict(model=model_dir, data=data, output_dir=str(tmp_path / "out"), batch_pairs=4,
                           micro_batch_pairs=micro_pairs, finetune="full", dtype="float32", progress=False,
                           loss_chunk_size=16)).validate()
    pairs = load_pairs(data, load_tokenizer(model_dir)).pairs[:micro_pairs]
    model, lm_head, _ = build_model(cfg, torch.device("cpu"))
    return cfg, model, lm_head, pairs


def _without_plan(q, k, v, **kw):  # the same kernel through a callable that offers the model no plan builder
    return flash_attention_callable(q, k, v, **kw)


@pytest.mark.parametrize("explicit", [True, False])
def test_one_plan_build_per_row_of_a_training_micro_step(tmp_path, no_cache, explicit):
    """2 layers (gradient checkpointing on, the default: forward, recomputed forward, backward per layer), 1
    packed pair: 1 build with the explicit plan; without it and without the cache every layer's calls build
    their own (3 x 2: what the count would catch)."""
    cfg, model, lm_head, pairs = _tiny(tmp_path, layers=2, micro_pairs=1)
    mesh = TrainMesh(ParallelDims(), attention=flash_attention_callable if explicit else _without_plan)
    micro = build_micro_batch(pairs, cfg, mesh, torch.device("cpu"), lm_head)
    before = attention_plan.BUILDS[0]
    loss, _ = micro_step_loss(model, lm_head, micro, cfg, mesh, pairs[0].chosen.numel(), 4)
    loss.backward()
    calls_per_layer = 3 if model.gradient_checkpointing else 2
    assert len(micro.rows) == 1
    assert attention_plan.BUILDS[0] - before == (1 if explicit else calls_per_layer * 2)


def test_refilled_segment_buffer_gets_a_new_plan(tmp_path):
    """The same segment-id buffer refilled in place between two forwards (a preallocated collate buffer): the
    second forward builds its own plan and sees the new segments (equal to the masked SDPA reference)."""
    _, model, _, _ = _tiny(tmp_path, layers=2, micro_pairs=1)
    t = 40
    ids, pos = torch.randint(6, 90, (t,)), torch.arange(t)
    seg = torch.tensor([0] * 16 + [1] * 12 + [2] * 12, dtype=torch.int32)
    with torch.no_grad():
        model(ids, pos, attention=flash_attention_callable, segment_ids=seg)
        seg.copy_(torch.tensor([0] * 20 + [1] * 4 + [2] * 16, dtype=torch.int32))  # refilled in place
        before = attention_plan.BUILDS[0]
        got = model(ids, pos, attention=flash_attention_callable, segment_ids=seg)
        assert attention_plan.BUILDS[0] - before == 1
        want = model(ids, pos, attention=masked_sdpa_attention, segment_ids=seg.clone())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_plan_of_another_geometry_is_refused():
    seg = torch.tensor([0] * 10 + [1] * 6, dtype=torch.int32)
    q = k = v = torch.randn(16, 2, 16)
    plan = attention.block_plan(16, causal=True, segment_ids=seg)
    out, _ = attention.flash_attention(q, k, v, segment_ids=seg, block_plan=plan, backend="triton")
    ref, _ = attention.flash_attention(q, k, v, segment_ids=seg, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_plan was built for"):
        attention.flash_attention(q, k, v, segment_ids=seg, block_plan=plan, backend="triton", q_start=1, k_start=1)
