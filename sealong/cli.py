"""`sealong <stage>`: every pipeline stage as a subcommand, defaults from one YAML config, overridable by flags.

    sealong synth     long-context training prompts (MuSiQue file or the built-in offline world)   sealong.data.synthetic
    sealong sample    N samples per prompt over one shared prefix                                   sealong.sample
    sealong score     MBR scores and preference pairs                                               sealong.score
    sealong train     the torchrun training job (ORPO / SFT, LoRA / QLoRA, data x sequence parallel) sealong.train
    sealong eval      SubEM / F1: greedy, MBR@N, oracle@N, random@N                                 sealong.evaluate
    sealong pipeline  all of the above into one run directory, resumable (no arguments: the offline demo)

Precedence: a stage's built-in defaults < the YAML config (`--config FILE`, default `sealong/configs/default.yaml`,
one section per stage, keys = the stage's option names with underscores) < flags on the command line. A key the
stage does not know is an error listing the valid ones.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import yaml

STAGES = {
    "synth": ("sealong.data.synthetic", "synthesize long-context training prompts (and a held-out eval file)"),
    "sample": ("sealong.sample.sampler", "sample N outputs per prompt (shared-prefix sampler)"),
    "score": ("sealong.score.mbr", "score samples by MBR and select preference pairs"),
    "train": ("sealong.train.loop", "fine-tune on the pairs (ORPO or SFT, LoRA), launched through torchrun"),
    "eval": ("sealong.evaluate.report", "SubEM / F1 tables: greedy, MBR@N, oracle@N, random@N, and the plot against N"),
    "pipeline": ("sealong.pipeline", "run every stage into one run directory (no arguments: the offline demo)"),
}
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def load_config(path: str | Path | None) -> dict:
    """The YAML config as {stage: {key: value}}; `None` = the packaged default (the paper's settings)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"--config: file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of stage -> settings, got {type(data).__name__}")
    unknown = sorted(set(data) - set(STAGES))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; valid: {sorted(STAGES)}")
    for stage, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ValueError(f"{path}: section {stage!r} must be a mapping, got {type(section).__name__}")
    return {stage: dict(section or {}) for stage, section in data.items()}


def apply_config(parser: argparse.ArgumentParser, section: dict, where: str) -> None:
    """Set the YAML values as the parser's defaults; an unknown key names the valid ones."""
    dests = {a.dest for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}
    unknown = sorted(set(section) - dests)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {sorted(d for d in dests if not d.startswith('_'))}")
    parser.set_defaults(**section)


def _raw(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


class TrainLauncher:
    """`sealong train`: sealong.train's options, run as `torchrun --standalone --nproc-per-node N -m sealong.train`.

    Values from the YAML section are passed on as the strings sealong.train's own parser reads (lists
    comma-joined, booleans true/false).
    """

    def __init__(self, module):
        self.module = module
        self.__doc__ = module.__doc__

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) of the torchrun job")
        self.module.add_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        from .launch import launch_command, run_job

        if args.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
        flags = []
        for dest, value in sorted(vars(args).items()):
            if value is None or dest.startswith("_") or dest in ("nproc_per_node", "stage", "sealong_config"):
                continue
            flags += [f"--{dest}", _raw(value)]
        cmd = launch_command(args.nproc_per_node, flags)
        print("sealong train: " + " ".join(cmd), file=sys.stderr)
        return run_job(cmd)  # own process group, signals forwarded, dies with this process (sealong.launch)


def load_stage(name: str):
    """The stage module, or an ImportError that says which stage and why."""
    module_name = STAGES[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"stage {name!r} is unavailable: cannot import {module_name} ({e})") from e
    for attr in ("add_arguments", "run"):
        if not hasattr(module, attr):
            raise ImportError(f"stage {name!r}: {module_name} has no {attr}()")
    return TrainLauncher(module) if name == "train" else module


def build_parser(config: dict, config_path: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sealong", description="SEALONG self-improvement for long-context reasoning (arXiv 2411.08147).",
        epilog="With no stage, `sealong` runs `sealong pipeline` (the offline demo). `sealong STAGE --help` for options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", dest="_config_path", metavar="FILE", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    subs = parser.add_subparsers(dest="stage", metavar="STAGE")
    where = config_path or str(DEFAULT_CONFIG)
    for name, (_, help_text) in STAGES.items():
        try:
            module = load_stage(name)
        except ImportError as e:
            sub = subs.add_parser(name, help=f"{help_text} [unavailable]", description=str(e))
            sub.set_defaults(_stage_error=str(e))
            continue
        sub = subs.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        apply_config(sub, config.get(name, {}), f"{where} [{name}]")
        sub.set_defaults(_stage_module=module, _stage_parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_at = next((i for i, a in enumerate(argv) if a in STAGES), None)
    if stage_at is None and not any(a in ("-h", "--help") for a in argv):
        argv, stage_at = argv + ["pipeline"], len(argv)  # bare `sealong`: the offline end-to-end demo
    pre = argparse.ArgumentParser(add_help=False)  # `--config` before the stage name is sealong's own
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv[:stage_at])
    config = load_config(known.config)
    parser = build_parser(config, known.config)
    args = parser.parse_args(argv)
    if getattr(args, "_stage_error", None):
        parser.error(args._stage_error)
    args.sealong_config = config  # the whole YAML, for the pipeline (it runs the other stages)
    try:
        return args._stage_module.run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names the argument or file:line
        args._stage_parser.exit(2, f"sealong {args.stage}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
