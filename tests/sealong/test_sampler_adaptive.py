"""Beyond the paper, in the sampler: self-certainty recorded during decoding, and the adaptive sample count."""

import json
import math

import pytest
import torch
from size_recorder import SizeRecorder
from torch.utils._pytree import tree_leaves
from test_sampler_batching import frequent_tokens, prompts_and_seeds
from tiny_checkpoint import build_checkpoint, one_thread  # noqa: F401 (autouse fixture)

from sealong.config.fields import ConfigError
from sealong.config.parser import resolve
from sealong.jsonl import read_jsonl
from sealong.model import load_model
from sealong.sample import sampler as S
from sealong.score.consensus import answer_consensus, reached


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny"))


def certainty_float64(model, prompt, tokens):
    """Self-certainty from the full logits of a teacher-forced forward over prompt + tokens, in float64:
    mean over the sampled tokens of KL(U || p_t) = -log V - mean_v log p_t(v)."""
    ids = torch.tensor(prompt + tokens)
    with torch.no_grad():
        logits = model(ids, torch.arange(len(ids)), return_logits=True)
    logp = torch.log_softmax(logits[len(prompt) - 1 : len(ids) - 1].double(), dim=-1)  # the logits each token came from
    return float((-logp.mean(-1) - math.log(logp.shape[-1])).mean())


def test_self_certainty_equals_float64_reference(ckpt):
    """The sampler's float32 self-certainty against float64 from the full logits of a teacher-forced forward:
    relative 1e-6 (measured 1.3e-7: each float32 log p_t(v) is rounded to ~2^-24 (|z_v| + logsumexp), and the
    decode path's logits differ from the full forward's by float32 rounding). The reduction itself is exact in
    float64 (choose_tokens on float64 logits)."""
    model = load_model(ckpt, dtype=torch.float32)
    prompts, seeds = prompts_and_seeds(3, 3, seed=5)
    eos = (4, 9)
    params = S.SamplingParams(max_new_tokens=9, temperature=1.0, eos_token_ids=eos, decode_slots=4)
    got = S.generate(model, prompts, seeds, params)
    values = []
    for prompt, completions in zip(prompts, got):
        for c in completions:
            want = certainty_float64(model, prompt, c.tokens)
            assert c.self_certainty == pytest.approx(want, rel=1e-6)
            values.append(want)
    assert min(values) > 0 and max(values) - min(values) > 1e-3  # a KL, and not the same for every sample
    logits = torch.randn(5, 96, dtype=torch.float64)  # choose_tokens' third output alone, against the definition
    kl = S.choose_tokens(logits, torch.rand(5, dtype=torch.float64), params, certainty=True)[2]
    p = torch.softmax(logits, -1)
    assert torch.allclose(kl, (torch.log(1 / 96 / p) / 96).sum(-1), rtol=1e-12)


class NewMemoryRecorder(SizeRecorder):
    """SizeRecorder leaving out views of an op's inputs (lm_head's `t` of the [V, H] weight is no new memory)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
                    and t.numel() * t.element_size() > self.largest[0]):
                self.largest = (t.numel() * t.element_size(), str(func))
        return out


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sampler_memory_is_one_steps_logits(tmp_path, temperature):
    """V = 4096 (logits dominate the KV caches): the largest tensor the sampler makes is one step's [slots x V]
    (8 bytes per entry when sampling: the float64 CDF of the inverse-CDF draw; 4 when greedy: the float32 logits), the same for 4 or 16 samples per prompt and 8 or 24 new tokens; the self-certainty
    keeps one float per sample."""
    model = load_model(build_checkpoint(tmp_path, vocab_size=4096), dtype=torch.float32)
    slots, vocab = 4, 4096
    largest = []
    for n, new in ((4, 8), (16, 24)):
        prompts, seeds = prompts_and_seeds(2, n, lo=8, hi=12, seed=6)
        params = S.SamplingParams(max_new_tokens=new, temperature=temperature, decode_slots=slots)
        with NewMemoryRecorder() as rec:
            got = S.generate(model, prompts, seeds, params)
        assert sum(len(c.tokens) for cs in got for c in cs) == 2 * n * new  # no EOS: every sample ran to the end
        largest.append(rec.largest[0])
        kv = 2 * model.config.num_hidden_layers * slots * new * model.config.num_key_value_heads * model.config.head_dim * 4
        assert kv < slots * vocab * 4  # the shapes make the logits the largest honest candidate
    assert largest == [slots * vocab * (8 if temperature else 4)] * 2


def fixed_and_adaptive(model, block, stop_at, slots=5, n=8):
    """The same prompts and seeds with all n samples, and adaptively with `more` = fewer than stop_at[key] spent."""
    prompts, seeds = prompts_and_seeds(4, n, seed=7)
    eos = frequent_tokens(model, prompts, seeds, 4)
    fixed = S.SamplingParams(max_new_tokens=10, temperature=1.0, eos_token_ids=eos, decode_slots=slots)
    want = S.generate(model, prompts, seeds, fixed)
    asked = []

    def more(key, completions):
        assert all(c.finish_reason == "stop" or len(c.tokens) == 10 for c in completions)  # all finished
        asked.append((key, len(completions), adaptive.stats["prefill_tokens"]))
        return len(completions) < stop_at[key]

    adaptive = S.SamplingParams(max_new_tokens=10, temperature=1.0, eos_token_ids=eos, decode_slots=slots)
    got = S.generate(model, prompts, seeds, adaptive, block=block, more=more)
    return prompts, want, got, asked, fixed, adaptive


def test_adaptive_outputs_are_the_first_spent_of_fixed_n(ckpt):
    """Blocks of 3 of N = 8 (3, 6, then 8), 5 slots: each prompt's outputs are exactly the first `spent` of the
    fixed-N run (counter-based seeds, batch-invariant products on the CPU in float32), every prompt prefilled
    once, `more` asked after each finished block only, and other prompts decode while a block finishes."""
    model = load_model(ckpt, dtype=torch.float32)
    stop_at = {0: 3, 1: 8, 2: 6, 3: 1}
    prompts, want, got, asked, fixed, adaptive = fixed_and_adaptive(model, 3, stop_at)
    spent = [3, 8, 6, 3]
    assert [len(cs) for cs in got] == spent
    for w, g, m in zip(want, got, spent):
        assert [(c.tokens, c.logprob_sum, c.certainty_sum, c.finish_reason) for c in g] == \
               [(c.tokens, c.logprob_sum, c.certainty_sum, c.finish_reason) for c in w[:m]]
    assert adaptive.stats["prefill_tokens"] == fixed.stats["prefill_tokens"] == sum(map(len, prompts))
    assert sorted((k, m) for k, m, _ in asked) == [(0, 3), (1, 3), (1, 6), (2, 3), (2, 6), (3, 3)]
    assert asked[0][2] > len(prompts[0])  # prompt 0's first block was still decoding when the next prompt came in
    assert adaptive.stats["decode_tokens"] == sum(len(c.tokens) for cs in got for c in cs) < fixed.stats["decode_tokens"]


def test_blocks_without_a_stop_rule_give_all_n(ckpt):
    model = load_model(ckpt, dtype=torch.float32)
    _, want, got, asked, _, _ = fixed_and_adaptive(model, 4, {k: 99 for k in range(4)}, slots=6)
    assert [[c.tokens for c in cs] for cs in got] == [[c.tokens for c in cs] for cs in want]
    assert len(asked) == 4  # after 4 of 8 only: never more than N
    with pytest.raises(ValueError, match="block must be >= 0"):
        S.generate(model, [[1, 2]], [[1]], S.SamplingParams(max_new_tokens=2), block=-1)


def write_prompts(path, n=5):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "context": "paris is a city . london is a city . " * (i + 1),
                                "question": "where is paris ?", "answers": ["paris"]}) + "\n")


def stage(ckpt, tmp_path, out, *extra):
    return resolve("sample", ["--model", ckpt, "--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(out),
                              "--num-samples", "6", "--max-new-tokens", "3", "--dtype", "float32", "--device", "cpu",
                              "--decode-slots", "7", "--temperature", "0.4", *extra]).cfg


def test_stage_adaptive_records_and_settings(ckpt, tmp_path):
    """The stage: records of the adaptive run are the fixed run's first `spent` outputs, spent being where the
    consensus rule (blocks of 2, share 0.75 of at least 2) first holds on the records' own texts; adaptive_stop
    says why; self_certainty is recorded; the adaptive settings are in the meta file only when on, so a fixed
    run's output cannot be resumed adaptively."""
    write_prompts(tmp_path / "prompts.jsonl")
    fixed_out, adaptive_out = tmp_path / "fixed.jsonl", tmp_path / "adaptive.jsonl"
    assert S.run(stage(ckpt, tmp_path, fixed_out)) == 0
    flags = ("--adaptive-block", "2", "--adaptive-share", "0.75", "--adaptive-min-samples", "2")
    assert S.run(stage(ckpt, tmp_path, adaptive_out, *flags)) == 0
    fixed, adaptive = list(read_jsonl(fixed_out)), list(read_jsonl(adaptive_out))
    stops = []
    for f, a in zip(fixed, adaptive):
        spent = next((m for m in (2, 4) if reached(answer_consensus(f["outputs"][:m]), 0.75, 2)), 6)
        assert a["outputs"] == f["outputs"][:spent] and a["self_certainty"] == f["self_certainty"][:spent]
        stop = "consensus" if reached(answer_consensus(a["outputs"]), 0.75, 2) else "budget"
        assert a["adaptive_stop"] == stop and "adaptive_stop" not in f
        stops.append((spent, stop))
        assert len(f["self_certainty"]) == 6 and all(s > 0 for s in f["self_certainty"])
    assert min(s for s, _ in stops) < 6 == max(s for s, _ in stops), stops  # some prompts stopped early, others spent N
    meta = lambda p: json.loads(open(f"{p}.meta.json").read())["settings"]  # noqa: E731
    assert "adaptive_block" not in meta(fixed_out)
    assert meta(adaptive_out)["adaptive_block"] == 2 and meta(adaptive_out)["adaptive_share"] == 0.75
    with pytest.raises(Exception, match="adaptive_block"):
        S.run(stage(ckpt, tmp_path, fixed_out, *flags))


def test_stage_adaptive_never_stops_on_a_cluster_of_one(ckpt, tmp_path):
    """The issue's settings (blocks of 2, share 0.5, at least 2 samples): a prompt whose first two samples give
    two different answers samples on; a "consensus" stop always has >= 2 agreeing outputs."""
    write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "adaptive.jsonl"
    flags = ("--adaptive-block", "2", "--adaptive-share", "0.5", "--adaptive-min-samples", "2", "--temperature", "1")
    assert S.run(stage(ckpt, tmp_path, out, *flags)) == 0
    records = list(read_jsonl(out))
    split = [r for r in records if answer_consensus(r["outputs"][:2]).top_size < 2]
    assert split, [r["outputs"] for r in records]  # the tiny model's first two samples disagree somewhere
    assert all(len(r["outputs"]) > 2 for r in split)
    for r in records:
        c = answer_consensus(r["outputs"])
        assert r["adaptive_stop"] == ("consensus" if c.top_size >= 2 and c.top_size / c.answered >= 0.5 else "budget")


@pytest.mark.parametrize("flags, message", [
    (["--adaptive-block", "7"], r"adaptive_block \(7\) must be <= num_samples \(6\)"),
    (["--adaptive-block", "2", "--adaptive-min-samples", "9"], r"adaptive_min_samples \(9\) must be <= num_samples"),
    (["--adaptive-block=-1"], "adaptive_block must be >= 0"),
    (["--adaptive-share", "1.5"], "adaptive_share must be <= 1"),
    (["--adaptive-min-samples", "0"], "adaptive_min_samples must be >= 1"),
])
def test_adaptive_options_checked(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        stage("no-model", tmp_path, tmp_path / "o.jsonl", *flags)


def test_eval_of_an_adaptive_samples_file_reports_at_spent():
    """`sealong eval` on records with different numbers of outputs: the @n modes go up to the smallest count,
    the @spent modes use each question's own outputs (MBR among them, never a truncated one)."""
    from sealong.evaluate.report import evaluate, markdown_table

    records = [
        {"id": "a", "dataset": "t", "answers": ["paris"], "num_tokens": [3] * 5, "finish_reasons": ["stop"] * 5,
         "outputs": ["the answer is rome", "the answer is paris", "the answer is paris", "the answer is paris",
                     "the answer is lyon"]},
        {"id": "b", "dataset": "t", "answers": ["blue"], "num_tokens": [2, 2], "finish_reasons": ["stop", "length"],
         "outputs": ["the answer is red", "the answer is blue"]},
    ]
    res = evaluate(None, records, mbr=True)
    avg = res["average"]
    assert res["ns"] == [1, 2]
    assert avg["oracle@2"]["subem"] == 100 and avg["oracle@spent"]["subem"] == 100
    assert avg["random@spent"]["subem"] == pytest.approx(100 * (3 / 5 + 1 / 2) / 2)
    assert avg["MBR@2"]["subem"] == 0  # a: rome vs paris tie goes to the first; b: blue was cut off
    assert avg["MBR@spent"]["subem"] == 50  # a: the paris cluster among 5
    assert list(avg)[-1] == "random@spent" and "MBR@spent" in markdown_table(res)
