"""The shared-prefix sampler against a naive sampler that repeats the prompt per sample, and the sampling stage."""

import json
import os

import pytest
import torch
from tiny_checkpoint import build_checkpoint, one_thread  # noqa: F401 (autouse fixture)

from sealong.config.fields import ConfigError
from sealong.config.parser import resolve
from sealong.sample import sampler as S
from sealong.jsonl import JsonlError, completed_ids, read_jsonl
from sealong.model import eos_token_ids, load_model, load_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, dtype=torch.float32)


def naive_generate(model, prompt, seeds, params):
    """The prompt repeated for every sample: a full forward over prompt + generated tokens at every step."""
    out = []
    for seed in seeds:
        tokens, lp_sum, reason = [], 0.0, "length"
        for step in range(params.max_new_tokens):
            ids = torch.tensor(prompt + tokens, device=model.lm_head.weight.device)
            with torch.no_grad():
                logits = model(ids, torch.arange(len(ids)), return_logits=True)[-1:]
            tok, lp = S.choose_tokens(logits, S.uniform(torch.tensor([seed], device=ids.device), step), params)
            tokens.append(int(tok))
            lp_sum += float(lp)
            if int(tok) in params.eos_token_ids:
                reason = "stop"
                break
        out.append((tokens, reason, lp_sum))
    return out


def count_embedded(model):
    """Forward hook counting every token that enters the model (prefill and decode)."""
    counter = {"tokens": 0}
    handle = model.model.embed_tokens.register_forward_hook(lambda m, inp, out: counter.__setitem__("tokens", counter["tokens"] + inp[0].numel()))
    return counter, handle


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.9, 1.0, 0), (0.7, 0.9, 20)])
def test_shared_prefix_equals_naive(model, temperature, top_p, top_k):
    prompts = [torch.randint(0, 96, (23,)).tolist(), torch.randint(0, 96, (9,)).tolist()]
    seeds = [[11, 12, 13], [21, 22]]
    params = S.SamplingParams(max_new_tokens=7, temperature=temperature, top_p=top_p, top_k=top_k,
                              eos_token_ids=(2, 3), prefill_chunk=8)
    counter, handle = count_embedded(model)
    try:
        got = S.generate(model, prompts, seeds, params)
    finally:
        handle.remove()
    # every prompt token entered the model once (not once per sample); then one token per slot per decode step
    # (5 slots: all samples of the call), of which the live samples' are the tokens chosen and fed back
    assert counter["tokens"] == 23 + 9 + 5 * params.stats["decode_steps"]
    assert params.stats["prefill_tokens"] == 32
    assert params.stats["decode_tokens"] == params.stats["busy_slot_steps"] == sum(len(c.tokens) for cs in got for c in cs)
    assert params.stats["slot_steps"] == 5 * max(len(c.tokens) for cs in got for c in cs)
    for prompt, ss, completions in zip(prompts, seeds, got):
        for (tokens, reason, lp), c in zip(naive_generate(model, prompt, ss, params), completions):
            assert c.tokens == tokens and c.finish_reason == reason
            assert abs(c.logprob_sum - lp) < 1e-4
            assert (reason == "stop") == (tokens[-1] in (2, 3)) and (reason == "stop" or len(tokens) == 7)


def test_same_seed_same_output_whatever_the_batch(model):
    a, b = torch.randint(0, 96, (17,)).tolist(), torch.randint(0, 96, (30,)).tolist()
    params = S.SamplingParams(max_new_tokens=6, temperature=1.0, eos_token_ids=(2,))
    alone = S.generate(model, [a], [[5, 6]], params)[0]
    together = S.generate(model, [b, a], [[7, 8, 9], [5, 6]], params)[1]
    assert [c.tokens for c in alone] == [c.tokens for c in together]


def test_eos_and_max_length_stops(model):
    prompt = torch.randint(0, 96, (12,)).tolist()
    free = S.generate(model, [prompt], [[1, 2, 3, 4]], S.SamplingParams(max_new_tokens=5, temperature=1.0))[0]
    assert all(c.finish_reason == "length" and len(c.tokens) == 5 for c in free)
    stop_tok = free[0].tokens[2]  # make the third token of sample 0 an EOS id
    stopped = S.generate(model, [prompt], [[1, 2, 3, 4]], S.SamplingParams(max_new_tokens=5, temperature=1.0, eos_token_ids=(stop_tok,)))[0]
    for c, f in zip(stopped, free):
        cut = f.tokens.index(stop_tok) + 1 if stop_tok in f.tokens else 5
        assert c.tokens == f.tokens[:cut]
        assert c.finish_reason == ("stop" if stop_tok in f.tokens else "length")
    assert stopped[0].finish_reason == "stop" and len(stopped[0].tokens) <= 3


def test_greedy_and_chunked_prefill(model):
    prompt = torch.randint(0, 96, (29,)).tolist()
    greedy = S.SamplingParams(max_new_tokens=4, temperature=0.0, prefill_chunk=4)
    out = S.generate(model, [prompt], [[1, 2]], greedy)[0]
    want = naive_generate(model, prompt, [0], greedy)[0][0]
    assert out[0].tokens == out[1].tokens == want


def test_triton_backend_matches_reference(model):
    """Triton prefix-decode and flash-attention prefill (interpreted on CPU) give the reference's tokens."""
    prompt = torch.randint(0, 96, (21,)).tolist()
    runs = [S.generate(model, [prompt], [[3, 4]], S.SamplingParams(max_new_tokens=3, temperature=0.8, backend=b))[0]
            for b in ("reference", "triton")]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]]


def test_uniform_is_counter_based():
    seeds = torch.tensor([S.sample_seed(0, "q1", i) for i in range(4000)])
    u = S.uniform(seeds, 3)
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.03 and abs((u < 0.1).double().mean().item() - 0.1) < 0.03
    assert torch.equal(S.uniform(seeds[7:9], 3), u[7:9])  # a row's number depends on its seed and step only
    assert not torch.equal(S.uniform(seeds, 4), u)
    assert S.sample_seed(0, "q1", 0) != S.sample_seed(0, "q1", 1) != S.sample_seed(1, "q1", 1)


def test_choose_tokens_truncation():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).repeat(200, 1)
    u = torch.rand(200, dtype=torch.float64)
    top1 = S.choose_tokens(logits, u, S.SamplingParams(temperature=1.0, top_k=1))[0]
    assert (top1 == 1).all()
    top2 = S.choose_tokens(logits, u, S.SamplingParams(temperature=1.0, top_p=0.6))[0]
    assert set(top2.tolist()) == {1, 2}  # p(1) ~ 0.49 < 0.6: the nucleus needs tokens 1 and 2
    greedy, logp = S.choose_tokens(logits, u, S.SamplingParams(temperature=0.0))
    assert (greedy == 1).all() and torch.allclose(logp, torch.log_softmax(logits, -1)[:, 1])


def write_prompts(path, n=3):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "context": "passage 1 : paris is a city " * (i + 1), "question": "where is paris ?",
                                "answers": ["paris"]}) + "\n")


def stage_args(ckpt, tmp_path, *extra):
    return resolve("sample", ["--model", ckpt, "--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "samples.jsonl"),
                                "--num-samples", "3", "--max-new-tokens", "4", "--dtype", "float32", "--device", "cpu",
                                "--batch-prompts", "2", *extra]).cfg


def test_stage_writes_and_resumes(ckpt, tmp_path):
    write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "samples.jsonl"
    assert S.run(stage_args(ckpt, tmp_path)) == 0
    records = list(read_jsonl(out))
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]
    tokenizer = load_tokenizer(ckpt)
    for r in records:
        assert "context" not in r and r["answers"] == ["paris"] and r["question"] == "where is paris ?"
        assert len(r["outputs"]) == len(r["num_tokens"]) == len(r["finish_reasons"]) == len(r["logprob_sum"]) == 3
        assert r["logprob_count"] == r["num_tokens"] and all(1 <= n <= 4 for n in r["num_tokens"])
        assert all(s <= 0 for s in r["logprob_sum"]) and not r["truncated"]
        for n, reason in zip(r["num_tokens"], r["finish_reasons"]):
            assert reason == ("length" if n == 4 else "stop")
    assert eos_token_ids(ckpt, tokenizer) == [2, 3]
    # crash after the first record, in the middle of writing the second: resume redoes only what is missing
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:15])
    assert completed_ids(str(out)) == {"q0"}
    assert S.run(stage_args(ckpt, tmp_path)) == 0
    again = list(read_jsonl(out))  # same seeds -> the same samples again (q1 now shares its batch with q2)
    assert [r["outputs"] for r in again] == [r["outputs"] for r in records]
    for r, r0 in zip(again, records):
        assert r["num_tokens"] == r0["num_tokens"] and r["logprob_sum"] == pytest.approx(r0["logprob_sum"], rel=1e-5)
    assert S.run(stage_args(ckpt, tmp_path)) == 0 and len(out.read_text().splitlines()) == 3
    new_dir = tmp_path / "new" / "samples.jsonl"  # an output folder that does not exist yet is created
    assert S.run(stage_args(ckpt, tmp_path, "--output", str(new_dir), "--limit", "1")) == 0
    assert [r["outputs"] for r in read_jsonl(new_dir)] == [records[0]["outputs"]]


def test_stage_long_prompt_error_or_middle_truncation(ckpt, tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", n=2)
    with pytest.raises(ValueError, match="prompt 'q0' has .* tokens, over the limit of 30"):
        S.run(stage_args(ckpt, tmp_path, "--max-prompt-tokens", "30"))
    assert S.run(stage_args(ckpt, tmp_path, "--max-prompt-tokens", "30", "--truncate", "middle")) == 0
    records = list(read_jsonl(tmp_path / "samples.jsonl"))
    assert [r["prompt_tokens"] for r in records] == [30, 30] and all(r["truncated"] for r in records)
    assert S.fit_prompt(list(range(10)), 5, True, "x") == ([0, 1, 7, 8, 9], True)
    with pytest.raises(ValueError, match="no room for a prompt: --max-new-tokens 5000"):
        S.run(stage_args(ckpt, tmp_path, "--max-new-tokens", "5000", "--output", str(tmp_path / "other.jsonl")))


@pytest.mark.parametrize("flags, message", [
    (["--limit", "0"], "limit must be >= 1, got 0"),  # 0 and -1 sampled one prompt
    (["--limit=-1"], "limit must be >= 1, got -1"),
    (["--max-prompt-tokens", "0"], "max_prompt_tokens must be >= 1, got 0"),  # 0 was silently "no limit"
    (["--temperature", "nan"], "temperature: must be a finite number"),  # NaN sampled garbage, saved as real
    (["--temperature=-1"], "temperature must be >= 0"),
    (["--top_p", "0"], "top_p must be > 0"),
])
def test_stage_option_values_checked_before_any_work(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        stage_args("no-model", tmp_path, *flags)


def test_read_prompts_limit(tmp_path):
    write_prompts(tmp_path / "p.jsonl", n=3)
    assert [len(S.read_prompts(str(tmp_path / "p.jsonl"), n)) for n in (None, 0, 1, 5)] == [3, 0, 1, 3]


def test_bad_prompts_file_named(ckpt, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "context": "c", "question": "q"}\n{"id": "b", "context": "c"}\n')
    with pytest.raises(JsonlError, match=r"prompts.jsonl:2: missing field\(s\) 'question'"):
        S.run(stage_args(ckpt, tmp_path))
    path.write_text('{"id": "a", "context": "c", "question": "q"}\n{"id": "a", "context": "c", "question": "q"}\n')
    with pytest.raises(JsonlError, match="duplicate id 'a'"):
        S.run(stage_args(ckpt, tmp_path))
    path.write_text('{"id": "a", "context": "c", "question": "q"}\n{"id": "b", "context": null, "question": "q"}\n')
    with pytest.raises(JsonlError, match=r"prompts.jsonl:2: \(id 'b'\) 'context' must be a string"):
        S.run(stage_args(ckpt, tmp_path))
    assert not os.path.exists(tmp_path / "samples.jsonl")


@pytest.mark.gpu
def test_shared_prefix_equals_naive_gpu(ckpt):
    """On CUDA (Triton prefill and prefix-decode kernels, several key splits), float32: the naive sampler's tokens."""
    model = load_model(ckpt, dtype=torch.float32, device="cuda")
    prompts = [torch.randint(0, 96, (700,)).tolist(), torch.randint(0, 96, (37,)).tolist()]
    seeds = [[1, 2, 3, 4], [5, 6]]
    params = S.SamplingParams(max_new_tokens=6, temperature=0.8, eos_token_ids=(2, 3), prefill_chunk=256)
    got = S.generate(model, prompts, seeds, params)
    for prompt, ss, completions in zip(prompts, seeds, got):
        for (tokens, reason, lp), c in zip(naive_generate(model, prompt, ss, params), completions):
            assert c.tokens == tokens and c.finish_reason == reason


@pytest.mark.gpu
def test_bfloat16_sampling_runs_gpu(ckpt):
    model = load_model(ckpt, dtype=torch.bfloat16, device="cuda")
    params = S.SamplingParams(max_new_tokens=16, temperature=0.7, eos_token_ids=(2, 3))
    got = S.generate(model, [torch.randint(0, 96, (300,)).tolist()], [list(range(8))], params)[0]
    assert all(1 <= len(c.tokens) <= 16 and all(0 <= t < 96 for t in c.tokens) and c.logprob_sum <= 0 for c in got)
    assert params.stats["prefill_tokens"] == 300


# ---------------------------------------------------------------------------------------------- token choice


SETTINGS = [(0.7, 1.0, 0), (1.0, 0.9, 0), (0.7, 0.999, 0), (1.3, 0.5, 0), (0.7, 1.0, 20), (1.0, 0.8, 50), (0.0, 1.0, 0)]


def tied_logits(rows, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 2
    h = vocab // 4
    logits[:, :h] = logits[:, h : 2 * h]  # values twice: ties at the cuts
    return logits


@pytest.mark.parametrize("temperature, top_p, top_k", SETTINGS)
def test_choose_tokens_is_the_reference_rule(temperature, top_p, top_k):
    """Fixed seeds: the tokens of choose_tokens (no sort without top-k / top-p, candidates only with them) are
    those of the full-sort rule (choose_tokens_reference), ties included; V = 700 makes top-p alone grow its
    candidates past the first 256; log-probabilities within float32 rounding."""
    p = S.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    for vocab, seed in ((7, 1), (700, 2)):
        logits, u = tied_logits(300, vocab, seed), torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        got, lp = S.choose_tokens(logits, u, p)
        want, lp_want = S.choose_tokens_reference(logits, u, p)
        assert torch.equal(got, want)
        assert torch.allclose(lp, lp_want, atol=2e-6)


@pytest.mark.parametrize("temperature, top_p, top_k", SETTINGS[:-1])
def test_choose_tokens_distribution(temperature, top_p, top_k):
    """u on a grid of G points: each token is chosen for a share of the grid within 1/G of its probability under
    the rule written from the definition in float64 (temperature, the top-k tokens, the nucleus of the sorted
    distribution, renormalized), so the draw is that distribution, not only some token of the kept set."""
    grid = 20000
    logits = tied_logits(1, 300, 3).double()
    z = logits[0] / temperature
    order = sorted(range(300), key=lambda i: (-float(z[i]), i))  # descending, ties: lower id first
    kept = order[:top_k] if top_k else order
    probs = torch.softmax(z[kept], 0)
    before = probs.cumsum(0) - probs
    want = torch.zeros(300, dtype=torch.float64)
    want[kept] = probs.masked_fill(before >= top_p, 0.0)
    want /= want.sum()
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    got, _ = S.choose_tokens(logits.float().expand(grid, 300), u, S.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k))
    share = torch.bincount(got, minlength=300).double() / grid
    assert (share - want).abs().max() <= 1.0 / grid + 1e-9
    assert (want > 0).sum() > 1  # a real distribution, not a single token


class StepCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Per phase: every op call, and each tensor an op returns that is not a view of its inputs (op, shape, dtype),
    and the host synchronizations (bench.op_counts.is_sync). Ops outside a phase (phase None) are not counted."""

    def __init__(self):
        super().__init__()
        self.phase, self.calls, self.new, self.syncs = None, [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        from bench.op_counts import is_sync

        out = func(*args, **(kwargs or {}))
        if self.phase is None:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.calls.append(self.phase)
        self.syncs += [self.phase] if is_sync(func, args, kwargs) else []
        self.new += [(self.phase, str(func), tuple(t.shape), t.dtype) for t in tree_leaves(out)
                     if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


def counted(counter, phase, fn):
    def run(*args, **kwargs):
        counter.phase = phase
        try:
            return fn(*args, **kwargs)
        finally:
            counter.phase = None
    return run


VOCAB_SIZED = {(1.0, 0): 3, (1.0, 20): 10, (0.9, 0): 10}  # [slots x V] tensors choose_tokens makes per step


@pytest.mark.parametrize("top_p, top_k", [(1.0, 0), (1.0, 20), (0.9, 0)])
def test_decode_step_counts(tmp_path, monkeypatch, top_p, top_k):
    """Per decode step (4 slots, V = 512, 2 layers, 9 new tokens), counted from the ops, never timed. The token
    choice: no full-vocabulary sort (none without top-p; with it one sort of at most 256 candidates per row), few
    [slots x V] tensors (3 without top-k / top-p: logits / temperature, softmax, the float64 CDF; the full-sort
    rule makes 7), no host synchronization without top-p (with it one scalar read: do the candidates hold the
    nucleus). The decode step (sealong.sample.cpu_decode.decode_step_sdpa): no host synchronization, no factory
    allocation as large as a layer's suffix cache (no cache or [slots x keys] mask rebuilt; the suffix masks are
    built once per step for all layers), at most 160 ops per layer (the whole layer, norms and MLP included)."""
    model = load_model(build_checkpoint(tmp_path, vocab_size=512), dtype=torch.float32)
    counter = StepCounter()
    monkeypatch.setattr(S, "decode_step_sdpa", counted(counter, "decode", S.decode_step_sdpa))
    monkeypatch.setattr(S, "choose_tokens", counted(counter, "choose", S.choose_tokens))
    params = S.SamplingParams(max_new_tokens=9, temperature=0.7, top_p=top_p, top_k=top_k)
    with counter:
        S.generate(model, [list(range(5, 40))], [[1, 2, 3, 4]], params)
    steps = params.stats["decode_steps"]
    assert steps == 8  # the first token comes from the prefill's logits; 9 choices in all
    new = lambda phase: [r[1:] for r in counter.new if r[0] == phase]  # noqa: E731
    sorts = [shape for op, shape, _ in new("choose") if op.startswith("aten.sort")]
    assert all(shape == (4, 256) for shape in sorts) and len(sorts) == (2 * 9 if top_p < 1 else 0)  # values, ids
    vocab_sized = sum(shape == (4, 512) for _, shape, _ in new("choose"))
    assert vocab_sized <= VOCAB_SIZED[top_p, top_k] * 9, vocab_sized
    assert counter.syncs.count("choose") == (9 if top_p < 1 else 0) and counter.syncs.count("decode") == 0
    cache = 4 * 9 * model.config.num_key_value_heads * model.config.head_dim  # slots x L x Hkv x D
    factories = ("aten.empty", "aten.zeros", "aten.full", "aten.ones", "aten.new_")
    assert not [r for r in new("decode") if r[0].startswith(factories) and torch.Size(r[1]).numel() >= cache]
    assert counter.calls.count("decode") <= 160 * model.config.num_hidden_layers * steps  # measured 155.5


def test_decode_step_sdpa_equals_decode_step(model):
    """The CPU decode step (sealong.sample.cpu_decode.decode_step_sdpa) gives the hidden states and the suffix writes of
    kv_cache.decode_step with the reference attention, for slots in order, permuted, and with idle slots, over two
    prompts of the pool (float32, within 1e-5)."""
    from sealong.sample.cpu_decode import decode_step_sdpa
    from sealong.sample.kv_cache import DecodeBatch, PrefixPool, SuffixCache, decode_step, prefill, prefix_attention_fn

    pool = PrefixPool(model, "cpu", torch.float32)
    a, b = torch.randint(0, 96, (13,)).tolist(), torch.randint(0, 96, (6,)).tolist()
    prefill(model, [a], pool.add(13), 8)
    prefill(model, [b], pool.add(6), 8)
    for rows in ([0, 1, 2, 3], [0, 3, 1, 2], [4, 0, 4, 1]):  # row 4: a sample not decoding
        suffixes = [SuffixCache.allocate(model, 4, 5, "cpu", torch.float32) for _ in range(2)]
        for t, u in zip(suffixes[0].k + suffixes[0].v, suffixes[1].k + suffixes[1].v):
            t.copy_(torch.randn(t.shape))
            u.copy_(t)
        batch = DecodeBatch(torch.tensor([5, 6, 7, 8]), torch.tensor([15, 14, 8, 9]), torch.tensor([2, 1, 2, 3]),
                            torch.tensor(rows), torch.tensor([0, 2, 4], dtype=torch.int32), 2, 4)
        want = decode_step(model, batch, pool, suffixes[0], prefix_attention_fn("cpu", "reference"))
        got = decode_step_sdpa(model, batch, pool, suffixes[1])
        live = [s for s in range(4) if s in rows]
        assert torch.allclose(got[live], want[live], atol=1e-5, rtol=1e-5)
        assert all(torch.equal(x, y) for x, y in zip(suffixes[0].k + suffixes[0].v, suffixes[1].k + suffixes[1].v))

