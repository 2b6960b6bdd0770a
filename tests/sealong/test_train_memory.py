"""sealong.train.memory: parameter counts from a model config equal the weights of the built model (and peft's
LoRA weights), the presets are Meta's published sizes, and the per-GPU bytes follow the documented recipes."""

import pytest
import torch
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from sealong.model.config import ModelConfig
from sealong.train import memory


@pytest.mark.parametrize("tie", [False, True])
def test_param_counts_equal_the_built_models(tmp_path, tie):
    from peft import LoraConfig, get_peft_model

    from sealong.model import load_model

    folder, _ = tiny_setup(str(tmp_path), n_pairs=1, tie=tie)
    config = ModelConfig.from_folder(folder)
    counts = memory.param_counts(config, lora_r=4)
    model = load_model(folder, dtype=torch.float32)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert counts["layer"] == sum(p.numel() for p in model.model.layers[0].parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(memory.LORA_TARGETS)))
    assert counts["lora"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_presets_are_the_published_sizes():
    # the bfloat16 safetensors of meta-llama/Llama-3.1-8B-Instruct / -70B-Instruct hold 2 bytes per weight:
    # total_size 16,060,522,496 and 141,107,412,992 in their model.safetensors.index.json
    assert memory.param_counts(memory.PRESETS["Llama-3.1-8B"])["total"] * 2 == 16_060_522_496
    assert memory.param_counts(memory.PRESETS["Llama-3.1-70B"])["total"] * 2 == 141_107_412_992


def test_recipe_bytes_shard_over_gpus():
    c = memory.PRESETS["Llama-3.1-8B"]
    n = memory.param_counts(c)
    one, eight = memory.recipe_bytes(c, "full", 1), memory.recipe_bytes(c, "full", 8)
    assert one["weights"] + one["grads"] + one["optimizer"] == 16 * n["total"]
    for part in ("weights", "grads", "optimizer"):
        assert eight[part] == one[part] / 8
    assert memory.recipe_bytes(c, "qlora", 1)["total"] == memory.recipe_bytes(c, "qlora", 16)["total"]
    assert memory.recipe_bytes(c, "lora", 8)["total"] < memory.recipe_bytes(c, "lora", 1)["total"] / 3
    with pytest.raises(ValueError, match="recipe must be"):
        memory.recipe_bytes(c, "dora", 1)


def test_command_prints_the_table(capsys):
    assert memory.main(["--gpus", "1", "8"]) == 0
    out = capsys.readouterr().out
    assert "| Llama-3.1-70B (70.55B) | full FT" in out and out.count("\n") == 2 + 2 * 3 * 2
