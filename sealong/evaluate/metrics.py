"""Answer metrics: SubEM (HELMET) and token F1 (LongBench `qa_f1_score`), over normalized strings.

normalize_answer is LongBench's and HELMET's: lower-case, drop ASCII punctuation, drop the articles a/an/the
as whole words, collapse whitespace. SubEM = the normalized gold answer is a character substring of the
normalized prediction ("no" is a substring of "not": reported as is); F1 = token overlap of the two.
"""

from __future__ import annotations

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
