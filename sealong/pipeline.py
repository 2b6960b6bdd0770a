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
    9. summary         before / after table, the monitoring table                      -> summary.md

Rounds (--rounds K > 1; K = 1 is the paper's single round, laid out as above). The base model, synth, the eval
set and the 'before' evaluation stay in run_dir; synth writes one pool of num_examples x K training prompts and
round k takes its disjoint slice, the prompts k-1, ... of the pool in file order (records (k-1)n .. kn-1,
n = num_examples, or an even K-th of a smaller pool), into run_dir/round_k/prompts.jsonl. Round k then runs
steps 4-8 in run_dir/round_k/ with the model that left round k-1 (round 1: the base model):
    samples.jsonl, scores.jsonl, pairs.jsonl, train/, after_model/, after/, monitor.json
Each round merges its adapter into the weights it sampled with and the next round trains a NEW LoRA on those
merged weights (not the old adapter continued): the sampler reads plain checkpoints, each round's preference
pairs come from that merged model, so its LoRA starts from zero at the policy that produced them (the practice
of iterative DPO and Self-Rewarding LMs, Yuan et al. 2024, arXiv 2401.10020), and every round's model is a
complete checkpoint that can be evaluated, sampled or served alone.
A round whose after/eval.json and monitor.json exist is complete and skipped, so a killed run resumes in the round
it stopped in. Early stop: after a round's scoring and before its training, the round is not trained and the run
ends (reason printed and written to summary.md and the round's monitor.json) when its samples agree (mean
top-cluster share >= --stop-consensus; rounds > 1 only) or fewer than --min-pairs pairs (default: the training
job's batch_pairs, one optimizer step; also with one round, e.g. no pair at all) survived scoring
(sealong.evaluate.rounds).
Every round's label-free statistics and labelled held-out numbers go to round_k/monitor.json and summary.md's
table (and summary_rounds.png for K > 1).
Every stage runs with the options `sealong <stage>` would get from the same --config file and preset (the demo
preset without --model, else the paper's, i.e. the defaults), the pipeline's own options that set a stage's
option on top; the resolved settings of every stage are written to run_dir/config.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import time
from pathlib import Path

from .config.parser import make
from .config.stages import STAGES

log = logging.getLogger("sealong.pipeline")
REAL_COMMAND = (
    "sealong pipeline --run-dir runs/llama31-8b --model /models/Llama-3.1-8B-Instruct \\\n"
    "    --musique data/musique_ans_v1.0_train.jsonl \\\n"
    "    --eval-files longbench/qasper.jsonl,longbench/multifieldqa_en.jsonl,longbench/hotpotqa.jsonl,"
    "longbench/musique.jsonl,longbench/2wikimqa.jsonl \\\n"
    "    --nproc-per-node 8 --train-args \"--sp 8 --ulysses 4\" --trust-remote-code")


def stage_configs(cfg, sections: dict) -> dict:
    """{stage: config} of the run: each stage's section (preset and --config file) with the pipeline's options
    that set a stage option on top (those given: None leaves the stage's own value)."""
    configs = {}
    for stage, (cls, _, _) in STAGES.items():
        if stage == "pipeline":
            continue
        values = dict(sections.get(stage, {}))
        for f in dataclasses.fields(cfg):
            if stage in f.metadata.get("sets", ()) and getattr(cfg, f.name) is not None:
                values[f.name] = getattr(cfg, f.name)
        configs[stage] = make(cls, values)
    if cfg.embedding_model is not None:  # one embedder for MBR in scoring and MBR@N in evaluation
        configs["score"] = dataclasses.replace(configs["score"], model=cfg.embedding_model)
        configs["eval"] = dataclasses.replace(configs["eval"], embed_model=cfg.embedding_model)
    if cfg.trust_remote_code:  # the user's flag: that embedder may run its own code (jina-embeddings-v3)
        configs["score"] = dataclasses.replace(configs["score"], trust_remote_code=True)
        configs["eval"] = dataclasses.replace(configs["eval"], trust_remote_code=True)
    return configs


def check(cfg, preset: str | None = None) -> None:
    """The inputs exist and fit together, before any work."""
    if preset is not None and preset.startswith("demo") and cfg.model is not None:
        raise ValueError(f"--preset {preset}: the demo presets build their own tiny model; drop --model")
    if cfg.tiny_shape:
        from .tiny import parse_overrides

        parse_overrides(cfg.tiny_shape)  # a mistyped field fails here, before any work
    if cfg.model is not None and not Path(cfg.model, "config.json").is_file():
        raise FileNotFoundError(f"--model: no config.json in {cfg.model}")
    if cfg.musique is not None and not Path(cfg.musique).is_file():
        raise FileNotFoundError(f"--musique: file not found: {cfg.musique}")
    if cfg.musique is not None and cfg.eval_files is None:
        raise ValueError("--eval-files: needed with --musique (LongBench v1 JSONL files; `sealong synth --musique "
                         "TRAIN --eval-musique DEV` converts MuSiQue questions to that format)")
    if cfg.model is not None and cfg.eval_files is None:
        log.info("no --eval-files: evaluating on the built-in world's held-out questions")
    if cfg.eval_files is not None:  # RULER / LongBench v2 files go to the suite table; v1 files to both
        from .evaluate.suite import file_kind

        if "longbench" not in [file_kind(f.strip()) for f in cfg.eval_files.split(",")]:
            raise ValueError("--eval-files: give at least one LongBench v1 file (the before/after tables); RULER and "
                             "LongBench v2 files are evaluated in the suite table beside it")


def check_train_args(cfg, configs: dict, preset: str | None):
    """--train-args parsed and layered over the run's train section as the training job will (it reads
    config.yaml), before any work (an error exits 2 here); returns the training job's config (its batch_pairs is
    the default of --min-pairs)."""
    import tempfile

    from .config.parser import resolve

    with tempfile.TemporaryDirectory(prefix="sealong-config-") as folder:
        path = Path(folder, "config.yaml")
        path.write_text(config_text(cfg, configs, preset))
        return resolve("train", ["--config", str(path), "--model", "-", "--data", "-", *shlex.split(cfg.train_args)],
                       prog="sealong pipeline --train-args").cfg


class Runner:
    """Runs the steps in order, logging one line per step and whether it was done already."""

    def __init__(self, cfg, configs: dict, preset: str | None, log_level: str = "info"):
        self.args, self.configs, self.preset, self.log_level = cfg, configs, preset, log_level
        self.run = Path(cfg.run_dir)
        self.run.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()

    def say(self, msg: str) -> None:
        log.info(f"[{time.perf_counter() - self.started:6.1f}s] {msg}")

    def stage_config(self, stage: str, **values):
        """The run's config of `stage` with the step's own values (paths, N, ...), checked."""
        return dataclasses.replace(self.configs[stage], **values)

    def call(self, stage: str, **values) -> None:
        import importlib

        from .config.fields import check_required

        cfg = self.stage_config(stage, **values)
        check_required(cfg)
        rc = importlib.import_module(STAGES[stage][1]).run(cfg)
        if rc:
            raise RuntimeError(f"pipeline: stage {stage} failed with exit code {rc}")

    def write_config(self) -> Path:
        """run_dir/config.yaml: every stage's resolved settings (the same format as --config)."""
        path = self.run / "config.yaml"
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(config_text(self.args, self.configs, self.preset))
        tmp.replace(path)
        return path


def config_text(cfg, configs: dict, preset: str | None) -> str:
    """config.yaml's text: the pipeline's options and every stage's resolved settings (the format of --config)."""
    import yaml

    data = {"pipeline": cfg.to_dict(), **{s: c.to_dict() for s, c in configs.items()}}
    return (f"# sealong pipeline, preset {preset}: the resolved settings of every stage\n"
            + yaml.safe_dump(data, sort_keys=False))


# ---- the steps ----------------------------------------------------------------------------------------------------

def step_base_model(r: Runner) -> str:
    a = r.args
    if a.model is not None:
        return a.model
    folder = r.run / "base_model"
    if (folder / "config.json").is_file():
        r.say(f"base model: {folder} exists")
        return str(folder)
    from .tiny import build_base_model

    r.say("base model: building a tiny Llama and a word-level tokenizer in code; labelled warm-up on other questions "
          "of the built-in world (the base model's own training, NOT part of SEALONG)")
    cfg = tiny_config(a, r.configs, r.preset)
    synth = r.configs["synth"]
    stats = build_base_model(folder, cfg, skip_questions=synth.num_examples * a.rounds + synth.num_eval, log=r.say)
    if stats["warmup_steps_run"]:
        r.say(f"base model: warm-up loss {stats['warmup_loss_first']:.2f} -> {stats['warmup_loss_last']:.2f} "
              f"in {stats['warmup_seconds']:.0f}s")
    else:
        r.say("base model: no warm-up (--tiny-warmup-steps 0): the randomly initialised model")
    if stats.get("final_dev_check"):
        r.say("base model: labelled dev slice: " + ", ".join(f"{k} {v:.1f}" for k, v in stats["final_dev_check"].items()))
    return str(folder)


def tiny_config(a, configs: dict, preset: str | None):
    """The `sealong.tiny.TinyConfig` of the demo's base model: the synth and sample stages' lengths, world and seed,
    then the preset's `tiny_shape` (demo-gain), then `--tiny-warmup-steps`."""
    from .tiny import TinyConfig, parse_overrides

    synth, sample_cfg = configs["synth"], configs["sample"]
    gain = preset == "demo-gain"  # stop the warm-up on the labelled dev slice; check consensus vs greedy there
    values = dict(min_tokens=synth.min_tokens, max_tokens=synth.max_tokens, seed=synth.seed,
                  check_every=300 if gain else 0, max_new_tokens=sample_cfg.max_new_tokens,
                  temperature=sample_cfg.temperature, world_passages=synth.world_passages,
                  world_hops=tuple(int(h) for h in synth.world_hops.split("+")))
    values.update(parse_overrides(a.tiny_shape or ""))
    if a.tiny_warmup_steps is not None:
        values["warmup_steps"] = a.tiny_warmup_steps
    return TinyConfig(**values)


def step_synth(r: Runner, model: str) -> None:
    a = r.args
    r.say("synth: long-context training prompts (no answers)" + (f", a pool for {a.rounds} rounds" if a.rounds > 1 else ""))
    r.call("synth", out_dir=str(r.run), tokenizer=model, num_examples=r.configs["synth"].num_examples * a.rounds,
           **({"musique": a.musique} if a.musique else {}), **({"num_eval": 0} if a.eval_files is not None else {}))


def round_dir(r: Runner, k: int) -> Path:
    """Where round k's files go: run_dir itself for the paper's single round, else run_dir/round_k."""
    return r.run if r.args.rounds == 1 else r.run / f"round_{k}"


def step_round_prompts(r: Runner, k: int) -> Path:
    """round_k/prompts.jsonl: the k-th of `rounds` disjoint slices of the pool (in file order)."""
    from .data.synthetic import write_jsonl_atomic
    from .jsonl import read_jsonl

    folder = round_dir(r, k)
    out = folder / "prompts.jsonl"
    if r.args.rounds == 1 or out.is_file():
        return out
    pool = list(read_jsonl(str(r.run / "prompts.jsonl")))
    size = min(r.configs["synth"].num_examples, len(pool) // r.args.rounds)
    if size < 1:
        raise ValueError(f"{r.run / 'prompts.jsonl'}: {len(pool)} prompts cannot give {r.args.rounds} rounds one each")
    folder.mkdir(exist_ok=True)
    write_jsonl_atomic(out, pool[(k - 1) * size:k * size])
    r.say(f"round {k}: prompts {(k - 1) * size} .. {k * size - 1} of the pool -> {out}")
    return out


def step_eval_set(r: Runner) -> Path:
    from .data.longbench import read_longbench, to_prompt
    from .data.synthetic import write_jsonl_atomic

    out = r.run / "eval_prompts.jsonl"
    if out.is_file():
        return out
    from .evaluate.suite import file_kind

    files = ([f for f in r.args.eval_files.split(",") if file_kind(f.strip()) == "longbench"] if r.args.eval_files
             else [str(r.run / "eval.jsonl")])
    records = [to_prompt(rec) for f in files for rec in read_longbench(f.strip())]
    n = write_jsonl_atomic(out, records)
    r.say(f"eval set: {n} held-out questions from {', '.join(files)}")
    return out


def sample(r: Runner, model: str, prompts: Path, output: Path, **values) -> None:
    values.setdefault("nproc_per_node", r.args.nproc_per_node)  # data-parallel sampling on the training job's processes
    r.call("sample", model=model, prompts=str(prompts), output=str(output), **values)


def step_evaluate(r: Runner, model: str, prompts: Path, name: str) -> dict:
    from .evaluate import report as evaluate

    out = r.run / name
    done = out / "eval.json"
    if done.is_file():
        r.say(f"eval {name}: {done} exists")
        return json.loads(done.read_text())
    out.mkdir(exist_ok=True)
    r.say(f"eval {name}: greedy and {r.args.eval_samples} samples per held-out question")
    # evaluation always draws its N samples (an adaptive sample count applies to the training samples only)
    sample(r, model, prompts, out / "greedy.jsonl", num_samples=1, temperature=0.0, adaptive_block=0)
    sample(r, model, prompts, out / "sampled.jsonl", num_samples=r.args.eval_samples, adaptive_block=0)
    e, s = r.configs["eval"], r.configs["sample"]
    settings = {"model": model if r.args.model else f"tiny Llama built in code ({model})", "N": r.args.eval_samples,
                "temperature": s.temperature, "max_new_tokens": s.max_new_tokens,
                "embedder": e.embed_model or f"all-MiniLM-L6-v2 (offline; {e.window} 256-piece window)", "seed": s.seed}
    result = evaluate.evaluate(evaluate.read_samples(str(out / "greedy.jsonl")),
                               evaluate.read_samples(str(out / "sampled.jsonl")), embed_model=e.embed_model,
                               mbr=not e.no_mbr, trust_remote_code=e.trust_remote_code, settings=settings,
                               window=e.window)
    evaluate.write_report(result, out, title=f"Evaluation {name} SEALONG")
    r.say(f"eval {name}: greedy EM {result['average']['greedy']['em']:.1f}, SubEM {result['average']['greedy']['subem']:.1f}")
    return result


def step_sample_and_score(r: Runner, model: str, folder: Path | None = None) -> None:
    """Sample folder/prompts.jsonl (default folder: the run directory) and score the samples into folder."""
    folder = r.run if folder is None else folder
    r.say(f"sample: {r.configs['sample'].num_samples} samples per training prompt")
    sample(r, model, folder / "prompts.jsonl", folder / "samples.jsonl")
    r.say("score: MBR over the samples, chosen = best, rejected = random from the lower half")
    r.call("score", run_dir=str(folder), nproc_per_node=r.args.nproc_per_node)


def step_train(r: Runner, model: str, folder: Path) -> Path:
    """`sealong train`: torchrun -m sealong.train as a subprocess; resumes from its newest checkpoint if any."""
    import subprocess

    from .train.checkpoint import latest_checkpoint
    from .launch import launch_command, run_job

    a = r.args
    out = folder / "train"
    marker = out / "DONE"
    if not marker.is_file():
        # the run's resolved train section (config.yaml) under this step's own flags, then --train-args
        flags = ["--config", str(r.config_path), "--log_level", r.log_level, "--model", model,
                 "--data", str(folder / "pairs.jsonl"), "--output_dir", str(out), "--resume"]
        r.say(f"train: {r.configs['train'].mode} on {folder / 'pairs.jsonl'} through torchrun "
              f"({a.nproc_per_node} process(es))")
        rc = run_job(launch_command(a.nproc_per_node, flags + shlex.split(a.train_args)))  # dies with the pipeline
        if rc:
            raise RuntimeError(f"pipeline: stage train failed with exit code {rc}")
        tmp = out / "DONE.tmp"  # atomic: a kill mid-write must not leave an empty marker that blocks resuming
        tmp.write_text(latest_checkpoint(str(out)) or "")
        tmp.replace(marker)
    else:
        r.say(f"train: {out} is complete")
    ckpt = marker.read_text().strip()
    if not ckpt:
        raise RuntimeError(f"pipeline: {out} holds no checkpoint")
    return Path(ckpt)


def step_merge(r: Runner, base: str, ckpt: Path, folder: Path) -> str:
    """Base weights (the model the round sampled with) + the round's LoRA adapter merged (peft), saved as a plain
    checkpoint for the sampler: folder/after_model."""
    out = folder / "after_model"
    if (out / "config.json").is_file():
        return str(out)
    adapter = ckpt / "adapter"
    tmp = folder / "after_model.tmp"
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


def summary(r: Runner, before: dict, after: dict | None, monitors: list[dict]) -> str:
    """summary.md: settings, the paired test of greedy before vs after (the model after the last trained round),
    the before/after table with CIs, the warm-up's consensus check (demo-gain), the legend, links to the plots
    (one figure, shared y-axis), and the monitoring table across rounds (sealong.evaluate.rounds)."""
    from .evaluate import rounds
    from .evaluate.report import advice_markdown, modes_table, plot_vs_n, settings_header, summary_markdown

    n = r.args.eval_samples
    mode = r.configs["train"].mode
    trained = [m for m in monitors if not m.get("stopped")]
    if after is not None:
        plot = r.run / "summary_vs_n.png"
        tmp = r.run / "summary_vs_n.tmp.png"
        name = "one SEALONG round" if len(trained) == 1 else f"{len(trained)} SEALONG rounds"
        plot_vs_n({"before SEALONG: SubEM against N": before, f"after {name}: SubEM against N": after}, tmp)
        tmp.replace(plot)
        warmup = Path(r.run, "base_model", "warmup.json")
        dev = json.loads(warmup.read_text()).get("final_dev_check") if warmup.is_file() and not r.args.model else None
        after_dir = round_dir(r, len(trained)).relative_to(r.run) / "after"
        lines = [summary_markdown(before, after, n, r.run, plot.name, dev, mode, rounds=len(trained),
                                  after_dir=after_dir.as_posix())]
    else:  # round 1 stopped before training: the base model's table only
        lines = ["# SEALONG run summary", "", f"run directory: {r.run}; no round trained", "", settings_header(before),
                 "", "## Base model (before)", "", modes_table(before)]
    advice = advice_markdown({"before (the base model)": before, **({"after": after} if after else {})}, n,
                             demo=r.preset == "demo")
    if advice:  # MBR@N below random@N or greedy: say so, and what to try next
        lines += ["", advice]
    if after is not None:  # every task before vs after, paired (sealong.evaluate.suite)
        from .evaluate.suite import pipeline_section

        lines.append(pipeline_section(r, round_dir(r, len(trained)) / "after"))
    plot_name = None
    if r.args.rounds > 1:
        plot_name = "summary_rounds.png"
        rounds.plot_rounds(before, monitors, r.run / plot_name)
    lines.append(rounds.rounds_markdown(before, monitors, plot_name))
    if r.preset.startswith("demo"):
        lines += ["This was an offline demo: a tiny model built in code, warmed up with labels on other questions of the",
                  "built-in reading world (fresh facts per question: answers must be read from the context; the base",
                  "model's training, not part of SEALONG), then the method itself without labels: contexts,",
                  f"{r.configs['sample'].num_samples} samples per question, MBR scores, {mode.upper()} with LoRA "
                  "through `sealong.train`.",
                  "A model this small shows the mechanics of the loop, NOT the paper's gains",
                  "(Llama-3.1-8B-Instruct: 50.8 -> 55.0 average SubEM on LongBench).", "",
                  "The same pipeline on a real checkpoint folder and MuSiQue's training file (8 GPUs):", "",
                  REAL_COMMAND]
    return "\n".join(lines) + "\n"


def run_rounds(r: Runner, model: str, prompts: Path, before: dict) -> tuple[dict | None, list[dict]]:
    """Rounds 1..K (see the module docstring); returns the eval result of the last trained model (None when round 1
    stopped before training) and every round's monitor record."""
    from .evaluate import rounds

    a, after, monitors = r.args, None, []
    for k in range(1, a.rounds + 1):
        folder = round_dir(r, k)
        done, monitor_path = folder / "after" / "eval.json", folder / "monitor.json"
        if done.is_file() and monitor_path.is_file() and (folder / "after_model" / "config.json").is_file():
            r.say(f"round {k}: complete ({folder})")
            model, after = str(folder / "after_model"), json.loads(done.read_text())
            monitors.append(json.loads(monitor_path.read_text()))
            continue
        if a.rounds > 1:
            r.say(f"round {k} of {a.rounds}: sampling with {model}")
        step_round_prompts(r, k)
        step_sample_and_score(r, model, folder)
        monitor = rounds.round_monitor(folder, k)
        min_pairs = a.min_pairs if a.min_pairs is not None else r.train_cfg.batch_pairs  # one optimizer step
        # one round: only the pairs' count (fewer than one optimizer step's, e.g. none: nothing to train on)
        reason = rounds.stop_reason(monitor["label_free"], a.stop_consensus if a.rounds > 1 else math.inf, min_pairs)
        if reason:
            monitor["stopped"] = f"stopped before training round {k}: {reason}"
            rounds.write_monitor(folder, monitor)
            monitors.append(monitor)
            print(f"sealong pipeline: {monitor['stopped']}", flush=True)
            r.say(monitor["stopped"])
            break
        ckpt = step_train(r, model, folder)
        model = step_merge(r, model, ckpt, folder)
        after = step_evaluate(r, model, prompts, (folder.relative_to(r.run) / "after").as_posix())
        monitor = rounds.round_monitor(folder, k, after)
        rounds.write_monitor(folder, monitor)
        monitors.append(monitor)
        r.say(f"round {k}: " + rounds.monitor_line(monitor))
    return after, monitors


def run(cfg, resolved=None) -> int:
    """Every step in order; `resolved` (sealong.config.parser.Resolved) carries the stage sections of the preset
    and --config file; without it, the preset the pipeline would pick (demo without --model, else paper)."""
    from .lock import claim_output

    if resolved is None:
        from .config.parser import resolve

        resolved = resolve("pipeline", [] if cfg.model is None else ["--model", cfg.model])
    from . import preflight

    preset = resolved.common["preset"]
    check(cfg, preset)
    configs = stage_configs(cfg, resolved.sections)
    train_cfg = check_train_args(cfg, configs, preset)
    preflight.check_run(cfg, configs, train_cfg)  # every setting and resource of the run, before its first step
    with claim_output(cfg.run_dir, directory=True, what="--run-dir"):  # writable, one pipeline per run dir
        return _run(cfg, resolved, configs, train_cfg)


def _run(cfg, resolved, configs: dict, train_cfg) -> int:
    from . import preflight, provenance

    import yaml

    now = yaml.safe_load(config_text(cfg, configs, resolved.common["preset"]))
    meta = provenance.read_meta(str(cfg.run_dir), directory=True)
    if meta is not None and meta["settings"].get("rounds", 1) != cfg.rounds:  # the pool and layout follow it
        others = preflight.recorded_differences(cfg.run_dir, now)
        raise ValueError(f"--rounds {cfg.rounds}: {cfg.run_dir} was started with --rounds "
                         f"{meta['settings'].get('rounds', 1)}; use that value or another --run-dir"
                         + (f" (other settings differ too: {'; '.join(others)})" if others else ""))
    preflight.check_rerun(cfg.run_dir, now)  # its outputs' settings: config.yaml is rewritten only if they agree
    r = Runner(cfg, configs, resolved.common["preset"], resolved.common["log_level"])
    r.config_path, r.train_cfg = r.write_config(), train_cfg
    if meta is None:  # how the run directory was started
        settings = dict(provenance.settings_of(cfg), preset=r.preset)
        provenance.write_meta(str(r.run), provenance.stage_meta("pipeline", settings, cfg.model), directory=True)
    r.say(f"pipeline: {r.preset} preset into {r.run}; settings in {r.config_path}")
    model = step_base_model(r)
    step_synth(r, model)
    prompts = step_eval_set(r)
    before = step_evaluate(r, model, prompts, "before")
    from .evaluate import suite

    suite_set = suite.suite_prompts(r, model)  # RULER / LongBench v2: greedy before and after, the suite table
    suite.suite_sample(r, model, suite_set, r.run / "before", sample)
    after, monitors = run_rounds(r, model, prompts, before)
    trained = [m for m in monitors if not m.get("stopped")]
    if after is not None:
        suite.suite_sample(r, str(round_dir(r, len(trained)) / "after_model"), suite_set,
                           round_dir(r, len(trained)) / "after", sample)
    text = summary(r, before, after, monitors)
    tmp = r.run / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(r.run / "summary.md")
    print(text)
    r.say(f"pipeline: done; tables in {r.run / 'before'} and the rounds' after/, summary {r.run / 'summary.md'}")
    return 0


def kept_on_interrupt(cfg) -> str:
    """What a Ctrl-C leaves (sealong.interrupt): every finished step, and the interrupted step's own progress."""
    return (f"the finished steps and the interrupted step's progress are kept in {cfg.run_dir}; the same command "
            "resumes")


def main(argv=None) -> int:
    from .config.parser import stage_main

    return stage_main("pipeline", argv, prog="python -m sealong.pipeline")


if __name__ == "__main__":
    import sys

    sys.exit(main())
