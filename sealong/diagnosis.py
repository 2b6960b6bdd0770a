"""The warm-up's diagnosis of the tiny base model on its labelled dev slice, before any SEALONG round.

Which reading ability is missing, from the dev outputs alone (`rows`, one per dev question, as written to
`base_model/dev_outputs.jsonl`):

    greedy, greedy_{h}hop  greedy final-answer exact match, overall and per hop count
    copy_rate              share of greedy outputs whose final answer is SOME entity of the context (a subject or
                           an object of one of its facts): low = the model does not copy names from its context
    confuser_rate          share of greedy outputs whose final answer is the object of a near-name confuser's
                           passage present in the context: high = it reads, but follows the wrong name
    oracle@n               some of the n samples is right (the ceiling a consensus could reach)
    mbr@n                  the embedding-consensus pick is right (`sealong.score`: what SEALONG trains towards)
    random@n               mean over the n samples (what one random sample scores; no draw noise)
    majority@n             the most frequent normalized final answer of the n samples is right (ties: first seen)

All values are percentages over the rows. The method's signal is mbr@n - greedy (the pairs teach the model
something only when the consensus beats its greedy answer) within oracle@n.
"""

from __future__ import annotations

import re
from collections import Counter

from .evaluate.metrics import final_answer, normalize_answer

FACT = re.compile(r"The (\w+) of (.+?) is (.+?)\.")


def context_entities(context: str) -> list[str]:
    """Every subject and object of the facts `The {relation} of {subject} is {object}.` in `context`, in order."""
    out = []
    for _, s, o in FACT.findall(context):
        out += [e for e in (s, o) if e not in out]
    return out


def confuser_objects(question, context: str) -> list[str]:
    """Objects of the question's near-name confuser passages (`FreshQuestion.confusers`) that are in `context`."""
    return [o for s, rel, o in question.confusers if f"The {rel} of {s} is {o}." in context]


def dev_row(question, context: str, greedy: str, samples: list[str], mbr_pick: int | None, cut: list[bool]) -> dict:
    """One dev question's record of `dev_outputs.jsonl`."""
    return {"id": question.id, "hops": len(question.chain), "answer": question.answer, "greedy": greedy,
            "samples": samples, "mbr_pick": mbr_pick, "cut": cut, "context_entities": context_entities(context),
            "confusers": confuser_objects(question, context)}


def diagnose(rows: list[dict]) -> dict:
    """The diagnosis (module docstring) of dev rows; `mbr@n` only when every row has an `mbr_pick`."""
    norm = lambda text: normalize_answer(final_answer(text))  # noqa: E731
    pct = lambda xs: 100.0 * sum(xs) / max(1, len(xs))  # noqa: E731
    n = len(rows[0]["samples"]) if rows else 0
    gold = [normalize_answer(r["answer"]) for r in rows]
    greedy = [norm(r["greedy"]) for r in rows]
    right = [[norm(o) == g for o in r["samples"]] for r, g in zip(rows, gold)]
    out = {"greedy": pct([a == g for a, g in zip(greedy, gold)])}
    for h in sorted({r["hops"] for r in rows}):
        out[f"greedy_{h}hop"] = pct([a == g for a, g, r in zip(greedy, gold, rows) if r["hops"] == h])
    out["copy_rate"] = pct([a in {normalize_answer(e) for e in r["context_entities"]} for a, r in zip(greedy, rows)])
    out["confuser_rate"] = pct([a in {normalize_answer(e) for e in r["confusers"]} for a, r in zip(greedy, rows)])
    out[f"oracle@{n}"] = pct([any(x) for x in right])
    if rows and all(r.get("mbr_pick") is not None for r in rows):
        out[f"mbr@{n}"] = pct([x[r["mbr_pick"]] for x, r in zip(right, rows)])
    out[f"random@{n}"] = pct([sum(x) / n for x in right])
    majority = [Counter(norm(o) for o in r["samples"]).most_common(1)[0][0] == g for r, g in zip(rows, gold)]
    out[f"majority@{n}"] = pct(majority)
    out["cut_at_limit"] = pct([c for r in rows for c in r["cut"]])
    out["questions"] = len(rows)
    return out


def hop_counts(rows: list[dict]) -> dict[int, int]:
    return dict(sorted(Counter(r["hops"] for r in rows).items()))
