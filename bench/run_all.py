"""Run every benchmark in bench/ (each `bench_*.py` module's `run`) on one device, write each result to
bench/results/, and print a short table of all of them last.

    python -m bench.run_all                 # the GPU if there is one, else a small CPU run
    python -m bench.run_all --only mbr orpo # a subset, by module name without the bench_ prefix
"""

import argparse
import importlib
import os
import pkgutil
import sys
import traceback

import torch

from bench.common import format_rows, write_results


def discover():
    here = os.path.dirname(__file__)
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="benchmarks to run (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    names = args.only or discover()
    small = not args.device.startswith("cuda")
    summary, failed = [], []
    for name in names:
        print(f"=== bench_{name} on {args.device}", flush=True)
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            result = module.run(args.device, small=small)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        path = write_results(result, args.device)
        print(format_rows(result["rows"]))
        for note in result.get("notes", []):
            print("note:", note)
        print("wrote", path, flush=True)
        summary.append((name, result, path))
    print("\n===== summary =====")
    for name, result, path in summary:
        print(f"--- {name} ({os.path.relpath(path)})")
        print(format_rows(result.get("summary", result["rows"])))
    if failed:
        print("FAILED:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
