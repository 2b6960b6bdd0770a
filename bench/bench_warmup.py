"""The tiny base model's warm-up and its dev-slice diagnosis for one shape (`sealong.tiny.TinyConfig` overrides).

    python -m bench.bench_warmup --out runs/warmup_A --set num_layers=4 --set tie_embeddings=true

builds the model as `sealong pipeline --preset demo-gain` does (the warm-up and dev questions after the preset's
512 training and 400 held-out questions, seed 0) and prints / keeps `OUT/base_model/warmup.json` (every dev check
and the final diagnosis of `sealong.diagnosis`) and `OUT/base_model/dev_outputs.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    from sealong.tiny import TinyConfig, build_base_model, parse_overrides

    ap = argparse.ArgumentParser(prog="python -m bench.bench_warmup")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], help="TinyConfig field=value (repeatable)")
    ap.add_argument("--skip", type=int, default=512 + 400, help="the method's questions before the warm-up's")
    a = ap.parse_args(argv)
    base = dict(min_tokens=110, max_tokens=150, max_new_tokens=56, check_every=1000, warmup_steps=4000)
    cfg = TinyConfig(**{**base, **parse_overrides(",".join(a.set))})
    start = time.perf_counter()
    stats = build_base_model(Path(a.out, "base_model"), cfg, skip_questions=a.skip,
                             log=lambda m: print(f"[{time.perf_counter() - start:7.1f}s] {m}", flush=True))
    print(json.dumps({"seconds": time.perf_counter() - start, "final": stats.get("final_dev_check")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
