"""RULER records at RULER's lengths: every task at 4K, 8K, 16K and 32K tokens, the length of each record re-counted
from its prompt (+ the task's tokens to generate) against the target, and the needle tasks' answers counted in the
prompt (exactly once). Counts only; no model runs.

    python -m bench.bench_ruler [--tokenizer MODEL_FOLDER] [--per-task 2]   # default: the offline BERT tokenizer
"""

import argparse
import datetime
import json
import os

from sealong.data import ruler
from sealong.data.prompts import chat_token_ids
from sealong.data.synthetic import load_counting_tokenizer

from .common import RESULTS_DIR


def run(tokenizer_folder=None, per_task=2, lengths=ruler.LENGTHS) -> dict:
    tok = load_counting_tokenizer(tokenizer_folder)
    records = ruler.generate(tok, ruler.RulerConfig(lengths=tuple(lengths), per_task=per_task))
    again = ruler.generate(tok, ruler.RulerConfig(lengths=tuple(lengths), per_task=per_task))
    rows = []
    for r in records:
        ids = chat_token_ids(tok, r["prompt"]) if getattr(tok, "chat_template", None) else tok(r["prompt"])["input_ids"]
        tokens = len(ids) + r["tokens_to_generate"]
        once = all(r["prompt"].count(a) == 1 for a in r["answers"]) if r["task"].startswith("niah") else None
        rows.append({"id": r["id"], "target": r["target_length"], "tokens": tokens,
                     "deviation_pct": round(100 * (tokens - r["target_length"]) / r["target_length"], 3),
                     "answers": len(r["answers"]), "answers_exactly_once": once})
    return {"name": "ruler_lengths", "tokenizer": tokenizer_folder or "offline BERT (all-MiniLM-L6-v2)",
            "date": datetime.date.today().isoformat(), "records": len(rows), "deterministic": records == again,
            "max_abs_deviation_pct": max(abs(x["deviation_pct"]) for x in rows),
            "all_within_target": all(x["tokens"] <= x["target"] for x in rows),
            "needles_exactly_once": all(x["answers_exactly_once"] is not False for x in rows), "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--per-task", type=int, default=2)
    a = ap.parse_args()
    res = run(a.tokenizer, a.per_task)
    path = os.path.join(RESULTS_DIR, f"ruler_lengths_{res['date']}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print({k: v for k, v in res.items() if k != "rows"}, "->", path)


if __name__ == "__main__":
    main()
