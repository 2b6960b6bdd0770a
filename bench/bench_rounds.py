"""Two SEALONG rounds of the offline demo, with and without the beyond-the-paper options: the monitoring
table of `sealong pipeline --rounds 2` (round_k/monitor.json) and the wall time of each run.

    python -m bench.bench_rounds [--work-dir DIR]

Runs, each into its own run directory (the demo preset: a tiny model built in code, 48 training questions per
round, N = 8, 24 held-out questions):
    paper      sealong pipeline --rounds 2
    beyond     sealong pipeline --rounds 2 --adaptive-block 4 --adaptive-share 0.5 --adaptive-min-samples 4
               --scorer mbr+certainty --pair-weighting margin
Reported per run and round: the label-free statistics of the round's samples (sealong/evaluate/rounds.py) and the
held-out SubEM of greedy / MBR@8 / oracle@8 after the round (row 0: the base model), plus the samples spent / N.
The model is tiny and weak: 1 held-out question = 4.2 points; the numbers show the mechanics, not a gain.
"""

import json
import os
import sys
import tempfile
import time

RUNS = {
    "paper": [],
    "beyond": ["--adaptive-block", "4", "--adaptive-share", "0.5", "--adaptive-min-samples", "4",
               "--scorer", "mbr+certainty", "--pair-weighting", "margin"],
}


def pipeline(run_dir: str, flags: list) -> float:
    """`sealong pipeline --rounds 2` into run_dir in a fresh interpreter (as a user runs it); its wall seconds."""
    import subprocess

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sealong.cli", "pipeline", "--rounds", "2", "--run-dir", run_dir, *flags],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def rows_of(name: str, run_dir: str, seconds: float) -> list:
    from sealong.jsonl import read_jsonl

    before = json.load(open(os.path.join(run_dir, "before", "eval.json")))["average"]
    n = max(int(m.split("@")[1]) for m in before if m.startswith("MBR@") and m.split("@")[1].isdigit())
    rows = [{"run": name, "round": 0, "greedy SubEM": before["greedy"]["subem"], f"MBR@{n} SubEM": before[f"MBR@{n}"]["subem"],
             f"oracle@{n} SubEM": before[f"oracle@{n}"]["subem"], "seconds (CPU wall, whole run)": seconds}]
    for k in (1, 2):
        folder = os.path.join(run_dir, f"round_{k}")
        monitor = json.load(open(os.path.join(folder, "monitor.json")))
        samples = list(read_jsonl(os.path.join(folder, "samples.jsonl")))
        spent = sum(len(r["outputs"]) for r in samples) / (n * len(samples))
        after = monitor["after"]
        rows.append({"run": name, "round": k, **monitor["label_free"], "samples spent / N": spent,
                     "greedy SubEM": after["greedy"]["subem"], f"MBR@{n} SubEM": after["MBR"]["subem"],
                     f"oracle@{n} SubEM": after["oracle"]["subem"], "oracle - MBR": after["gap"]["subem"]})
    return rows


def run(device: str = "cpu", small: bool = True, work_dir: str | None = None) -> dict:
    tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="bench_rounds_")
    work = work_dir or tmp.name
    rows = []
    try:
        for name, flags in RUNS.items():
            run_dir = os.path.join(work, name)
            rows += rows_of(name, run_dir, pipeline(run_dir, flags))
    finally:
        if tmp is not None:
            tmp.cleanup()
    notes = ["the offline demo preset (CPU; `sealong pipeline --rounds 2` and the flags in the docstring); the "
             "pipeline picks the CPU itself, so the device argument is not used",
             "label-free columns: the round's own training samples (drawn by the model entering the round); "
             "SubEM columns: the held-out set after the round (round 0: the base model)",
             "tiny weak model: 24 held-out questions, 1 question = 4.2 points"]
    return {"name": "rounds", "rows": rows, "notes": notes}


def main(argv=None) -> int:
    import argparse

    from bench.bench_adaptive import finish

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=None, help="keep the run directories here")
    args = parser.parse_args(argv)
    return finish(run("cpu", True, args.work_dir), "cpu")


if __name__ == "__main__":
    sys.exit(main())
