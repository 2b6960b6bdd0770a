"""Adaptive sample count against fixed N on the built-in world's held-out questions: samples spent vs accuracy.

    python -m bench.bench_adaptive [--models DIR,DIR] [--questions 200] [--work-dir DIR]

For each model: the sampling stage (`sealong.sample.sampler.run`, the real sampler) with fixed N = 16, then
with each adaptive rule (--adaptive-block k, stop once the top answer cluster holds >= share of >= min samples,
sealong.score.consensus), and greedy for context. Every adaptive record's outputs are checked to be exactly the
first `spent` outputs of the fixed-N record (counter-based seeds, the CPU in float32 at one slot count), so
MBR@spent is MBR (sealong.evaluate.report.mbr_choices, offline all-MiniLM-L6-v2) over the first `spent` outputs
and the embeddings are computed once. Reported per rule: samples spent / N, MBR@spent vs MBR@N (final-answer EM
and SubEM), the paired changes, MBR@n of a fixed n = the rule's mean spend (the same budget spent evenly),
stop reasons. Rules: the issue's (block 4, share 0.75, min 8) and two looser ones chosen on a 24-question pilot
of other world questions; nothing is tuned on the measured questions.

Questions: the built-in reading world (sealong.data.fresh_world, seed 0), contexts of 96-192 tokens as the
`demo` preset's synth builds its held-out file, taken after the first SKIP questions of the world so that none
was in either model's labelled warm-up (the demo base model warms up on questions 72..4167, the 8000-step one on
1500..5643, per its build script) or in the pilot (6000..6023). Models: the demo's base model (300 warm-up
steps) and an 8000-step warm-up of the same tiny Llama; without those folders the demo's base model is built
first, as `sealong pipeline --preset demo` builds it. Both are tiny and weak (greedy SubEM 6-10% here), so
1 question = 100 / questions points and differences of a few questions are noise.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

import torch

N = 16
SKIP = 6100  # world questions before the held-out ones: past both models' warm-up and dev questions (and the pilot's)
# (block, share, min samples): the rule, then two looser ones chosen on a 24-question pilot (world questions
# 6000..6023, disjoint from the measured ones), where the rule almost never fired
RULES = [(4, 0.75, 8), (4, 0.5, 4), (4, 0.375, 8)]
TEMPERATURES = {"demo": (0.7,), "w5": (0.7, 0.3)}  # per model: the demo's temperature; a cooler one where samples agree
SAMPLE = dict(max_new_tokens=64, decode_slots=64, seed=0)
MODELS = {"demo": "/tmp/demo_run/runs/sealong-demo/base_model",  # the demo's base model, 300 warm-up steps
          "w5": "/tmp/i12/w5"}  # the same tiny Llama after 8000 labelled warm-up steps


def eval_prompts(path: str, questions: int, tokenizer_dir: str) -> list:
    """The held-out prompts as `sealong synth` writes eval.jsonl (demo preset: 96-192 context tokens) and
    `sealong pipeline` turns it into eval_prompts.jsonl, from world questions SKIP.. on."""
    from sealong.data.context import ContextBuilder, ContextConfig
    from sealong.data.fresh_world import fresh_questions
    from sealong.data.longbench import musique_to_longbench, read_longbench, to_prompt
    from sealong.data.synthetic import load_counting_tokenizer, write_jsonl_atomic

    held = [q.record() for q in fresh_questions(0, SKIP, questions)["eval"]]
    builder = ContextBuilder(held, load_counting_tokenizer(tokenizer_dir), ContextConfig(min_tokens=96, max_tokens=192, seed=0))
    longbench = os.path.join(os.path.dirname(path), "synthetic.jsonl")
    write_jsonl_atomic(longbench, (musique_to_longbench(r, builder.build(r)["context"], "synthetic") for r in held))
    records = [to_prompt(r) for r in read_longbench(longbench)]
    write_jsonl_atomic(path, records)
    return records


def demo_base_model(folder: str) -> str:
    """The demo preset's tiny base model (sealong.tiny, 300 labelled warm-up steps on world questions 72..)."""
    from sealong.tiny import TinyConfig, build_base_model

    if not os.path.isfile(os.path.join(folder, "config.json")):
        cfg = TinyConfig(warmup_steps=300, min_tokens=96, max_tokens=192, max_new_tokens=40, temperature=0.7)
        build_base_model(folder, cfg, skip_questions=48 + 24, log=lambda message: None)
    return folder


def sample(model: str, prompts: str, out: str, device: str, **flags) -> list:
    """The sampling stage, as `sealong sample` runs it; returns the records."""
    from sealong.config.parser import resolve
    from sealong.jsonl import read_jsonl
    from sealong.sample import sampler

    values = {**SAMPLE, "num_samples": N, **flags}
    argv = ["--model", model, "--prompts", prompts, "--output", out, "--dtype", "float32", "--device", device]
    argv += [f"--{k}={v}" for k, v in values.items()]
    sampler.run(resolve("sample", argv).cfg)
    return list(read_jsonl(out))


def measure_model(name: str, model: str, temperature: float, prompts: str, work: str, device: str) -> tuple:
    from sealong.evaluate import report

    t0 = time.perf_counter()
    greedy = sample(model, prompts, os.path.join(work, "greedy.jsonl"), device, num_samples=1, temperature=0.0)
    work = os.path.join(work, f"T{temperature}")
    os.makedirs(work, exist_ok=True)
    fixed = sample(model, prompts, os.path.join(work, "fixed.jsonl"), device, temperature=temperature)
    picks = report.mbr_choices(fixed, list(range(1, N + 1)))  # MBR over the first n outputs, every n
    tables = [[report.output_scores(o, r["answers"]) for o in r["outputs"]] for r in fixed]
    g = report.evaluate(greedy, None, mbr=False)["average"]["greedy"]

    def mbr_at(spent: list) -> dict:
        em = [tables[k][picks[k][m]][0] for k, m in enumerate(spent)]
        subem = [tables[k][picks[k][m]][1] for k, m in enumerate(spent)]
        return {"em": 100 * sum(em) / len(em), "subem": 100 * sum(subem) / len(subem), "_em": em, "_subem": subem}

    full = mbr_at([N] * len(fixed))
    oracle = 100 * sum(max(t[1] for t in table) for table in tables) / len(tables)
    base = {"model": name, "temperature": temperature, "questions": len(fixed), "greedy EM": g["em"], "greedy SubEM": g["subem"],
            f"MBR@{N} EM": full["em"], f"MBR@{N} SubEM": full["subem"], f"oracle@{N} SubEM": oracle,
            "cut % (fixed)": 100 * sum(f == "length" for r in fixed for f in r["finish_reasons"]) / (N * len(fixed))}
    rows = []
    for block, share, least in RULES:
        flags = {"adaptive_block": block, "adaptive_share": share, "adaptive_min_samples": least}
        tag = f"b{block}_s{share}_m{least}"
        adaptive = sample(model, prompts, os.path.join(work, f"adaptive_{tag}.jsonl"), device, temperature=temperature,
                          **flags)
        assert [r["id"] for r in adaptive] == [r["id"] for r in fixed]
        spent = [len(r["outputs"]) for r in adaptive]
        same = all(a["outputs"] == f["outputs"][:m] and a["num_tokens"] == f["num_tokens"][:m]
                   for a, f, m in zip(adaptive, fixed, spent))
        if not same:
            raise AssertionError(f"{name} {tag}: adaptive outputs are not the fixed run's first ones")
        got, even = mbr_at(spent), mbr_at([max(1, round(sum(spent) / len(spent)))] * len(spent))
        tokens = sum(sum(r["num_tokens"]) for r in adaptive) / sum(sum(r["num_tokens"]) for r in fixed)
        rows.append({
            "model": name, "T": temperature, "rule": f"block {block}, share {share}, min {least}",
            "questions": len(fixed),
            "samples spent / N": sum(spent) / (N * len(spent)), "decode tokens / fixed": tokens,
            "MBR@spent EM": got["em"], f"MBR@{N} EM": full["em"], "EM change": got["em"] - full["em"],
            "MBR@spent SubEM": got["subem"], f"MBR@{N} SubEM": full["subem"], "SubEM change": got["subem"] - full["subem"],
            "SubEM wrong->right / right->wrong": f"{sum(a > b for a, b in zip(got['_subem'], full['_subem']))}/"
                                                 f"{sum(a < b for a, b in zip(got['_subem'], full['_subem']))}",
            "MBR@even-n SubEM": even["subem"], "even n": max(1, round(sum(spent) / len(spent))),
            "stopped on consensus": sum(r["adaptive_stop"] == "consensus" for r in adaptive),
            "outputs = fixed's first": same,
        })
    base["seconds (CPU, these runs)"] = time.perf_counter() - t0
    return base, rows


@contextlib.contextmanager
def held_out_world(models: dict | None, questions: int, work_dir: str | None, prefix: str):
    """(copies of the model folders {name: folder}, the held-out prompts file) in `work_dir` (else a temporary
    folder, removed after), with one torch thread (tiny matrices on shared cores); without any of the model folders,
    the demo's base model is built first."""
    import logging

    logging.getLogger("sealong").setLevel(logging.WARNING)
    models = {k: v for k, v in (models or MODELS).items() if os.path.isfile(os.path.join(v, "config.json"))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = None if work_dir else tempfile.TemporaryDirectory(prefix=prefix)
    work = work_dir or tmp.name
    try:
        if not models:  # none of the folders here: build the demo's base model as `sealong pipeline` does
            models = {"demo": demo_base_model(os.path.join(work, "built", "base_model"))}
        copies = {}
        for name, src in models.items():  # read-only sources: sample from copies
            copies[name] = os.path.join(work, "models", name)
            if not os.path.isdir(copies[name]):
                shutil.copytree(src, copies[name])
        prompts = os.path.join(work, "eval_prompts.jsonl")
        if not os.path.isfile(prompts):
            eval_prompts(prompts, questions, next(iter(copies.values())))
        yield copies, prompts
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()


def run(device: str = "cpu", small: bool = True, models: dict | None = None, questions: int = 120,
        work_dir: str | None = None) -> dict:
    summary, rows = [], []
    with held_out_world(models, questions, work_dir, "bench_adaptive_") as (copies, prompts):
        for name, model in copies.items():
            out = os.path.join(os.path.dirname(prompts), "runs", name)
            os.makedirs(out, exist_ok=True)
            for temperature in TEMPERATURES.get(name, (0.7,)):
                base, model_rows = measure_model(name, model, temperature, prompts, out, device)
                summary.append(base)
                rows += model_rows
                print(json.dumps(base), flush=True)
    notes = [
        f"{questions} held-out questions of the built-in reading world (fresh facts per question, seed 0, questions "
        f"{SKIP}..{SKIP + questions - 1}: none in either model's warm-up), contexts 96-192 tokens (the demo preset)",
        f"sampling: N = {N}, temperatures {TEMPERATURES} (0.7: the demo's), max_new_tokens {SAMPLE['max_new_tokens']}, "
        f"{SAMPLE['decode_slots']} decode slots, float32 on the CPU; MBR: offline all-MiniLM-L6-v2 (last window)",
        "adaptive outputs are checked equal to the fixed run's first `spent` outputs, so MBR@spent is MBR over them",
        "MBR@even-n: MBR over the first n outputs of every question, n = the rule's mean spend (a fixed budget of "
        "the same size, for comparison)",
        "EM = final-answer exact match, SubEM = gold answer anywhere in the output (the paper's); tiny weak models: "
        f"1 question = {100 / questions:.1f} points",
        "rules: the issue's (block 4, share 0.75, min 8) and two looser ones chosen on a 24-question pilot of other "
        "world questions (6000..6023), where the tiny models' samples rarely agreed; nothing tuned on the measured ones",
    ]
    return {"name": "adaptive", "rows": rows, "summary": summary, "notes": notes}


def parse_args(argv, doc: str, **extra) -> tuple:
    """(arguments, {name: model folder} or None) of the held-out-world benchmarks' command line; `extra`: more
    options {name: (type, default)}."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated model folders (default: MODELS above)")
    parser.add_argument("--questions", type=int, default=120)
    for name, (kind, default) in extra.items():
        parser.add_argument(f"--{name}", type=kind, default=default)
    parser.add_argument("--work-dir", default=None, help="keep the prompts and samples files here")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    models = {os.path.basename(m.rstrip("/")): m for m in args.models.split(",")} if args.models else None
    if models and len(models) != len(args.models.split(",")):
        raise ValueError(f"--models: two folders with one name in {args.models!r}")
    return args, models


def finish(result: dict, device: str, tables=("rows",)) -> int:
    """Print the result's tables and notes, write it to bench/results/."""
    from bench.common import format_rows, write_results

    for table in tables:
        print(format_rows(result[table]))
    for note in result["notes"]:
        print("note:", note)
    print("wrote", write_results(result, device))
    return 0


def main(argv=None) -> int:
    args, models = parse_args(argv, __doc__)
    return finish(run(args.device, True, models, args.questions, args.work_dir), args.device, ("summary", "rows"))


if __name__ == "__main__":
    sys.exit(main())
