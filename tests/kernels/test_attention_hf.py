"""attn_implementation="sealong" on a tiny LlamaForCausalLM matches "eager" and "sdpa": logits and gradients.

Float32 weights, so the kernel (interpreted Triton without CUDA) must agree to about 1e-5 relative.
"""

import pytest
import torch

from sealong_kernels.hf import register_transformers_attention

transformers = pytest.importorskip("transformers")


def tiny_llama(attn, seed):
    register_transformers_attention()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(seed)  # identical weights for every implementation
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def logits_and_grad(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    (logits * mask[..., None]).square().mean().backward()
    return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()


@pytest.mark.parametrize("baseline", ["eager", "sdpa"])
def test_sealong_matches_baseline_with_padding(baseline, device):
    seed = int(torch.randint(0, 2**31, ()))
    ids = torch.randint(0, 97, (2, 13), device=device)
    mask = torch.ones(2, 13, dtype=torch.long, device=device)
    mask[1, :4] = 0  # left padding on row 1
    ours = tiny_llama("sealong", seed).to(device)
    base = tiny_llama(baseline, seed).to(device)
    lo, go = logits_and_grad(ours, ids, mask)
    lb, gb = logits_and_grad(base, ids, mask)
    valid = mask.bool()
    assert rel(lo[valid], lb[valid]) < 1e-5
    assert rel(go, gb) < 1e-4


def test_sealong_generate_with_cache_matches_eager(device):
    seed = int(torch.randint(0, 2**31, ()))
    ids = torch.randint(0, 97, (1, 9), device=device)
    ours = tiny_llama("sealong", seed).to(device)
    base = tiny_llama("eager", seed).to(device)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), base.generate(ids, **kw))


def test_sealong_rejects_dropout(device):
    model = tiny_llama("sealong", 0)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    kv = torch.randn(1, 1, 5, 16)
    from sealong_kernels.hf import sealong_attention_forward

    with pytest.raises(ValueError, match="dropout"):
        sealong_attention_forward(attn, q, kv, kv, None, dropout=0.1)
