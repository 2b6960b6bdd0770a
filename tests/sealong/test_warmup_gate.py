"""The demo-gain warm-up's copy-gated learning rate (sealong.tiny `lr_schedule=copy_gated`): the rate stays at its
peak until a dev check's copy rate reaches `copy_gate`, then decays over `decay_steps` and the warm-up ends; the
pipeline passes the preset's shape to the warm-up."""

import math

import pytest
import torch

import sealong.tiny as tiny
from sealong.data.fresh_world import FreshWorld, FreshWorldConfig
from sealong.tiny import TinyConfig, lr_factor


def test_lr_factor_copy_gated():
    cfg = TinyConfig(lr_schedule="copy_gated", warmup_steps=1000, decay_steps=100)
    assert lr_factor(0, cfg, 50) == pytest.approx(1 / 50)  # the ramp
    assert [lr_factor(s, cfg, 50) for s in (49, 500, 999)] == [1.0, 1.0, 1.0]  # no gate: the peak, whatever the step
    assert lr_factor(300, cfg, 50, gate=300) == pytest.approx(1.0)
    assert lr_factor(350, cfg, 50, gate=300) == pytest.approx(0.55)
    assert lr_factor(399, cfg, 50, gate=300) == pytest.approx(0.1, abs=1e-3)
    cos = TinyConfig(lr_schedule="cosine", warmup_steps=1000)  # the fixed-length cosine decays with no gate
    assert lr_factor(999, cos, 50) == pytest.approx(0.1)


def _warm_up(monkeypatch, tmp_path, copy_rates, **values):
    """warm_up on a 1-layer model whose dev checks report `copy_rates` in turn; returns its stats and the
    learning rate of every step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny.build_tokenizer(tiny.demo_texts())
    world = FreshWorld(FreshWorldConfig(hops=(1,), paragraphs_per_record=4, seed=0))
    cfg = TinyConfig(**{**dict(min_tokens=30, max_tokens=60, warmup_batch=2, warmup_questions=16, dev_questions=2,
                               check_every=10, warmup_steps=60), **values})
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         pad_token_id=tok.pad_token_id))
    rates = iter(copy_rates)
    monkeypatch.setattr(tiny, "dev_check", lambda *a, **k: {"greedy": 0.0, "copy_rate": next(rates),
                                                             f"oracle@{cfg.dev_samples}": 0.0, "questions": 2})
    lrs = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: (lrs.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    stats = tiny.warm_up(model, tok, world.questions(16, 100), cfg, "plan_and_solve", log=lambda m: None,
                         dev=world.questions(2, 0), save=lambda path: None, scratch=tmp_path / "s")
    return stats, lrs


def test_copy_gate_opens_the_decay_then_ends_the_warm_up(monkeypatch, tmp_path):
    stats, lrs = _warm_up(monkeypatch, tmp_path, [0.0, 10.0, 60.0, 0.0, 0.0], lr_schedule="copy_gated",
                          copy_gate=50.0, decay_steps=15)
    assert stats["copy_gate_at"] == 30 and stats["warmup_steps_run"] == 45
    assert [c["step"] for c in stats["dev_checks"]] == [10, 20, 30, 40]
    peak = lrs[10]
    assert set(lrs[3:31]) == {peak}  # after the 3-step ramp: the peak until the gate opened
    assert all(a > b for a, b in zip(lrs[31:], lrs[32:])) and lrs[-1] == pytest.approx(
        peak * (0.1 + 0.45 * (1 + math.cos(math.pi * 14 / 15))))  # step 45 of 45: 14 of the 15 decay steps done


def test_copy_gate_never_opened_runs_every_step_at_the_peak(monkeypatch, tmp_path):
    stats, lrs = _warm_up(monkeypatch, tmp_path, [0.0] * 6, lr_schedule="copy_gated", copy_gate=50.0,
                          decay_steps=15)
    assert stats["copy_gate_at"] is None and stats["warmup_steps_run"] == 60 and len(set(lrs[3:])) == 1
    with pytest.raises(ValueError, match="copy_gated: needs dev checks"):
        _warm_up(monkeypatch, tmp_path, [], lr_schedule="copy_gated", check_every=0)


def test_pipeline_passes_the_demo_gain_shape_to_the_warm_up():
    from sealong.config.parser import resolve
    from sealong.pipeline import stage_configs, tiny_config

    r = resolve("pipeline", ["--preset", "demo-gain"])
    cfg = tiny_config(r.cfg, stage_configs(r.cfg, r.sections), "demo-gain")
    shape = tiny.parse_overrides(r.cfg.tiny_shape)
    assert shape["lr_schedule"] == "copy_gated"
    assert {k: getattr(cfg, k) for k in shape} == shape  # the preset's shape reaches the warm-up unchanged
    assert cfg.check_every > 0 and cfg.warmup_steps == r.cfg.tiny_warmup_steps
    assert (cfg.world_hops, cfg.world_passages, cfg.min_tokens, cfg.max_tokens, cfg.seed) == ((1,), 4, 30, 60, 0)
    d = resolve("pipeline", [])  # the default demo: no dev check, no gate
    cfg = tiny_config(d.cfg, stage_configs(d.cfg, d.sections), d.common["preset"])
    assert cfg.check_every == 0 and cfg.lr_schedule == "constant"
