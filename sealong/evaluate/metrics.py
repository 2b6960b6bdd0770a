"""Answer metrics: SubEM (HELMET) and token F1 (LongBench `qa_f1_score`), over normalized strings.

normalize_answer is LongBench's and HELMET's: lower-case, drop ASCII punctuation, drop the articles a/an/the
as whole words, collapse whitespace. SubEM = the normalized gold answer is a character substring of the
normalized prediction ("no" is a substring of "not": reported as is); F1 = token overlap of the two.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the as whole words, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def sub_em(prediction: str, gold: str) -> float:
    return float(normalize_answer(gold) in normalize_answer(prediction))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS = {"subem": sub_em, "f1": token_f1}


def best_over_answers(prediction: str, answers: list[str], metric: str = "subem") -> float:
    """Max of the metric over the gold answers."""
    if not answers:
        raise ValueError("answers is empty: nothing to score against")
    fn = METRICS[metric]
    return max(fn(prediction, a) for a in answers)


def final_answer(prediction: str) -> str:
    """The final answer of a reasoning output: the text after the last "answer is" up to the sentence's end
    (case-insensitive); without that phrase, the last sentence."""
    low = prediction.lower()
    k = low.rfind("answer is")
    tail = prediction[k + len("answer is"):] if k >= 0 else re.split(r"(?<=[.!?])\s+", prediction.strip())[-1]
    return re.split(r"(?<=[.!?])\s", tail.strip(), maxsplit=1)[0]


def final_em(prediction: str, gold: str) -> float:
    """Exact match of the normalized final answer (`final_answer`) with the normalized gold answer."""
    return float(normalize_answer(final_answer(prediction)) == normalize_answer(gold))


# ---- statistics ---------------------------------------------------------------------------------------------------

def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a proportion, as fractions in [0, 1]."""
    if n <= 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float], z: float = 1.959964, lo: float = 0.0, hi: float = 1.0) -> tuple[float, float]:
    """Normal-approximation interval of a mean (for per-question scores that are not 0/1, e.g. random@N),
    clipped to the scores' range [lo, hi]."""
    n = len(values)
    if n == 0:
        return (0.0, 0.0)
    m = sum(values) / n
    var = sum((v - m) ** 2 for v in values) / max(1, n - 1)
    half = z * math.sqrt(var / n)
    return (max(lo, m - half), min(hi, m + half))


def mcnemar_exact(before: list[float], after: list[float]) -> dict:
    """Exact (binomial) McNemar test of paired 0/1 outcomes of the same questions before and after.

    b = right before and wrong after, c = wrong before and right after; under H0 (no change) the b + c
    discordant questions split as Binomial(b + c, 1/2), so the two-sided p = min(1, 2 * P[X <= min(b, c)]).
    """
    if len(before) != len(after):
        raise ValueError(f"mcnemar_exact: {len(before)} outcomes before but {len(after)} after")
    b = sum(1 for x, y in zip(before, after) if x and not y)
    c = sum(1 for x, y in zip(before, after) if y and not x)
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n if n else 1.0
    return {"b_right_to_wrong": b, "c_wrong_to_right": c, "p_value": min(1.0, 2 * tail), "n": len(before)}
