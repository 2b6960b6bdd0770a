"""`sealong <stage>`: every pipeline stage as a subcommand.

    sealong synth     long-context training prompts (MuSiQue file or the built-in offline world)   sealong.data.synthetic
    sealong sample    N samples per prompt over one shared prefix                                   sealong.sample
    sealong score     MBR scores and preference pairs                                               sealong.score
    sealong train     the torchrun training job (ORPO / SFT, LoRA / QLoRA, data x sequence parallel) sealong.train
    sealong eval      SubEM / F1: greedy, MBR@N, oracle@N, random@N                                 sealong.evaluate
    sealong pipeline  all of the above into one run directory, resumable (no arguments: the offline demo)
    sealong convert   a GGUF file -> a plain checkpoint folder (a tool, not a stage)               sealong.convert

Each stage's options are the fields of its dataclass (sealong/config/stages.py, sealong/train/config.py).
Precedence: flags > `--config FILE` (one section per stage) > `--preset demo|paper` > the dataclass defaults (the
paper's settings). This module imports the stages lazily (`sealong --help` imports no torch) and is imported by
none of them.
"""

from __future__ import annotations

import argparse
import sys

from sealong import __version__
from sealong.config.stages import STAGES

EPILOG = "stages:\n" + "\n".join(f"  {name:9s} {entry[2]}" for name, entry in STAGES.items()) + (
    "\n\nWith no stage, `sealong` runs `sealong pipeline` (the offline demo). `sealong STAGE --help` lists a stage's "
    "options.\n`sealong convert --gguf FILE --out FOLDER` turns a GGUF into a checkpoint folder.\nPrecedence: flags > --config FILE > --preset > defaults (the paper's settings).")


def top_parser() -> argparse.ArgumentParser:
    """`sealong [--config F] [--preset P] [--log-level L] STAGE ...`: options before the stage name."""
    parser = argparse.ArgumentParser(
        prog="sealong", usage="sealong [--config FILE] [--preset NAME] [--log-level LEVEL] [STAGE] [stage options]",
        description="SEALONG self-improvement for long-context reasoning (arXiv 2411.08147).", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"sealong {__version__}")
    parser.add_argument("--config", metavar="FILE", help="YAML config, one section per stage")
    parser.add_argument("--preset", metavar="NAME", help="demo or paper (see `sealong STAGE --help`)")
    parser.add_argument("--log-level", "--log_level", dest="log_level", choices=["debug", "info", "warning", "error"])
    return parser


def train_launcher(argv: list, common: dict) -> int:
    """`sealong train`: check the options here (errors before any process starts), then run the same command
    line, less the launcher's own flag, under torchrun. Only what the user typed is forwarded."""
    from sealong.config.parser import resolve
    from sealong.launch import launch_command, run_job, without_launcher_flags

    resolved = resolve("train", argv, common=common, launcher=True, prog="sealong train")
    from sealong.train.pairs import check_pairs_file

    check_pairs_file(resolved.cfg.data, resolved.cfg.mode)  # a bad line: one error line here, not one per worker
    nproc = resolved.launch.get("nproc_per_node", 1)
    forwarded = [t for key, value in common.items() for t in (f"--{key}", str(value))] + without_launcher_flags(argv)
    cmd = launch_command(nproc, forwarded)
    print("sealong train: " + " ".join(cmd), file=sys.stderr)
    try:
        return run_job(cmd)  # own process group, signals forwarded, dies with this process (sealong.launch)
    except KeyboardInterrupt:  # Ctrl-C: one line of what was kept, exit code 130
        from sealong import interrupt
        from sealong.train import loop

        return interrupt.stopped("sealong train", loop, resolved.cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:  # a tool with its own flags, no stage options
        from sealong.convert import main as convert_main

        return convert_main(argv[1:])
    stage_at = next((i for i, a in enumerate(argv) if a in STAGES), None)
    if stage_at is None:
        top_parser().parse_args(argv)  # --help, --version, or an error
        argv, stage_at = argv + ["pipeline"], len(argv)  # bare `sealong`: the offline end-to-end demo
    common = {k: v for k, v in vars(top_parser().parse_args(argv[:stage_at])).items() if v is not None}
    stage, rest = argv[stage_at], argv[stage_at + 1:]
    if stage == "train":
        from sealong import interrupt

        interrupt.watch()
        try:
            return train_launcher(rest, common)
        except (ValueError, FileNotFoundError) as err:  # ConfigError, JsonlError: option or file:line
            print(f"sealong train: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # before the job started
            return interrupt.stopped("sealong train")
    from sealong.config.parser import stage_main

    return stage_main(stage, rest, prog=f"sealong {stage}", common=common)


if __name__ == "__main__":
    sys.exit(main())
