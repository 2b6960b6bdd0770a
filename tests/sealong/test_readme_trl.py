"""The README's "Use with TRL / transformers / peft" section: its ```python blocks run, in order and in one
namespace, with model_dir, pairs_file, adapter_dir and output_dir set to tiny stand-ins built here."""

import json
import os
import re

import pytest
import torch
from train_fixtures import make_model_folder, one_thread  # noqa: F401 (autouse fixture)
from trl_fixtures import require_trl

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
TITLE = "## Use with TRL / transformers / peft"


def section_blocks():
    text = open(README, encoding="utf-8").read()
    assert TITLE in text, f"README.md has no section {TITLE!r}"
    body = text.split(TITLE, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_trl_section_runs(tmp_path):
    require_trl()
    from sealong.train.config import make_config
    from sealong.train.distributed import setup
    from sealong.train.loop import train

    blocks = section_blocks()
    assert len(blocks) == 3
    model_dir = make_model_folder(str(tmp_path / "model"))
    pairs_file = tmp_path / "pairs_trl.jsonl"  # what `sealong score --pairs-format trl` writes
    with open(pairs_file, "w") as f:
        for i in range(4):
            words = [f"w{(5 * i + k) % 90}" for k in range(10)]
            f.write(json.dumps({"id": f"q{i}", "prompt": [{"role": "user", "content": " ".join(words[:6])}],
                                "chosen": [{"role": "assistant", "content": " ".join(words[6:8])}],
                                "rejected": [{"role": "assistant", "content": " ".join(words[8:])}]}) + "\n")
    cfg = make_config(dict(model=model_dir, data=str(pairs_file), output_dir=str(tmp_path / "sealong"), batch_pairs=2,
                           lora_r=4, lora_alpha=8, dtype="float32", progress=False,
                           max_steps=1)).validate()
    adapter_dir = os.path.join(train(cfg, setup("cpu"))["checkpoint"], "adapter")
    scope = {"model_dir": model_dir, "pairs_file": str(pairs_file), "adapter_dir": adapter_dir,
             "output_dir": str(tmp_path / "trl")}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md ({TITLE[3:]}, python block {i + 1})", "exec"), scope)
        except Exception as err:  # name the block that failed
            pytest.fail(f"README python block {i + 1} failed: {type(err).__name__}: {err}\n{block}")
    logs = [h for h in scope["trainer"].state.log_history if "loss" in h]
    assert scope["trainer"].state.global_step == 2 and all("logits/chosen" in h for h in logs)
    assert torch.isfinite(scope["loss"]) and scope["chosen_logps"].shape == (2,)
    assert type(scope["merged"]).__name__ == "LlamaForCausalLM"
