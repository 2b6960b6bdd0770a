"""The training loop in one process: the logged batch loss and metrics equal the reference ORPO of the batch
(computed independently from transformers' model), micro-batching does not change the result, the saved
adapter loads into transformers + peft with the same logits, QLoRA and the command line run, and bad
configs fail naming the option; the schedule spans --max_steps; per-step text logs without a terminal."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

import sealong_kernels as sk
from sealong.train.distributed import setup
from sealong.train.pairs import IGNORE, load_pairs
from sealong.config.fields import ConfigError
from sealong.config.parser import resolve
from sealong.train.loop import batch_indices, main, train
from sealong.train.config import lr_at, make_config

RTOL = 1e-5  # float32 throughout


def _config(model, data, out, **overrides):
    values = dict(model=model, data=data, output_dir=out, batch_pairs=4, lr=5e-3, lora_r=4, lora_alpha=8,
                  lora_dropout=0.0, dtype="float32", progress=False)
    values.update(overrides)
    return make_config(values).validate()


def _capture():
    records = []
    return records, lambda step, record: records.append(record)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _reference_batch_loss(model_dir, cfg, data):
    """ORPO (or SFT) of the first batch from transformers' LlamaForCausalLM on the classic padded layout [2B, T]."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _, indices = batch_indices(0, len(data.pairs), len(data.pairs) // cfg.batch_pairs, cfg)
    pairs = [data.pairs[i] for i in indices]
    seqs = [(p.prompt, p.chosen) for p in pairs] + ([(p.prompt, p.rejected) for p in pairs] if cfg.mode == "orpo" else [])
    width = max(a.numel() + b.numel() for a, b in seqs)
    hidden = torch.zeros(len(seqs), width, hf.config.hidden_size)
    labels = torch.full((len(seqs), width), IGNORE)
    with torch.no_grad():
        for i, (prompt, answer) in enumerate(seqs):
            ids = torch.cat([prompt, answer])
            hidden[i, :ids.numel()] = hf.model(ids[None]).last_hidden_state[0]
            labels[i, prompt.numel() - 1:ids.numel() - 1] = answer  # labels[t] is predicted from hidden[t]
    return sk.reference.fused_linear_orpo_loss(hidden.double(), hf.lm_head.weight.double(), labels, beta=cfg.beta,
                                               mode=cfg.mode, nll_reduction=cfg.nll_reduction)


def test_batch_loss_matches_reference_and_micro_batching(tmp_path):
    from sealong.model import load_tokenizer

    model, data = tiny_setup(str(tmp_path), n_pairs=8)
    cfg = _config(model, data, str(tmp_path / "a"))
    records, hook = _capture()
    result = train(cfg, setup("cpu"), on_step=hook)  # 4 micro-steps of 1 pair per step
    pairs = load_pairs(data, load_tokenizer(model))
    loss, metrics = _reference_batch_loss(model, cfg, pairs)  # LoRA B starts at 0: step 1 sees the base model
    assert abs(records[0]["loss"] - loss.item()) / loss.item() < RTOL
    for name, value in metrics.items():
        if name != "skipped_pairs":  # logits/* too: the fused row pass's logit sums, as the reference's
            assert records[0][name] == pytest.approx(value.item(), rel=RTOL, abs=1e-7), name
    assert records[0]["rewards/chosen"] == pytest.approx(0.1 * records[0]["logps/chosen"])

    records2, hook2 = _capture()
    other = train(_config(model, data, str(tmp_path / "b"), micro_batch_pairs=2), setup("cpu"), on_step=hook2)
    assert _rel(torch.tensor(other["losses"]), torch.tensor(result["losses"])) < RTOL
    a = load_file(os.path.join(result["checkpoint"], "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(other["checkpoint"], "adapter", "adapter_model.safetensors"))
    assert all(_rel(b[k], a[k]) < 1e-4 for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # training moved the adapter


def test_sft_loss_matches_reference(tmp_path):
    from sealong.model import load_tokenizer

    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    cfg = _config(model, data, str(tmp_path / "sft"), mode="sft", micro_batch_pairs=2)
    records, hook = _capture()
    train(cfg, setup("cpu"), on_step=hook)
    loss, metrics = _reference_batch_loss(model, cfg, load_pairs(data, load_tokenizer(model), mode="sft"))
    assert records[0]["loss"] == pytest.approx(loss.item(), rel=RTOL)
    assert records[0]["nll_loss"] == pytest.approx(metrics["nll_loss"].item(), rel=RTOL)
    assert "rewards/chosen" not in records[0]


def test_adapter_loads_into_transformers_peft(tmp_path):
    from peft import PeftModel, get_peft_model, LoraConfig, set_peft_model_state_dict
    from transformers import LlamaForCausalLM

    from sealong.model import load_model

    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    result = train(_config(model, data, str(tmp_path / "out"), lr=5e-2), setup("cpu"))
    adapter_dir = os.path.join(result["checkpoint"], "adapter")
    ids = torch.randint(6, 96, (37,))
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model, dtype=torch.float32), adapter_dir).eval()
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        base = hf.get_base_model()
        with hf.disable_adapter():
            plain = base(ids[None]).logits[0]
    assert _rel(want, plain) > 1e-3  # the adapter changes the logits
    ours = load_model(model, dtype=torch.float32)
    peft_ours = get_peft_model(ours, LoraConfig(r=4, lora_alpha=8, target_modules=list(_config(model, data, "x").lora_targets)))
    set_peft_model_state_dict(peft_ours, load_file(os.path.join(adapter_dir, "adapter_model.safetensors")))
    with torch.no_grad():
        got = peft_ours(ids, torch.arange(37), return_logits=True)
    assert _rel(got, want) < RTOL


def test_qlora_trains_on_nf4_base(tmp_path):
    import bitsandbytes as bnb

    from sealong.train.loop import build_model

    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    cfg = _config(model, data, str(tmp_path / "q"), qlora=True, batch_pairs=2)
    peft_model, _, params = build_model(cfg, torch.device("cpu"))
    linears = [m for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7
    for m in linears:  # packed NF4 with double-quantized (nested) statistics
        assert m.weight.dtype == torch.uint8 and m.weight.quant_type == "nf4" and m.weight.quant_state.nested
    assert all(p.dtype == torch.float32 for p in params)
    result = train(cfg, setup("cpu"))
    assert result["steps"] == 2 and all(torch.isfinite(torch.tensor(result["losses"])))


def test_command_line_writes_metrics_config_and_text_log(tmp_path, caplog, capsys):
    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  model: {model}\n  data: {data}\n  batch_pairs: 2\n  lora_r: 4\n  dtype: float32\n"
                      "  learning_rate: 5.0e-4\n  report_to: tensorboard\n")
    out = str(tmp_path / "cli")
    with caplog.at_level("INFO", logger="sealong"):
        assert main(["--config", str(config), "--output_dir", out, "--lr", "1e-3", "--progress", "false",
                     "--max_steps", "1"]) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(lines) == 1 and lines[0]["step"] == 1 and lines[0]["lr"] == pytest.approx(1e-3)  # flag > file
    for key in ("loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "log_odds_ratio", "log_odds_chosen", "tokens_per_s", "grad_norm"):
        assert key in lines[0], key
    assert os.path.isdir(os.path.join(out, "tensorboard"))
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_000001", "adapter", "adapter_config.json"))
    written = json.load(open(os.path.join(out, "config.json")))
    assert (written["lr"], written["lora_r"], written["batch_pairs"], written["max_steps"]) == (1e-3, 4, 2, 1)
    step_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train 1/1 steps ")]
    assert step_lines and all(k in step_lines[0] for k in ("loss", "lr", "grad_norm", "tokens/s"))
    # the final line goes to the log, not stdout (the pipeline prints its summary there)
    assert any(r.getMessage().startswith("done: 1 steps") for r in caplog.records) and capsys.readouterr().out == ""


def test_max_steps_is_the_schedule_length(tmp_path):
    # 8 pairs, batch 2: 4 steps per epoch; --max_steps 2 must end the cosine at step 2, not run it over 4 steps
    model, data = tiny_setup(str(tmp_path), n_pairs=8)
    lrs = []
    result = train(_config(model, data, str(tmp_path / "o"), batch_pairs=2, max_steps=2, warmup_ratio=0.0),
                   setup("cpu"), on_step=lambda step, record: lrs.append(record["lr"]))
    assert result["steps"] == 2
    assert lrs == pytest.approx([5e-3 * lr_at(0, 2, 0.0), 5e-3 * lr_at(1, 2, 0.0)])
    assert lrs[1] == pytest.approx(5e-3 * 0.5)  # half-way down the cosine of a 2-step schedule
    # more steps than one epoch has go on into the next epochs (transformers' max_steps overrides epochs)
    assert train(_config(model, data, str(tmp_path / "p"), batch_pairs=4, max_steps=3), setup("cpu"))["steps"] == 3


def test_gradient_accumulation_steps_sets_the_batch(tmp_path):
    cfg = resolve("train", ["--model", "m", "--data", "d", "--per_device_train_batch_size", "2",
                            "--gradient_accumulation_steps", "3"]).cfg
    assert cfg.grad_accum_steps(dp=2) == 3 and cfg.batch_pairs == 12


def test_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        resolve("train", ["--model", "m", "--data", "d", "--lerning_rate", "1"])
    assert "did you mean --learning_rate?" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  model: m\n  data: d\n  batch_pairs: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: \[train\] batch_pairs: expected an int, got 'many'"):
        resolve("train", ["--config", str(bad)])
    cfg = resolve("train", ["--model", "m", "--data", "d", "--lora_targets", "q_proj,v_proj", "--qlora"]).cfg
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.qlora is True
    defaults = make_config({"model": "m", "data": "d"})
    assert (defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout, defaults.lr, defaults.batch_pairs,
            defaults.beta, defaults.weight_decay, defaults.adam_betas, defaults.warmup_ratio, defaults.max_grad_norm,
            defaults.max_length, defaults.epochs) == (128, 128, 0.05, 5e-5, 8, 0.1, 0.1, [0.9, 0.999], 0.05, 1.0, 32768, 1)
    with pytest.raises(ValueError, match="batch_pairs=8 is not divisible by dp=3"):
        defaults.grad_accum_steps(3)


@pytest.mark.parametrize("flags, message", [
    (["--log_every", "0"], "log_every must be >= 1"),  # was a ZeroDivisionError after the first step
    (["--batch_pairs", "8.5"], "invalid int value: '8.5'"),  # silently became 8
    (["--save_every", "-2"], "save_every must be >= 0"),
    (["--loss_chunk_size", "-1"], "loss_chunk_size must be >= 0"),
    (["--lora_dropout", "1"], "lora_dropout must be < 1"),
    (["--max_grad_norm", "-1"], "max_grad_norm must be >= 0"),
    (["--lr", "inf"], "lr: must be a finite number, got inf"),  # saved all-NaN adapters at step 1
    (["--learning_rate", "nan"], "lr: must be a finite number"),
    (["--beta=-inf"], "beta: must be a finite number"),
    (["--adam_betas", "0.9,nan"], "adam_betas: must be a finite number"),
])
def test_config_rejects_values_that_would_fail_mid_run(flags, message, capsys):
    with pytest.raises((ConfigError, SystemExit)) as err:
        resolve("train", ["--model", "m", "--data", "d"] + flags)
    assert message in (str(err.value) if err.type is ConfigError else capsys.readouterr().err)


def test_yaml_values_are_checked_too(tmp_path):
    for text, message in (("lr: .inf", "lr: must be a finite number"), ("warmup_ratio: 1.5", "warmup_ratio must be < 1"),
                          ("batch_pairs: 16.0", None)):
        path = tmp_path / "c.yaml"
        path.write_text(f"train:\n  {text}\n")
        if message is None:
            assert resolve("train", ["--config", str(path), "--model", "m", "--data", "d"]).cfg.batch_pairs == 16
            continue
        with pytest.raises(ConfigError, match=rf"c.yaml:2: \[train\] {message}"):
            resolve("train", ["--config", str(path), "--model", "m", "--data", "d"])


def test_full_finetuning_in_16_bits_is_warned_about():
    from sealong.train.loop import precision_warning

    w = torch.tensor([0.02], dtype=torch.bfloat16)
    assert torch.equal(w - 5e-6, w)  # why: the update of one AdamW step at lr 5e-6 rounds away
    base = {"model": "m", "data": "d", "finetune": "full", "lr": 5e-6}
    assert "master" in precision_warning(make_config(dict(base, dtype="bfloat16")))
    assert precision_warning(make_config(dict(base, dtype="float32"))) is None
    assert precision_warning(make_config({"model": "m", "data": "d"})) is None  # LoRA: float32 adapters


@pytest.mark.gpu
def test_bf16_on_gpu_matches_float32_on_cpu(tmp_path):
    """CUDA: our Triton attention (segments) and the fused loss kernel in bfloat16, packed and classic layouts,
    against the float32 CPU run (head dim 64). bf16 rounding over 3 steps: losses within 3e-2 relative."""
    model, data = tiny_setup(str(tmp_path), n_pairs=12, hidden=128, heads=2)
    want = train(_config(model, data, str(tmp_path / "cpu")), setup("cpu"))["losses"]
    for layout in ("packed", "classic"):
        got = train(_config(model, data, str(tmp_path / layout), dtype="bfloat16", layout=layout), setup("cuda"))
        assert _rel(torch.tensor(got["losses"]), torch.tensor(want)) < 3e-2, layout
