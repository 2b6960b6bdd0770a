"""The tiny base model's warm-up and its dev-slice diagnosis for one shape (`sealong.tiny.TinyConfig` overrides).

    python -m bench.bench_warmup --out runs/warmup_A --set num_layers=4 --set tie_embeddings=true

builds the model as `sealong pipeline --preset demo-gain` does (the warm-up and dev questions after the preset's
512 training and 400 held-out questions, seed 0) and prints / keeps `OUT/base_model/warmup.json` (every dev check
and the final diagnosis of `sealong.diagnosis`) and `OUT/base_model/dev_outputs.jsonl`. `--diagnose MODEL` instead runs the full diagnosis (MBR included) of a
model kept by `--set keep_checks=DIR` (DIR/step_N), with the same `--set` values, into OUT/diagnosis.json.
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
    ap.add_argument("--diagnose", help="a kept check's model folder: its full dev diagnosis only")
    a = ap.parse_args(argv)
    base = dict(min_tokens=110, max_tokens=150, max_new_tokens=56, check_every=1000, warmup_steps=4000)
    cfg = TinyConfig(**{**base, **parse_overrides(",".join(a.set))})
    start = time.perf_counter()
    if a.diagnose:
        from sealong.data.fresh_world import fresh_questions, world_config
        from sealong.jsonl import write_jsonl_atomic
        from sealong.model import load_tokenizer
        from sealong.tiny import dev_check

        dev = fresh_questions(cfg.seed, a.skip, 0, cfg.warmup_questions, cfg.dev_questions,
                              config=world_config(cfg.world_hops, cfg.world_passages))["dev"]
        rows: list = []
        res = dev_check(a.diagnose, load_tokenizer(a.diagnose), dev, cfg, "plan_and_solve", rows_out=rows)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(str(Path(a.out, "dev_outputs.jsonl")), rows)
        Path(a.out, "diagnosis.json").write_text(json.dumps({"model": a.diagnose, **res}, indent=1))
        print(json.dumps({"seconds": time.perf_counter() - start, "diagnosis": res}))
        return 0
    stats = build_base_model(Path(a.out, "base_model"), cfg, skip_questions=a.skip,
                             log=lambda m: print(f"[{time.perf_counter() - start:7.1f}s] {m}", flush=True))
    print(json.dumps({"seconds": time.perf_counter() - start, "final": stats.get("final_dev_check")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
