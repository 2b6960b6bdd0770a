"""A sealong adapter is a standard PEFT causal-LM adapter: AutoPeftModelForCausalLM.from_pretrained(adapter)
loads it with its base model (no sealong class in auto_mapping) and gives sealong's logits; its README.md is
a model card with the run's settings and data summary."""

import json
import os

import torch
from safetensors.torch import load_file
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from sealong.train.config import make_config
from sealong.train.distributed import setup
from sealong.train.loop import train


def test_auto_peft_model_loads_a_sealong_adapter_with_our_logits(tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model, set_peft_model_state_dict

    from sealong.model import load_model

    model, data = tiny_setup(str(tmp_path), n_pairs=2)
    cfg = make_config(dict(model=model, data=data, output_dir=str(tmp_path / "out"), batch_pairs=2, lr=5e-2,
                           lora_r=4, lora_alpha=8, lora_dropout=0.0, dtype="float32", progress=False)).validate()
    adapter = os.path.join(train(cfg, setup("cpu"))["checkpoint"], "adapter")
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == os.path.abspath(model)
    assert not config.get("auto_mapping")
    card = open(os.path.join(adapter, "README.md")).read()
    assert "library_name: peft" in card and "| `lora_r` | `4` |" in card and "2 pairs" in card

    hf = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    ids = torch.randint(6, 96, (29,))
    ours = get_peft_model(load_model(model, dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=8, target_modules=list(cfg.lora_targets)))
    set_peft_model_state_dict(ours, load_file(os.path.join(adapter, "adapter_model.safetensors")))
    with torch.no_grad():
        want = ours(ids, torch.arange(29), return_logits=True)
        got = hf(ids[None]).logits[0]
        with hf.disable_adapter():
            plain = hf(ids[None]).logits[0]
    assert (want - plain).norm() / plain.norm() > 1e-3  # the adapter changes the logits
    assert (got - want).norm() / want.norm() < 1e-5
