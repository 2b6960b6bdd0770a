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
    # token 0 is the pad id: generate() masks it, and a masked last token is right padding, whose output is
    # undefined (eager computes a row, sealong zeroes padded rows); the prompt holds no pad
    ids = torch.randint(1, 97, (1, 9), device=device)
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


def test_position_ids_packing_equals_separate_sequences(device):
    """DataCollatorWithFlattening without return_flash_attn_kwargs: one row, position ids restart at every
    sequence, no mask and no cu_seq_lens; the sequences must not see each other."""
    seed = int(torch.randint(0, 2**31, ()))
    lengths = (5, 7, 4)
    seqs = [torch.randint(0, 97, (1, n), device=device) for n in lengths]
    ids = torch.cat(seqs, 1)
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    model = tiny_llama("sealong", seed).to(device)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
        alone = torch.cat([model(input_ids=s).logits[0] for s in seqs])
    assert rel(packed, alone) < 1e-5


def test_cu_seqlens_from_position_ids():
    from sealong_kernels.hf import cu_seqlens_from_position_ids

    cu = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 9, 9, 9, 9, 9, 9, 9]


@pytest.mark.parametrize("path", ["padding", "position_ids"])
def test_attention_interface_reads_nothing_on_the_host(path, device):
    """Forward and backward of the attention function with a padding mask (holes included) or packed position
    ids, under the no-host-read patch; results match the reference per row / per sequence."""
    from sealong_kernels import reference as ref
    from sealong_kernels.hf import sealong_attention_forward
    from tests.kernels.test_attention_plan import no_host_reads

    torch.manual_seed(1)
    b, s, hq, hkv, d = (2, 11, 2, 1, 16) if path == "padding" else (1, 13, 2, 1, 16)
    query = torch.randn(b, hq, s, d, device=device, requires_grad=True)
    key, value = (torch.randn(b, hkv, s, d, device=device, requires_grad=True) for _ in range(2))
    module = torch.nn.Module()
    if path == "padding":
        mask = torch.ones(b, s, dtype=torch.long, device=device)
        mask[0, :3] = 0  # left padding
        mask[1, 6] = 0  # a hole
        kwargs = {}
    else:
        mask = None
        kwargs = dict(position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]], device=device))
    with no_host_reads():
        out, _ = sealong_attention_forward(module, query, key, value, mask, **kwargs)
        out.square().sum().backward()
    for r in range(b):
        if path == "padding":
            keep = mask[r].bool()
            groups = [keep.nonzero().squeeze(1)]
        else:
            groups = [torch.arange(0, 4), torch.arange(4, 7), torch.arange(7, 13)]
        for idx in groups:
            q, k, v = (t[r][:, idx].transpose(0, 1).detach().double().requires_grad_() for t in (query, key, value))
            o, _ = ref.attention_forward(q, k, v, causal=True)
            o.square().sum().backward()
            assert rel(out[r, idx], o) < 1e-5
            assert rel(query.grad[r][:, idx].transpose(0, 1), q.grad) < 1e-4
            assert rel(key.grad[r][:, idx].transpose(0, 1), k.grad) < 1e-4
        if path == "padding":
            assert torch.all(out[r, ~mask[r].bool()] == 0)


def test_position_ids_buffer_refilled_in_place_gets_a_new_plan(device):
    """The plan (varlen boundaries and block lists) rides on the position-ids tensor of a batch; a buffer
    refilled in place with other boundaries (a preallocated collate buffer) must get a new plan, not the old
    one (the cache is keyed by the tensor's content version, not by the object)."""
    from sealong_kernels import reference as ref
    from sealong_kernels.hf import sealong_attention_forward

    torch.manual_seed(2)
    s, hq, hkv, d = 12, 2, 1, 16
    query = torch.randn(1, hq, s, d, device=device)
    key, value = (torch.randn(1, hkv, s, d, device=device) for _ in range(2))
    module = torch.nn.Module()
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]], device=device)
    sealong_attention_forward(module, query, key, value, None, position_ids=pos)
    pos.copy_(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]]))  # refilled: sequences of 3 and 9
    out, _ = sealong_attention_forward(module, query, key, value, None, position_ids=pos)
    for idx in (torch.arange(0, 3), torch.arange(3, 12)):
        q, k, v = (t[0][:, idx].transpose(0, 1).double() for t in (query, key, value))
        o, _ = ref.attention_forward(q, k, v, causal=True)
        assert rel(out[0, idx], o) < 1e-5
