"""Build the demonstration input of the scoring stage from real MuSiQue questions (reproducible, offline).

    python sealong/examples/make_demo_samples.py [--source sealong/data/musique_sample.jsonl]

Writes, next to this file, for the first 20 questions of the MuSiQue sample:
    musique_demo_prompts.jsonl   id, question, context (the record's 20 paragraphs as "Passage i:" blocks), answers
    musique_demo_samples.jsonl   id, question, answers, 8 `outputs` with finish_reasons / num_tokens
The outputs are NOT model output: they are templated reasoning texts built from each question's gold
decomposition (MuSiQue's `question_decomposition`): 5 reach the gold answer in different wordings, 2 end
on the answer of another question (wrong), 1 is cut off (finish_reason "length"), and every fifth question
has one empty output. Their only purpose is to exercise `python -m sealong.score` end to end without a GPU;
the sampler stage writes the real thing. Deterministic: random.Random(seed) with a fixed seed.
"""

import argparse
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "data", "musique_sample.jsonl")  # the shipped MuSiQue records (CC BY 4.0)
N_QUESTIONS, N_OUTPUTS, SEED = 20, 8, 2411

OPENINGS = [
    "Let's first understand the problem. The question is a chain of {k} simpler questions.",
    "Plan: find each intermediate fact in the passages, then combine them.",
    "To solve this, I will answer the sub-questions one at a time using the context.",
    "The question needs {k} hops. I will resolve them in order.",
    "First, identify what is being asked; then look up each fact in the passages.",
]
STEPS = ["Step {i}: {q} -> {a}.", "{i}. {q} According to the passages, {a}.", "Hop {i}: {q} The context says: {a}."]
ENDINGS = ["Therefore, the answer is {a}.", "So the answer is {a}.", "Answer: {a}"]


def steps_text(decomposition, rng, final):
    answers = [d["answer"] for d in decomposition]
    lines = []
    for i, d in enumerate(decomposition, 1):
        q = d["question"]
        for j, a in enumerate(answers[: i - 1], 1):
            q = q.replace(f"#{j}", a)
        lines.append(rng.choice(STEPS).format(i=i, q=q.strip(), a=d["answer"] if i < len(decomposition) else final))
    return lines


def outputs_for(record, other_answers, rng, with_empty):
    dec, gold = record["question_decomposition"], record["answer"]
    outs, reasons = [], []
    for k in range(N_OUTPUTS):
        final = gold if k < 5 else rng.choice(other_answers)
        text = "\n".join([rng.choice(OPENINGS).format(k=len(dec)), *steps_text(dec, rng, final),
                          rng.choice(ENDINGS).format(a=final)])
        reason = "stop"
        if k == 7:
            text, reason = text[: len(text) // 2], "length"
        if k == 6 and with_empty:
            text = ""
        outs.append(text)
        reasons.append(reason)
    order = list(range(N_OUTPUTS))
    rng.shuffle(order)
    return [outs[i] for i in order], [reasons[i] for i in order]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=SOURCE)
    parser.add_argument("--out-dir", default=HERE)
    args = parser.parse_args(argv)
    with open(args.source, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()][:N_QUESTIONS]
    rng = random.Random(SEED)
    prompts, samples = [], []
    for q, rec in enumerate(records):
        answers = [rec["answer"], *rec.get("answer_aliases", [])]
        context = "\n\n".join(f"Passage {i + 1}:\n{p['title']}\n{p['paragraph_text']}"
                              for i, p in enumerate(rec["paragraphs"]))
        prompts.append({"id": rec["id"], "question": rec["question"], "context": context, "answers": answers})
        others = [r["answer"] for r in records if r["answer"] != rec["answer"]]
        outs, reasons = outputs_for(rec, others, rng, with_empty=q % 5 == 0)
        samples.append({"id": rec["id"], "question": rec["question"], "answers": answers, "outputs": outs,
                        "finish_reasons": reasons, "num_tokens": [len(o.split()) for o in outs],
                        "source": "templated demonstration outputs, not model output (see make_demo_samples.py)"})
    for name, rows in [("musique_demo_prompts.jsonl", prompts), ("musique_demo_samples.jsonl", samples)]:
        path = os.path.join(args.out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
