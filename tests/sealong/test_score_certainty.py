"""The score stage's certainty scorers (--scorer self-certainty / mbr+certainty), the consensus filter
(--min-consensus) and the per-record agreement fields (consensus, distinct_answers, score_margin)."""

import json
import re

import pytest
import torch

from test_mbr_stage import PARIS, SAMPLES, _read, _write

from sealong.config.fields import ConfigError
from sealong.jsonl import JsonlError
from sealong.score import mbr
from sealong.score.consensus import answer_consensus

# one self-certainty per output (the sampler writes them); empty outputs may hold anything
CERTAIN = {"q1": [2.0, 0.5, 4.0, 1.0, 0.25], "q2": [1.5, None, 3.0, 0.75], "q3": [1.0], "q4": [0.0, 0.0], "q5": []}
WITH_CERTAINTY = [dict(r, self_certainty=CERTAIN[r["id"]]) for r in SAMPLES]


def _score(tmp_path, records, name="o", **cfg):
    samples = _write(tmp_path / f"{name}_samples.jsonl", records)
    out = str(tmp_path / f"{name}.jsonl")
    counts = mbr.score_file(samples, out, mbr.ScoreConfig(**cfg), log=None)
    return counts, {r["id"]: r for r in _read(out)}


def test_self_certainty_scorer_picks_the_most_certain_finished_output(tmp_path):
    _, rows = _score(tmp_path, WITH_CERTAINTY, scorer="self-certainty", utility="answer", dedup_threshold=0)
    assert rows["q1"]["scores"] == CERTAIN["q1"] and rows["q1"]["chosen"] == 2  # "Lyon", the most certain
    assert rows["q1"]["rejected"] in (1, 4)  # lower half of 5: the 2 least certain
    # q2: output 2 is the most certain but cut at the token limit, output 1 is empty (its entry is not read)
    assert rows["q2"]["scores"] == [1.5, None, 3.0, 0.75] and rows["q2"]["chosen"] == 0
    assert rows["q2"]["pair_similarity"] == mbr.rouge_l(SAMPLES[1]["outputs"][0], SAMPLES[1]["outputs"][3])
    assert rows["q1"]["scorer"]["scorer"] == "self-certainty"


def test_self_certainty_embeds_only_the_pairs(tmp_path, monkeypatch):
    embedded = []

    def spy(texts, *args, **kwargs):
        embedded.append(list(texts))
        return real(texts, *args, **kwargs)

    real = mbr.embed
    monkeypatch.setattr(mbr, "embed", spy)
    _, rows = _score(tmp_path, WITH_CERTAINTY, scorer="self-certainty", dedup_threshold=0)
    pairs = [r for r in rows.values() if "pair_similarity" in r]
    assert [r["id"] for r in pairs] == ["q1", "q2"]
    assert embedded == [[r[k] for r in pairs for k in ("chosen_text", "rejected_text")]]  # 4 texts, not 9
    e = real([rows["q1"]["chosen_text"], rows["q1"]["rejected_text"]], None, "cpu", 8)
    assert rows["q1"]["pair_similarity"] == pytest.approx(float(e[0] @ e[1]), abs=1e-6)


@pytest.mark.parametrize("utility", ["rouge", "embedding"])
def test_mbr_certainty_with_equal_certainties_is_mbr_exactly(tmp_path, utility):
    equal = [dict(r, self_certainty=[3.7] * len(r["outputs"])) for r in SAMPLES]
    _, plain = _score(tmp_path, equal, "plain", utility=utility)
    _, weighted = _score(tmp_path, equal, "weighted", utility=utility, scorer="mbr+certainty")
    for qid, row in plain.items():
        assert weighted[qid]["scorer"] == dict(row["scorer"], scorer="mbr+certainty")
        assert dict(weighted[qid], scorer=None) == dict(row, scorer=None)


def _float64_weighted(sim, certainty, valid):
    """s_i = sum_{j valid, j != i} w_j sim_ij / sum_{j valid, j != i} w_j, as a loop."""
    out = []
    for i, ok in enumerate(valid):
        peers = [j for j, v in enumerate(valid) if v and j != i]
        den = sum(certainty[j] for j in peers)
        out.append(sum(certainty[j] * sim(i, j) for j in peers) / den if ok and den > 0 else (0.0 if ok else None))
    return out


def test_mbr_certainty_matches_the_float64_loop(tmp_path):
    _, rows = _score(tmp_path, WITH_CERTAINTY, "rouge", utility="rouge", scorer="mbr+certainty")
    q1 = rows["q1"]
    expect = _float64_weighted(lambda i, j: mbr.rouge_l(PARIS[i], PARIS[j]), CERTAIN["q1"], [True] * 5)
    assert q1["scores"] == pytest.approx(expect, abs=1e-12)
    _, rows = _score(tmp_path, WITH_CERTAINTY, "emb", scorer="mbr+certainty")
    e = mbr.embed(PARIS, None, "cpu", 8).double()
    expect = _float64_weighted(lambda i, j: float(e[i] @ e[j]), CERTAIN["q1"], [True] * 5)
    assert rows["q1"]["scores"] == pytest.approx(expect, abs=1e-5)
    q2 = rows["q2"]  # the empty output 1 is no peer and has no score
    e = mbr.embed([o or "x" for o in SAMPLES[1]["outputs"]], None, "cpu", 8).double()
    expect = _float64_weighted(lambda i, j: float(e[i] @ e[j]), [1.5, 0.0, 3.0, 0.75], [True, False, True, True])
    assert q2["scores"][1] is None and q2["scores"] == pytest.approx(expect, abs=1e-5)


def test_a_confident_minority_outweighs_an_unsure_majority(tmp_path):
    """3 unsure outputs say Lyon, 2 confident ones say Paris: MBR (answer agreement) picks Lyon, with peers
    weighted by certainty Paris: for a Lyon output 2 * 0.1 / (2 * 0.1 + 2 * 5) = 0.02, for a Paris one
    5 / (5 + 3 * 0.1) = 0.94."""
    rec = {"id": "m", "outputs": ["It is Lyon. The answer is Lyon.", "Lyon. Answer: Lyon", "the answer is Lyon",
                                  "The capital is Paris. The answer is Paris.", "Answer: Paris"],
           "self_certainty": [0.1, 0.1, 0.1, 5.0, 5.0]}
    _, plain = _score(tmp_path, [rec], "plain", utility="answer", dedup_threshold=0)
    _, weighted = _score(tmp_path, [rec], "weighted", utility="answer", dedup_threshold=0, scorer="mbr+certainty")
    assert plain["m"]["chosen"] == 0 and plain["m"]["scores"] == [0.5, 0.5, 0.5, 0.25, 0.25]
    assert weighted["m"]["chosen"] == 3 and weighted["m"]["rejected"] in (0, 1, 2)
    assert weighted["m"]["scores"] == pytest.approx([0.2 / 10.2] * 3 + [5 / 5.3] * 2, abs=1e-12)


def test_consensus_filter_skips_and_counts(tmp_path):
    prompts = _write(tmp_path / "prompts.jsonl", [{"id": r["id"], "context": "c"} for r in SAMPLES])
    samples = _write(tmp_path / "samples.jsonl", SAMPLES)
    for threshold, kept in ((0.0, ["q1", "q2"]), (0.6, ["q1"]), (0.61, [])):
        out, pairs = str(tmp_path / f"s{threshold}.jsonl"), str(tmp_path / f"p{threshold}.jsonl")
        counts = mbr.score_file(samples, out, mbr.ScoreConfig(utility="rouge", dedup_threshold=0,
                                                              min_consensus=threshold),
                                pairs=pairs, prompts=prompts, log=None)
        rows = {r["id"]: r for r in _read(out)}
        # q1: Paris 3 of 5 (Lyon, Marseille); q2: "it is four", "four", "five" and an empty output: 1 of 4
        assert [rows[q]["consensus"] for q in ("q1", "q2", "q3", "q4", "q5")] == [0.6, 0.25, 1.0, 0.0, 0.0]
        assert [rows[q]["distinct_answers"] for q in ("q1", "q2", "q3", "q4", "q5")] == [3, 3, 1, 0, 0]
        assert counts.get("skipped: low consensus", 0) == 2 - len(kept) and counts["pairs"] == len(kept)
        assert [p["id"] for p in (_read(pairs) if kept else [])] == kept
        for q in {"q1", "q2"} - set(kept):
            assert rows[q]["skipped"] == f"low consensus ({rows[q]['consensus']:.4f} < {threshold})"
    assert answer_consensus(PARIS).top_share == 0.6


def test_score_margin_is_the_scores_difference(tmp_path):
    samples = _write(tmp_path / "samples.jsonl", WITH_CERTAINTY)
    for scorer in ("mbr", "self-certainty", "mbr+certainty"):
        out, pairs = str(tmp_path / f"{scorer}.jsonl"), str(tmp_path / f"{scorer}_pairs.jsonl")
        mbr.score_file(samples, out, mbr.ScoreConfig(utility="rouge", dedup_threshold=0, scorer=scorer),
                       pairs=pairs, prompts=_write(tmp_path / "p.jsonl", [{"id": r["id"], "context": "c"}
                                                                         for r in SAMPLES]), log=None)
        with_pair = [r for r in _read(out) if "skipped" not in r]
        assert [r["id"] for r in with_pair] == ["q1", "q2"]
        for r in with_pair:
            assert r["score_margin"] == r["scores"][r["chosen"]] - r["scores"][r["rejected"]] >= 0
        assert [p["score_margin"] for p in _read(pairs)] == [r["score_margin"] for r in with_pair]
        assert all("score_margin" not in r for r in _read(out) if r["id"] in ("q3", "q4", "q5"))


def test_score_margin_is_zero_when_the_finished_chosen_scores_below_the_rejected(tmp_path):
    rec = {"id": "t", "outputs": ["a", "b", "c", "d"], "finish_reasons": ["length", "length", "length", "stop"],
           "self_certainty": [4.0, 3.0, 2.0, 1.0]}
    _, rows = _score(tmp_path, [rec], scorer="self-certainty", utility="rouge", dedup_threshold=0)
    assert rows["t"]["chosen"] == 3 and rows["t"]["rejected"] in (1, 2) and rows["t"]["score_margin"] == 0.0


def test_certainty_scorers_need_self_certainty(tmp_path):
    for scorer in ("self-certainty", "mbr+certainty"):
        for bad, why in ((None, "the record has none"), ([1.0], "got"), ([1.0, float("nan")], "output 1"),
                         ([1.0, "x"], "output 1"), ([True, 1.0], "output 0")):
            rec = {"id": "b", "outputs": ["one", "two"]}
            if bad is not None:
                rec["self_certainty"] = bad
            path = tmp_path / "s.jsonl"
            path.write_text(json.dumps(WITH_CERTAINTY[0]) + "\n" + json.dumps(rec) + "\n")
            with pytest.raises(JsonlError, match=rf"s.jsonl:2: --scorer {re.escape(scorer)} needs `self_certainty`.*{why}"):
                mbr.score_file(str(path), str(tmp_path / "o.jsonl"), mbr.ScoreConfig(scorer=scorer), log=None)
    mbr.read_samples(str(path))  # the mbr scorer does not read it
    with pytest.raises(ConfigError, match="--utility random"):
        mbr.ScoreConfig(utility="random", scorer="self-certainty")
    with pytest.raises(ConfigError, match="min_consensus"):
        mbr.ScoreConfig(min_consensus=1.5)


def test_scorer_settings_refuse_a_resume_and_keep_old_files_resumable(tmp_path):
    assert set(mbr.scorer_settings(mbr.ScoreConfig(utility="rouge"))) == {
        "utility", "embedder", "embedder_config_sha256", "seed", "dedup_threshold", "reference_mode"}
    settings = mbr.scorer_settings(mbr.ScoreConfig(utility="rouge", scorer="mbr+certainty", min_consensus=0.5))
    assert settings["scorer"] == "mbr+certainty" and settings["min_consensus"] == 0.5
    samples = _write(tmp_path / "samples.jsonl", WITH_CERTAINTY)
    out = str(tmp_path / "o.jsonl")
    mbr.score_file(samples, out, mbr.ScoreConfig(utility="rouge"), log=None)
    for change in ({"scorer": "mbr+certainty"}, {"min_consensus": 0.5}):
        with pytest.raises(ValueError, match="scorer|min_consensus"):
            mbr.score_file(samples, out, mbr.ScoreConfig(utility="rouge", **change), log=None)
    assert mbr.score_file(samples, out, mbr.ScoreConfig(utility="rouge"), log=None)["written"] == 0


def test_peer_weights_scale_and_edge_cases():
    assert mbr.peer_weights([2.0, None, 4.0, -1e-9], [True, False, True, True]).tolist() == [0.5, 0.0, 1.0, 0.0]
    assert mbr.peer_weights([0.0, 0.0, 5.0], [True, True, False]).tolist() == [1.0, 1.0, 0.0]  # no information
    assert mbr.peer_weights([], []).tolist() == []
    assert torch.equal(mbr.peer_weights([3.7] * 4, [True] * 4), torch.ones(4, dtype=torch.float64))
