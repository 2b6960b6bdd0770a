"""Answer clusters of a question's samples: the label-free agreement signal of the beyond-the-paper options.

Two outputs fall in one cluster when their extracted final answers are equal (the text after the last
"answer is" / "answer:", normalized as SubEM normalizes; `extract_final_answer`). Over a question's n samples:

    top_share = (size of the largest cluster with a non-empty answer) / n        the consensus, in [0, 1]
    distinct  = number of clusters with a non-empty answer

Used by the sampler's adaptive sample count (`reached`: stop once a real cluster agrees), the score stage's
consensus filter, and the per-round monitoring of `sealong pipeline --rounds`. Samples with no answer (empty or
invalid outputs) count in n but join no cluster, so a question whose samples say nothing never reaches
consensus. Self-consistency (Wang et al. 2023, arXiv 2203.11171) votes over the same clusters;
Self-Consistency Preference Optimization (Prasad et al. 2024, arXiv 2411.04109) weights pairs by their margin.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_ANSWER_PATTERNS = [
    re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE),
]


def extract_final_answer(text: str) -> str:
    """The text after the last "answer is" / "answer:" up to the end of its line (else the last non-empty line),
    normalized as SubEM normalizes (lower case, no punctuation or articles, single spaces)."""
    from sealong.evaluate.metrics import normalize_answer

    for pattern in _ANSWER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return normalize_answer(found[-1].strip().split("\n")[0])
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return normalize_answer(lines[-1]) if lines else ""


@dataclass(frozen=True)
class Consensus:
    n: int  # samples counted
    top_share: float  # largest non-empty answer cluster / n (0 when n == 0)
    distinct: int  # non-empty answer clusters
    top_answer: str  # the largest cluster's answer ("" when none); ties: the cluster seen first
    top_size: int = 0  # outputs in the largest non-empty answer cluster
    answered: int = 0  # outputs with a non-empty answer (in some cluster)


def answer_consensus(outputs: list, valid: list | None = None) -> Consensus:
    """The clusters of `outputs` (strings; `valid[i]` False leaves output i out of every cluster)."""
    answers = [extract_final_answer(o) if (valid is None or valid[i]) and o.strip() else ""
               for i, o in enumerate(outputs)]
    counts = Counter(a for a in answers if a)
    if not counts:
        return Consensus(len(outputs), 0.0, 0, "")
    top, size = counts.most_common(1)[0]  # most_common keeps first-seen order among ties
    return Consensus(len(outputs), size / len(outputs), len(counts), top, size, sum(counts.values()))


MIN_CLUSTER = 2  # agreeing outputs the adaptive stop needs: one output agrees with nothing


def reached(consensus: Consensus, share: float, min_samples: int) -> bool:
    """The adaptive stop rule: at least `min_samples` samples, and a real cluster: the top answer cluster holds at
    least MIN_CLUSTER (2) outputs and at least `share` of the answered outputs (those with a non-empty answer; a
    sample that says nothing neither agrees nor disagrees). Two samples with two different answers never stop."""
    c = consensus
    return c.n >= min_samples and c.top_size >= MIN_CLUSTER and c.top_size / c.answered >= share
