"""The sampler's decode step on the Triton path: one cascade kernel per layer (sealong_kernels.decode
`cascade_decode_attention`) gives the torch composition's step and tokens, in <= 2 launches per layer."""

import pytest
import torch
from test_sampler_batching import decode_state, frequent_tokens, prompts_and_seeds
from tiny_checkpoint import build_checkpoint, one_thread  # noqa: F401 (autouse fixture)

from sealong.model import load_model
from sealong.sample import sampler as S
from sealong.sample.kv_cache import SuffixCache, decode_step, prefix_attention_fn

LIVE = [0, 1, 3, 4]  # decode_state's decoding slots (slot 2 is idle)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(build_checkpoint(tmp_path_factory.mktemp("tiny")), dtype=torch.float32)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def copy(suffix):
    return SuffixCache([t.clone() for t in suffix.k], [t.clone() for t in suffix.v])


def test_cascade_step_equals_the_composition(model):
    """One step (3 prompts, a sample not decoding, an idle slot) through the cascade kernel (interpreted) and
    through the reference composition (prefix, suffix scatter, suffix pieces, merge): the same logits of every
    decoding slot, the same suffix rows written; the batch padded as a CUDA graph bucket gives the same."""
    from sealong.sample.graphs import pad_batch

    pool, suffix, batch = decode_state(model, "cpu")
    got_cache, want_cache, padded_cache = copy(suffix), copy(suffix), copy(suffix)
    got = model.lm_head(decode_step(model, batch, pool, got_cache, prefix_attention_fn("cpu", "triton")))
    want = model.lm_head(decode_step(model, batch, pool, want_cache, prefix_attention_fn("cpu", "reference")))
    assert rel_err(got[LIVE], want[LIVE]) < 1e-5
    for layer, (a, b) in enumerate(zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v)):
        a, b = a[LIVE], b[LIVE]  # the new tokens' k, v at row write[s], the rest untouched
        assert torch.equal(a, b) if layer % len(got_cache.k) == 0 else rel_err(a, b) < 1e-6  # layer 0: same inputs
    for s, w in zip(LIVE, batch.write[LIVE].tolist()):
        assert not torch.equal(got_cache.k[0][s, w], suffix.k[0][s, w])  # written
    padded = pad_batch(batch, pool, 300)[1]
    again = model.lm_head(decode_step(model, padded, pool, padded_cache, prefix_attention_fn("cpu", "triton")))
    assert rel_err(again[LIVE], want[LIVE]) < 1e-5


def test_decode_launches_per_layer(model):
    """Counted by a launch hook on the Triton kernels and a TorchDispatchMode over the attention of every layer:
    the cascade kernel alone (1 launch), or with its split merge when the keys are split (2), and no eager torch
    op; the composition it replaces counts > 30 (the counter sees them)."""
    from bench.bench_step_counts import decode_counts

    pool, suffix, batch = decode_state(model, "cpu")
    attn = prefix_attention_fn("cpu", "triton")
    for splits, kernels in ((None, ["_cascade_decode_kernel"]), (3, ["_cascade_decode_kernel", "_merge_splits_kernel"])):
        launches, ops, names = decode_counts(model, batch, pool, copy(suffix), attn, splits)
        assert (launches, ops, names) == (len(kernels), 0, kernels)
    launches, ops, _ = decode_counts(model, batch, pool, copy(suffix), lambda *a, **kw: attn(*a, **kw))
    assert launches == 1 and ops > 30


def test_sampling_with_the_cascade_equals_the_reference(model):
    """Continuous batching (3 slots for 3 prompts of 2 samples, EOS ending samples early: idle slots, slots
    reused, the pool compacted) gives the same tokens on the Triton path (interpreted) as with the reference."""
    prompts, seeds = prompts_and_seeds(3, 2, seed=4)
    eos = frequent_tokens(model, prompts, seeds, 4)
    runs = [S.generate(model, prompts, seeds, S.SamplingParams(max_new_tokens=5, temperature=0.9, eos_token_ids=eos,
                                                                 decode_slots=3, backend=b))
            for b in ("reference", "triton")]
    assert [[c.tokens for c in cs] for cs in runs[0]] == [[c.tokens for c in cs] for cs in runs[1]]
    assert any(len(c.tokens) < 5 for cs in runs[0] for c in cs)  # some sample ended early
