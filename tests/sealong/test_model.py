"""sealong.model against transformers' LlamaForCausalLM / Qwen2ForCausalLM on tiny random float32 checkpoints."""

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sealong.model import ModelConfig, load_model, rope_inv_freq
from tiny_checkpoint import one_thread  # noqa: F401 (autouse fixture)

TOL = 2e-5  # relative error of float32 logits (both sides float32; observed ~1e-7)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_hf(arch, **overrides):
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2)
    common.update(overrides)
    if arch == "llama":
        cfg = LlamaConfig(head_dim=16, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING), max_position_embeddings=256, **common)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(tie_word_embeddings=True, rope_theta=10000.0, **common)
        model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a missed one shows up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model.float().eval()


def save(model, folder, **kwargs):
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return str(folder)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_logits_match_transformers(tmp_path, arch):
    hf = tiny_hf(arch)
    ours = load_model(save(hf, tmp_path), dtype=torch.float32)
    if arch == "llama":
        assert ours.config.rope_scaling["rope_type"] == "llama3"
        assert not ours.config.tie_word_embeddings
    else:
        assert ours.config.attention_bias and ours.config.tie_word_embeddings
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 97, (53,))  # positions past original_max_position_embeddings (32): scaling matters
    with torch.no_grad():
        got = ours(ids, torch.arange(53), return_logits=True)
    assert rel_err(got, hf_logits(hf, ids)) < TOL


def test_llama3_rope_scaling_changes_frequencies():
    base = ModelConfig(head_dim=16, rope_theta=500000.0)
    scaled = ModelConfig(head_dim=16, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
    a, b = rope_inv_freq(base), rope_inv_freq(scaled)
    assert torch.equal(a[0], b[0])  # highest frequency kept
    assert torch.allclose(b[-1], a[-1] / 8.0)  # lowest divided by factor
    assert (b <= a).all() and (b < a).any()


def test_packed_sequences_equal_separate_runs(tmp_path):
    hf = tiny_hf("llama")
    ours = load_model(save(hf, tmp_path), dtype=torch.float32)
    lengths = [5, 11, 7]
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, 5, 16, 23], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(ids, pos, cu_seqlens=cu, return_logits=True)
    for s, lo, hi in zip(seqs, cu[:-1], cu[1:]):
        assert rel_err(packed[lo:hi], hf_logits(hf, s)) < TOL


def test_preference_segments_equal_separate_runs(tmp_path):
    """prompt + chosen + rejected packed: rejected sees the prompt and itself, positions continue after the prompt."""
    hf = tiny_hf("qwen")
    ours = load_model(save(hf, tmp_path), dtype=torch.float32)
    p, c, r = torch.randint(0, 97, (9,)), torch.randint(0, 97, (4,)), torch.randint(0, 97, (6,))
    ids = torch.cat([p, c, r])
    pos = torch.cat([torch.arange(13), torch.arange(9, 15)])
    seg = torch.cat([torch.zeros(9), torch.ones(4), torch.full((6,), 2)]).int()
    with torch.no_grad():
        packed = ours(ids, pos, segment_ids=seg, return_logits=True)
    assert rel_err(packed[:13], hf_logits(hf, torch.cat([p, c]))) < TOL
    assert rel_err(packed[13:], hf_logits(hf, torch.cat([p, r]))[9:]) < TOL


def test_sharded_checkpoint_and_dtype(tmp_path):
    hf = tiny_hf("llama")
    folder = save(hf, tmp_path, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
    ids = torch.randint(0, 97, (19,))
    ours = load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(ours(ids, torch.arange(19), return_logits=True), hf_logits(hf, ids)) < TOL
    half = load_model(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        assert half(ids, torch.arange(19)).dtype == torch.bfloat16


def test_unsupported_architecture_named(tmp_path):
    folder = save(tiny_hf("llama"), tmp_path)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["MistralForCausalLM"]
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        load_model(folder)


def test_missing_weights_and_pickle_only_rejected(tmp_path):
    folder = save(tiny_hf("llama"), tmp_path)
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(folder)


def test_gradient_checkpointing_same_gradients(tmp_path):
    ours = load_model(save(tiny_hf("llama"), tmp_path), dtype=torch.float32).train()
    ids, pos = torch.randint(0, 97, (17,)), torch.arange(17)
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = ckpt
        ours(ids, pos, return_logits=True).logsumexp(-1).sum().backward()
        grads.append(ours.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert rel_err(grads[1], grads[0]) < 1e-6


def test_lora_adapter_loads_onto_transformers(tmp_path):
    """peft LoRA on our module tree; the saved adapter applies to transformers' model with the same logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    hf = tiny_hf("llama")
    folder = save(hf, tmp_path / "base")
    ours = load_model(folder, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(ours, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    hf_lora = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder).float().eval(), tmp_path / "adapter")
    ids = torch.randint(0, 97, (15,))
    with torch.no_grad():
        got = peft_model.base_model.model(ids, torch.arange(15), return_logits=True)
        want = hf_lora(input_ids=ids[None]).logits[0]
        base = hf_logits(hf, ids)
    assert rel_err(got, want) < TOL
    assert rel_err(got, base) > 1e-3  # the adapter does change the output


def test_triton_attention_path_matches_reference(tmp_path):
    """The model through sealong_kernels.flash_attention (the CUDA default; interpreted here): packed sequences
    and preference segments give the masked-SDPA reference's logits and gradients."""
    from sealong.model.llama import flash_attention_callable, masked_sdpa_attention

    ours = load_model(save(tiny_hf("qwen", num_hidden_layers=1), tmp_path), dtype=torch.float32)
    ids, pos = torch.randint(0, 97, (21,)), torch.cat([torch.arange(8), torch.arange(13)])
    cu = torch.tensor([0, 8, 21], dtype=torch.int32)
    seg = torch.cat([torch.zeros(13), torch.ones(3), torch.full((5,), 2)]).int()
    for kwargs in ({"cu_seqlens": cu}, {"segment_ids": seg}):
        outs, grads = [], []
        for attention in (masked_sdpa_attention, flash_attention_callable):
            ours.zero_grad()
            out = ours(ids, pos if "cu_seqlens" in kwargs else torch.arange(21), attention=attention, return_logits=True, **kwargs)
            out.logsumexp(-1).sum().backward()
            outs.append(out.detach())
            grads.append(ours.model.layers[0].self_attn.k_proj.weight.grad.clone())
        assert rel_err(outs[1], outs[0]) < 1e-5
        assert rel_err(grads[1], grads[0]) < 1e-4


def test_config_from_published_layouts():
    """Meta's Llama-3.1 config.json layout (rope_theta and rope_scaling at the top level, eos list, no head_dim)."""
    llama31 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "max_position_embeddings": 131072, "eos_token_id": [128001, 128008, 128009],
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    c = ModelConfig.from_dict(llama31)
    assert (c.head_dim, c.rope_theta, c.rope_scaling["rope_type"], c.eos_token_id) == (128, 500000.0, "llama3", [128001, 128008, 128009])
    assert not c.attention_bias and not c.tie_word_embeddings
    qwen = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0,
            "rope_scaling": None, "tie_word_embeddings": True, "use_sliding_window": False, "eos_token_id": 151643}
    c = ModelConfig.from_dict(qwen)
    assert (c.head_dim, c.attention_bias, c.attention_out_bias, c.rope_scaling, c.eos_token_id) == (64, True, False, None, [151643])
    with pytest.raises(ValueError, match="config.json: unsupported rope_scaling type 'yarn'"):
        ModelConfig.from_dict(dict(qwen, rope_scaling={"type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="config.json: 'num_attention_heads' must be a positive integer"):
        ModelConfig.from_dict({k: v for k, v in qwen.items() if k != "num_attention_heads"})
    with pytest.raises(ValueError, match="config.json: missing field 'hidden_size'"):
        ModelConfig.from_dict({k: v for k, v in qwen.items() if k != "hidden_size"})
