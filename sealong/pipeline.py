"""`sealong pipeline`: the whole SEALONG loop into one run directory, resumable.

    sealong pipeline                      # no arguments: the offline demo (a tiny model, the built-in world, CPU)
    sealong pipeline --model /models/Llama-3.1-8B-Instruct --musique musique_ans_v1.0_train.jsonl \\
        --eval-files longbench/musique.jsonl,longbench/hotpotqa.jsonl --nproc-per-node 8 --train-args "--sp 8 --ulysses 4"

Steps (each writes into --run-dir; a step whose output is complete is skipped, so a killed run resumes):
    0. base model      demo only: a tiny model and tokenizer built in code, warmed up on a separate labelled world
                       (the base model's training, not part of the method)            -> base_model/
    1. synth           long contexts for the training questions (answers never used)   -> prompts.jsonl
    2. eval set        held-out LongBench-format questions                             -> eval.jsonl, eval_prompts.jsonl
    3. eval before     greedy + N samples of the base model, SubEM/F1 tables           -> before/
    4. sample          N samples per training prompt (shared-prefix sampler)           -> samples.jsonl
    5. score           MBR scores, chosen / rejected pairs                             -> scores.jsonl, pairs.jsonl
    6. train           `torchrun -m sealong.train` (ORPO + LoRA by default)             -> train/
    7. merge           base + adapter, for sampling                                    -> after_model/
    8. eval after      as step 3 with the trained model                                -> after/
    9. summary         before / after table                                            -> summary.md
Every stage runs with the arguments `sealong <stage>` would get from the same YAML config (the paper's settings)
unless the demo preset is in force (no --model): then the small demo values below are used.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

# preset values of the pipeline's own options: "demo" when no --model is given, else "paper"
PRESETS = {
    "demo": dict(num_examples=48, num_eval=24, min_tokens=96, max_tokens=192, num_samples=8, eval_samples=8,
                 temperature=0.7, max_new_tokens=40, mode="orpo", lora_r=16, lora_alpha=32, lr=2e-3, epochs=2,
                 batch_pairs=8, dtype="float32", warmup_steps=300),
    # the self-improvement demo: fresh facts per question, 2-3 hops, 8-12 passages with near-name confusers; the
    # warm-up stops on a labelled dev slice (35-55% greedy, oracle@16 >= 80%); one SEALONG round on 512 questions,
    # evaluated on 400 held-out ones (README: its measured table and run time)
    "demo-gain": dict(num_examples=512, num_eval=400, min_tokens=110, max_tokens=150, num_samples=16, eval_samples=8,
                      temperature=1.0, max_new_tokens=56, mode="orpo", lora_r=32, lora_alpha=32, lr=1e-3, epochs=2,
                      batch_pairs=8, dtype="float32", warmup_steps=4000),
    "paper": dict(num_examples=2048, num_eval=200, min_tokens=4096, max_tokens=31744, num_samples=32, eval_samples=16,
                  temperature=0.7, max_new_tokens=1024, mode="orpo", lora_r=128, lora_alpha=128, lr=5e-5, epochs=1,
                  batch_pairs=64, dtype="bfloat16", warmup_steps=0),
}
REAL_COMMAND = (
    "sealong pipeline --run-dir runs/llama31-8b --model /models/Llama-3.1-8B-Instruct \\\n"
    "    --musique data/musique_ans_v1.0_train.jsonl \\\n"
    "    --eval-files longbench/qasper.jsonl,longbench/multifieldqa_en.jsonl,longbench/hotpotqa.jsonl,"
    "longbench/musique.jsonl,longbench/2wikimqa.jsonl \\\n"
    "    --nproc-per-node 8 --train-args \"--sp 8 --ulysses 4\"")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("pipeline (options left unset take the demo preset without --model, else the paper's)")
    g.add_argument("--run-dir", default="runs/sealong-demo", help="everything goes here; re-running resumes")
    g.add_argument("--preset", choices=["demo", "demo-gain", "paper"], default=None,
                   help="values of unset options: demo (the short offline run, default without --model), demo-gain "
                   "(the offline run that shows a measured gain, README), paper (default with --model)")
    g.add_argument("--embedding-model", default=None,
                   help="embedder of MBR (scoring and MBR@N in evaluation); default: the config's (paper: "
                   "jina-embeddings-v3 from a local folder), offline all-MiniLM-L6-v2 in the demos")
    g.add_argument("--model", default=None, help="checkpoint folder; omitted: the offline demo's tiny model")
    g.add_argument("--musique", default=None, help="MuSiQue training questions; omitted: the built-in world")
    g.add_argument("--eval-files", default=None,
                   help="comma-separated LongBench JSONL files; omitted: the built-in world's held-out questions")
    g.add_argument("--num-examples", type=int, default=None, help="training questions (paper 2048, demo 48)")
    g.add_argument("--num-eval", type=int, default=None, help="held-out questions of the built-in world")
    g.add_argument("--min-tokens", type=int, default=None, help="shortest context (paper 4096)")
    g.add_argument("--max-tokens", type=int, default=None, help="longest context (paper 31744)")
    g.add_argument("--num-samples", type=int, default=None, help="N samples per training prompt (paper 32)")
    g.add_argument("--eval-samples", type=int, default=None, help="samples per eval question for MBR/oracle@N")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (paper 0.7)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="paper 1024")
    g.add_argument("--mode", choices=["orpo", "sft"], default=None, help="ORPO on pairs (paper) or SFT on the chosen")
    g.add_argument("--lora-r", type=int, default=None, help="LoRA rank (paper 128)")
    g.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (paper 128)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (paper 5e-5)")
    g.add_argument("--epochs", type=int, default=None, help="epochs over the pairs (paper 1)")
    g.add_argument("--batch-pairs", type=int, default=None, help="pairs per optimizer step (the authors' config 64; the paper's text says 8)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    g.add_argument("--warmup-steps", type=int, default=None, help="demo only: labelled warm-up steps of the tiny model")
    g.add_argument("--nproc-per-node", type=int, default=1, help="processes of the torchrun training job")
    g.add_argument("--train-args", default="", help="extra `--key value` flags for sealong.train, one string")
    g.add_argument("--seed", type=int, default=0)


def opt(args: argparse.Namespace, key: str, flag: str) -> list[str]:
    """`[flag, value]` for a stage: always in the demo preset; otherwise only when set on the pipeline's command
    line, so that the stage takes the YAML config's value (the paper's) like `sealong <stage>` would."""
    if args.preset.startswith("demo") or key in args.explicit:
        return [flag, str(getattr(args, key))]
    return []


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the preset; check the values."""
    args.preset = getattr(args, "preset", None) or ("demo" if args.model is None else "paper")
    if args.preset.startswith("demo") and args.model is not None:
        raise ValueError(f"--preset {args.preset}: the demo presets build their own tiny model; drop --model")
    args.explicit = {k for k in PRESETS["demo"] if getattr(args, k, None) is not None}
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("num_examples", "num_samples", "eval_samples", "max_new_tokens", "batch_pairs", "epochs",
                "min_tokens", "max_tokens", "nproc_per_node"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.model is not None and not Path(args.model, "config.json").is_file():
        raise FileNotFoundError(f"--model: no config.json in {args.model}")
    if args.musique is not None and not Path(args.musique).is_file():
        raise FileNotFoundError(f"--musique: file not found: {args.musique}")
    if args.musique is not None and args.eval_files is None:
        raise ValueError("--eval-files: needed with --musique (LongBench v1 JSONL files; `sealong synth --musique "
                         "TRAIN --eval-musique DEV` converts MuSiQue questions to that format)")
    if args.model is not None and args.eval_files is None:
        print("pipeline: no --eval-files: evaluating on the built-in world's held-out questions")
    return args


class Runner:
    """Runs the steps in order, printing one line per step and whether it was done already."""

    def __init__(self, args):
        self.args = args
        self.run = Path(args.run_dir)
        self.run.mkdir(parents=True, exist_ok=True)
        self.config = getattr(args, "sealong_config", None) or {}
        self.started = time.perf_counter()

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {msg}", flush=True)

    def stage_args(self, stage: str, flags: list[str]) -> argparse.Namespace:
        """The Namespace `sealong <stage> FLAGS` would get; YAML defaults apply except in the demo preset."""
        from .cli import apply_config, load_stage

        module = load_stage(stage)
        parser = argparse.ArgumentParser(prog=f"sealong {stage}")
        module.add_arguments(parser)
        if not self.args.preset.startswith("demo"):
            apply_config(parser, self.config.get(stage, {}), f"config [{stage}]")
        return parser.parse_args(flags)

    def call(self, stage: str, flags: list[str]) -> None:
        from .cli import load_stage

        rc = load_stage(stage).run(self.stage_args(stage, flags))
        if rc:
            raise RuntimeError(f"pipeline: stage {stage} failed with exit code {rc}")


# ---- the steps ----------------------------------------------------------------------------------------------------

def step_base_model(r: Runner) -> str:
    a = r.args
    if a.model is not None:
        return a.model
    folder = r.run / "base_model"
    if (folder / "config.json").is_file():
        r.say(f"base model: {folder} exists")
        return str(folder)
    from .tiny import TinyConfig, build_base_model

    r.say("base model: building a tiny Llama and a word-level tokenizer in code; labelled warm-up on other questions "
          "of the built-in world (the base model's own training, NOT part of SEALONG)")
    gain = a.preset == "demo-gain"  # stop the warm-up on the labelled dev slice; check consensus vs greedy there
    cfg = TinyConfig(warmup_steps=a.warmup_steps, min_tokens=a.min_tokens, max_tokens=a.max_tokens, seed=a.seed,
                     check_every=300 if gain else 0, max_new_tokens=a.max_new_tokens, temperature=a.temperature)
    stats = build_base_model(folder, cfg, skip_questions=a.num_examples + a.num_eval, log=r.say)
    r.say(f"base model: warm-up loss {stats['warmup_loss_first']:.2f} -> {stats['warmup_loss_last']:.2f} "
          f"in {stats['warmup_seconds']:.0f}s")
    if stats.get("final_dev_check"):
        r.say("base model: labelled dev slice: " + ", ".join(f"{k} {v:.1f}" for k, v in stats["final_dev_check"].items()))
    return str(folder)


def step_synth(r: Runner, model: str) -> None:
    a = r.args
    flags = ["--out-dir", str(r.run), "--tokenizer", model, "--num-eval", str(a.num_eval if a.eval_files is None else 0),
             "--seed", str(a.seed)]
    flags += opt(a, "num_examples", "--num-examples") + opt(a, "min_tokens", "--min-tokens")
    flags += opt(a, "max_tokens", "--max-tokens")
    r.say("synth: long-context training prompts (no answers)")
    r.call("synth", flags + (["--musique", a.musique] if a.musique else []))


def step_eval_set(r: Runner) -> Path:
    from .data.longbench import read_longbench, to_prompt
    from .data.synthetic import write_jsonl_atomic

    out = r.run / "eval_prompts.jsonl"
    if out.is_file():
        return out
    files = r.args.eval_files.split(",") if r.args.eval_files else [str(r.run / "eval.jsonl")]
    records = [to_prompt(rec) for f in files for rec in read_longbench(f.strip())]
    n = write_jsonl_atomic(out, records)
    r.say(f"eval set: {n} held-out questions from {', '.join(files)}")
    return out


def sample(r: Runner, model: str, prompts: Path, output: Path, n: int, temperature: float) -> None:
    a = r.args
    flags = ["--model", model, "--prompts", str(prompts), "--output", str(output), "--num-samples", str(n),
             "--temperature", str(temperature), "--seed", str(a.seed)]
    flags += opt(a, "max_new_tokens", "--max-new-tokens") + opt(a, "dtype", "--dtype")
    r.call("sample", flags + ({"demo": ["--batch-prompts", "4"], "demo-gain": ["--batch-prompts", "16"]}.get(a.preset, [])))


def embedding_model(r: Runner) -> str | None:
    """--embedding-model, else the config's (the paper preset: jina-embeddings-v3), else None (offline MiniLM)."""
    if r.args.embedding_model or r.args.preset.startswith("demo"):
        return r.args.embedding_model
    return r.config.get("eval", {}).get("embed_model") or r.config.get("score", {}).get("model")


def step_evaluate(r: Runner, model: str, prompts: Path, name: str) -> dict:
    from .evaluate import report as evaluate

    out = r.run / name
    done = out / "eval.json"
    if done.is_file():
        r.say(f"eval {name}: {done} exists")
        return json.loads(done.read_text())
    out.mkdir(exist_ok=True)
    r.say(f"eval {name}: greedy and {r.args.eval_samples} samples per held-out question")
    sample(r, model, prompts, out / "greedy.jsonl", 1, 0.0)
    sample(r, model, prompts, out / "sampled.jsonl", r.args.eval_samples, r.args.temperature)
    a = r.args
    settings = {"model": model if a.model else f"tiny Llama built in code ({model})", "N": a.eval_samples,
                "temperature": a.temperature, "max_new_tokens": a.max_new_tokens,
                "embedder": embedding_model(r) or "all-MiniLM-L6-v2 (offline; last 256-piece window)", "seed": a.seed}
    result = evaluate.evaluate(evaluate.read_samples(str(out / "greedy.jsonl")),
                               evaluate.read_samples(str(out / "sampled.jsonl")), embed_model=embedding_model(r),
                               settings=settings)
    evaluate.write_report(result, out, title=f"Evaluation {name} SEALONG")
    r.say(f"eval {name}: greedy EM {result['average']['greedy']['em']:.1f}, SubEM {result['average']['greedy']['subem']:.1f}")
    return result


def step_sample_and_score(r: Runner, model: str) -> None:
    r.say(f"sample: {r.args.num_samples} samples per training prompt")
    sample(r, model, r.run / "prompts.jsonl", r.run / "samples.jsonl", r.args.num_samples, r.args.temperature)
    r.say("score: MBR over the samples, chosen = best, rejected = random from the lower half")
    model_flag = ["--embedding-model", embedding_model(r)] if embedding_model(r) else []
    r.call("score", ["--run-dir", str(r.run), "--seed", str(r.args.seed)] + model_flag)


def step_train(r: Runner, model: str) -> Path:
    """`sealong train`: torchrun -m sealong.train as a subprocess; resumes from its newest checkpoint if any."""
    from .train.checkpoint import latest_checkpoint

    a = r.args
    out = r.run / "train"
    marker = out / "DONE"
    if not marker.is_file():
        flags = ["--nproc-per-node", str(a.nproc_per_node), "--model", model, "--data", str(r.run / "pairs.jsonl"),
                 "--output_dir", str(out), "--seed", str(a.seed), "--resume", "true"]
        flags += opt(a, "mode", "--mode") + opt(a, "lora_r", "--lora_r") + opt(a, "lora_alpha", "--lora_alpha")
        flags += opt(a, "lr", "--lr") + opt(a, "epochs", "--epochs") + opt(a, "batch_pairs", "--batch_pairs")
        flags += opt(a, "dtype", "--dtype")
        if a.preset.startswith("demo"):
            flags += ["--gradient_checkpointing", "false", "--tensorboard", "false", "--max_length", "1024",
                      "--micro_batch_pairs", str(a.batch_pairs), "--warmup_ratio", "0.1", "--progress", "false"]
        r.say(f"train: {a.mode} on {r.run / 'pairs.jsonl'} through torchrun ({a.nproc_per_node} process(es))")
        r.call("train", flags + shlex.split(a.train_args))
        tmp = out / "DONE.tmp"  # atomic: a kill mid-write must not leave an empty marker that blocks resuming
        tmp.write_text(latest_checkpoint(str(out)) or "")
        tmp.replace(marker)
    else:
        r.say(f"train: {out} is complete")
    ckpt = marker.read_text().strip()
    if not ckpt:
        raise RuntimeError(f"pipeline: {out} holds no checkpoint")
    return Path(ckpt)


def launch_command(nproc: int, train_flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "sealong.train", *train_flags]


def step_merge(r: Runner, base: str, ckpt: Path) -> str:
    """Base weights + the LoRA adapter merged (peft), saved as a plain checkpoint for the sampler."""
    out = r.run / "after_model"
    if (out / "config.json").is_file():
        return str(out)
    adapter = ckpt / "adapter"
    tmp = r.run / "after_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter.is_dir():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        r.say(f"merge: {adapter} into {base}")
        # safetensors only (never a pickled .bin from the base folder), no remote code; the base's own dtype
        # (an 8B model merged in float32 would write 32 GB instead of 16)
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", use_safetensors=True,
                                                     trust_remote_code=False)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        for name in os.listdir(base):  # tokenizer and generation config travel with the weights
            if name.endswith((".json", ".jinja", ".model", ".txt")) and not name.startswith(("config", "model")):
                shutil.copy(Path(base, name), tmp / name)
    elif Path(ckpt, "model.safetensors").is_file():  # full fine-tuning: the checkpoint's weights
        shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
        shutil.copy(Path(ckpt, "model.safetensors"), tmp / "model.safetensors")
    else:
        raise RuntimeError(f"pipeline: {ckpt} has neither adapter/ nor model.safetensors")
    tmp.rename(out)
    return str(out)


def summary(r: Runner, before: dict, after: dict) -> str:
    """summary.md: settings, the paired test of greedy before vs after, the before/after table with CIs, the
    warm-up's consensus check (demo-gain), the legend, and links to the plots (one figure, shared y-axis)."""
    from .evaluate.report import plot_vs_n, summary_markdown

    n = r.args.eval_samples
    plot = r.run / "summary_vs_n.png"
    tmp = r.run / "summary_vs_n.tmp.png"
    plot_vs_n({"before SEALONG: SubEM against N": before, "after one SEALONG round: SubEM against N": after}, tmp)
    tmp.replace(plot)
    warmup = Path(r.run, "base_model", "warmup.json")
    dev = json.loads(warmup.read_text()).get("final_dev_check") if warmup.is_file() and not r.args.model else None
    lines = [summary_markdown(before, after, n, r.run, plot.name, dev, r.args.mode)]
    if r.args.preset.startswith("demo"):
        lines += ["This was an offline demo: a tiny model built in code, warmed up with labels on other questions of the",
                  "built-in reading world (fresh facts per question: answers must be read from the context; the base",
                  "model's training, not part of SEALONG), then the method itself without labels: contexts,",
                  f"{r.args.num_samples} samples per question, MBR scores, {r.args.mode.upper()} with LoRA through "
                  "`sealong.train`.",
                  "A model this small shows the mechanics of the loop, NOT the paper's gains",
                  "(Llama-3.1-8B-Instruct: 50.8 -> 55.0 average SubEM on LongBench).", "",
                  "The same pipeline on a real checkpoint folder and MuSiQue's training file (8 GPUs):", "",
                  REAL_COMMAND]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    args = resolve(args)
    r = Runner(args)
    r.say(f"pipeline: {args.preset} preset into {r.run}")
    model = step_base_model(r)
    step_synth(r, model)
    prompts = step_eval_set(r)
    before = step_evaluate(r, model, prompts, "before")
    step_sample_and_score(r, model)
    ckpt = step_train(r, model)
    after_model = step_merge(r, model, ckpt)
    after = step_evaluate(r, after_model, prompts, "after")
    text = summary(r, before, after)
    tmp = r.run / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(r.run / "summary.md")
    print(text)
    r.say(f"pipeline: done; tables in {r.run / 'before'} and {r.run / 'after'}, summary {r.run / 'summary.md'}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m sealong.pipeline", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
