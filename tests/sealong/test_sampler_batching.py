"""Continuous batching in the sampler: a fixed budget of decode slots refilled as samples finish."""

import pytest
import torch
from test_sampler import naive_generate
from tiny_checkpoint import build_checkpoint, one_thread  # noqa: F401 (autouse fixture)

from sealong.model import load_model
from sealong.sample import sampler as S
from sealong.sample.kv_cache import PrefixPool


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(build_checkpoint(tmp_path_factory.mktemp("tiny")), dtype=torch.float32)


def prompts_and_seeds(n_prompts, samples, lo=5, hi=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n_prompts,), generator=g).tolist()
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in lengths]
    return prompts, [[S.sample_seed(seed, b, i) for i in range(samples)] for b in range(n_prompts)]


def frequent_tokens(model, prompts, seeds, k):
    """The k tokens sampled most often without EOS: as EOS ids they end many samples early, at varied lengths."""
    free = S.generate(model, prompts, seeds, S.SamplingParams(max_new_tokens=6, temperature=1.0))
    counts = torch.bincount(torch.tensor([t for cs in free for c in cs for t in c.tokens]), minlength=96)
    return tuple(counts.argsort(descending=True)[:k].tolist())


def test_slots_refilled_equal_naive(model):
    """4 slots for 5 prompts of 2-3 samples: prompts are admitted as slots free up (prefix pool compacted as
    prompts leave, slots reused), and every sample is the naive sampler's."""
    prompts, _ = prompts_and_seeds(5, 1, seed=1)
    seeds = [[b * 10 + i for i in range(2 + b % 2)] for b in range(5)]
    params = S.SamplingParams(max_new_tokens=6, temperature=0.9, eos_token_ids=frequent_tokens(model, prompts, seeds, 6),
                              prefill_chunk=8, decode_slots=4)
    got = S.generate(model, prompts, seeds, params)
    for prompt, ss, completions in zip(prompts, seeds, got):
        for (tokens, reason, lp), c in zip(naive_generate(model, prompt, ss, params), completions):
            assert c.tokens == tokens and c.finish_reason == reason
            assert abs(c.logprob_sum - lp) < 1e-4
    assert params.stats["prefill_tokens"] == sum(map(len, prompts))
    assert params.stats["busy_slot_steps"] == sum(len(c.tokens) for cs in got for c in cs)
    assert params.stats["slot_steps"] % 4 == 0 and params.stats["slot_steps"] >= 4 * (params.stats["decode_steps"] + 1)


def test_continuous_beats_static_batches_same_tokens(model):
    """Static batches (today's: 2 prompts x 4 samples decode until their longest sample ends) against 8 slots
    refilled as samples finish: the same tokens per (prompt, seed), a higher slot utilization."""
    prompts, seeds = prompts_and_seeds(12, 4, seed=2)
    eos = frequent_tokens(model, prompts, seeds, 3)
    static = S.SamplingParams(max_new_tokens=24, temperature=1.0, eos_token_ids=eos)
    static_out = [c for b in range(0, 12, 2) for c in S.generate(model, prompts[b : b + 2], seeds[b : b + 2], static)]
    cont = S.SamplingParams(max_new_tokens=24, temperature=1.0, eos_token_ids=eos, decode_slots=8)
    cont_out = S.generate(model, prompts, seeds, cont)
    assert [[c.tokens for c in cs] for cs in cont_out] == [[c.tokens for c in cs] for cs in static_out]
    lengths = [len(c.tokens) for cs in cont_out for c in cs]
    assert min(lengths) < 6 and max(lengths) == 24  # widely varying
    util = lambda p: p.stats["busy_slot_steps"] / p.stats["slot_steps"]  # noqa: E731
    assert static.stats["busy_slot_steps"] == cont.stats["busy_slot_steps"] == sum(lengths)
    assert util(cont) > util(static) + 0.1


def test_same_slots_same_bits_whatever_the_other_prompts(model):
    """At a fixed slot count every sample's tokens and log-probabilities are bit-identical whatever else is
    decoding (the CPU in float32): what makes a data-parallel run's merged output equal a one-process run's."""
    prompts, seeds = prompts_and_seeds(6, 3, seed=3)
    eos = frequent_tokens(model, prompts, seeds, 4)
    run = lambda idx: S.generate(model, [prompts[i] for i in idx], [seeds[i] for i in idx],  # noqa: E731
                                 S.SamplingParams(max_new_tokens=10, temperature=1.0, eos_token_ids=eos, decode_slots=7))
    together = run(range(6))
    for part in ([4, 1], [0, 2, 3, 5]):
        for i, cs in zip(part, run(part)):
            assert [(c.tokens, c.logprob_sum, c.finish_reason) for c in cs] == \
                   [(c.tokens, c.logprob_sum, c.finish_reason) for c in together[i]]


def test_more_samples_than_slots_and_a_small_prefix_pool(model):
    """3 slots for prompts of 5 samples; the pool holds one prompt at a time: samples wait for a slot (or for
    the pool), and each is still the same as with all samples at once."""
    prompts, seeds = prompts_and_seeds(3, 5, seed=4)
    eos = frequent_tokens(model, prompts, seeds, 4)
    free = S.SamplingParams(max_new_tokens=8, temperature=1.0, eos_token_ids=eos)
    want = S.generate(model, prompts, seeds, free)
    tight = S.SamplingParams(max_new_tokens=8, temperature=1.0, eos_token_ids=eos, decode_slots=3, prefix_pool_tokens=1)
    got = S.generate(model, prompts, seeds, tight)
    assert [[c.tokens for c in cs] for cs in got] == [[c.tokens for c in cs] for cs in want]
    assert tight.stats["prefill_tokens"] == free.stats["prefill_tokens"] == sum(map(len, prompts))
    with pytest.raises(ValueError, match="prompt 0: need a non-empty prompt and at least one sample, got 0 tokens"):
        S.generate(model, [[]], [[1]], S.SamplingParams(max_new_tokens=2))


def test_prefix_pool_packs_and_compacts(model):
    pool = PrefixPool(model, "cpu", torch.float32, capacity=4)
    for n, fill in ((3, 1.0), (5, 2.0), (2, 3.0)):  # the second add grows the pool
        view = pool.add(n)
        for t in view.k + view.v:
            t.fill_(fill)
    assert pool.cu_prefix.tolist() == [0, 3, 8, 10]
    pool.remove(1)
    assert pool.cu_prefix.tolist() == [0, 3, 5] and pool.lengths == [3, 2]
    assert (pool.k[0][:3] == 1).all() and (pool.v[1][3:5] == 3).all()


def decode_state(model, device, slots=5):
    """A prefix pool of 3 prompts and a suffix cache, with a decode batch in the middle of generation."""
    from sealong.sample.kv_cache import DecodeBatch, SuffixCache, prefill

    g = torch.Generator().manual_seed(7)
    pool = PrefixPool(model, device, torch.float32)
    for n in (9, 30, 4):
        prefill(model, [torch.randint(0, 96, (n,), generator=g).tolist()], pool.add(n), 8)
    suffix = SuffixCache.allocate(model, slots, 300, device, torch.float32)
    for t in suffix.k + suffix.v:
        t.normal_(generator=torch.Generator(device).manual_seed(1))
    # prompt 0: samples in slots 3, 0; prompt 1: sample 0 done, sample 1 in slot 4; prompt 2: slot 1; slot 2 idle
    batch = DecodeBatch(torch.tensor([5, 6, 0, 7, 8], device=device), torch.tensor([13, 11, 0, 9 + 2, 30 + 5], device=device),
                        torch.tensor([4, 7, 0, 2, 5], device=device), torch.tensor([3, 0, 5, 4, 1], device=device),
                        torch.tensor([0, 2, 4, 5], dtype=torch.int32, device=device), 2, 8)
    return pool, suffix, batch


def test_padded_decode_batch_gives_the_same_step(model):
    """What a CUDA graph replays: the step padded to its bucket (more rows and prompts, empty; a longer suffix
    span, masked) equals the step itself, bit for bit on the CPU."""
    from sealong.sample.graphs import bucket, pad_batch
    from sealong.sample.kv_cache import decode_step, prefix_attention_fn

    pool, suffix, batch = decode_state(model, "cpu")
    key, padded = pad_batch(batch, pool, 300)
    assert key == (8, 4, 2, 32, 256) and padded.rows.tolist() == [3, 0, 5, 4, 1, 5, 5, 5]
    assert padded.cu_q.tolist() == [0, 2, 4, 5, 5] and padded.cu_prefix.tolist() == [0, 9, 39, 43, 43]
    assert [bucket(n) for n in (1, 2, 3, 17)] == [1, 2, 4, 32] and bucket(3, 16) == 16
    attn = prefix_attention_fn("cpu")
    want = model.lm_head(decode_step(model, batch, pool, suffix, attn))
    got = model.lm_head(decode_step(model, padded, pool, suffix, attn))
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_decode_graph_replay_equals_eager_gpu(tmp_path):
    """CUDA graphs: one step captured and replayed equals the same padded step run eagerly; a whole sampling run
    with graphs gives the eager run's tokens."""
    from sealong.sample.graphs import DecodeGraphs, pad_batch
    from sealong.sample.kv_cache import decode_step, prefix_attention_fn

    model = load_model(build_checkpoint(tmp_path / "tiny"), dtype=torch.float32, device="cuda")
    pool, suffix, batch = decode_state(model, "cuda")
    attn = prefix_attention_fn("cuda")
    eager = model.lm_head(decode_step(model, pad_batch(batch, pool, 300)[1], pool, suffix, attn))
    stats = {}
    graphs = DecodeGraphs(model, suffix, attn, stats)
    first, again = graphs(batch, pool), graphs(batch, pool)  # capture + replay, then replay
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)  # the same kernels (cuBLAS may pick others in capture)
    assert torch.equal(again, first)
    assert stats == {"graph_captures": 1, "graph_replays": 2}
    prompts, seeds = prompts_and_seeds(6, 3, seed=5)
    eos = frequent_tokens(model, prompts, seeds, 4)
    runs = [S.SamplingParams(max_new_tokens=12, temperature=1.0, eos_token_ids=eos, decode_slots=5, cuda_graphs=g)
            for g in (False, True)]
    out = [S.generate(model, prompts, seeds, p) for p in runs]
    assert [[c.tokens for c in cs] for cs in out[0]] == [[c.tokens for c in cs] for cs in out[1]]
    assert runs[1].stats["graph_replays"] == runs[1].stats["decode_steps"] > runs[1].stats["graph_captures"] >= 1


def test_suffix_attention_chunks_past_a_row_change_nothing():
    """A row's suffix attention is bit-identical whether the batch reads one chunk of keys or several (other rows
    reach further); and it is softmax attention over the row's first lengths[m] keys."""
    from sealong.sample.kv_cache import suffix_attention

    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 11, 2, 8), torch.randn(3, 11, 2, 8)
    short = suffix_attention(q[:1], k[:1], v[:1], torch.tensor([3]), 3, 0.3, chunk=4)
    mixed = suffix_attention(q, k, v, torch.tensor([3, 11, 6]), 11, 0.3, chunk=4)
    assert torch.equal(mixed[0][:1], short[0]) and torch.equal(mixed[1][:, :1], short[1])
    for m, n in enumerate([3, 11, 6]):
        kk, vv = k[m, :n].repeat_interleave(2, dim=1), v[m, :n].repeat_interleave(2, dim=1)  # GQA: head h reads h // 2
        s = torch.einsum("hd,shd->hs", q[m], kk) * 0.3
        assert torch.allclose(mixed[0][m], torch.einsum("hs,shd->hd", s.softmax(-1), vv), atol=1e-6)
        assert torch.allclose(mixed[1][:, m], s.logsumexp(-1), atol=1e-6)
