"""Command lines of the stages: transformers' HfArgumentParser over the stage's dataclass, and the layering

    dataclass defaults  <  preset (--preset demo|paper)  <  --config FILE (the stage's section)  <  flags

`--key_name` and `--key-name` are both accepted, as are the aliases HF / TRL users type; booleans are bare
flags (`--qlora`) or take true/false; values keep their type (a string stays the string typed). Only the flags
the user gave are layered over the file: a default never hides a config value.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import importlib
import sys
from dataclasses import dataclass
from typing import Literal, Optional

from .fields import ARGPARSE_KEYS, ConfigError, check_required, check_value, option
from .files import preset_path, presets, read_config
from .stages import STAGES

_UNSET = object()


@dataclass
class CommonOptions:
    """Options of every stage (also accepted before the stage name: `sealong --config F STAGE`)."""

    _argument_group_name = "options of every stage"
    config: Optional[str] = option(None, "YAML file, one section per stage (synth, sample, score, train, eval, "
                                   "pipeline); over the preset, under flags")
    preset: Optional[str] = option(None, "overrides under --config and flags: demo (the offline CPU demo) or paper "
                                   "(the defaults); pipeline: demo without --model, else paper")
    log_level: Literal["debug", "info", "warning", "error"] = option("info", "logging level")


@dataclass
class LaunchOptions:
    """`sealong train` only: the torchrun job."""

    _argument_group_name = "launcher (sealong train)"
    nproc_per_node: int = option(1, "processes (GPUs) of the torchrun job", ge=1)


@dataclass
class Resolved:
    stage: str
    cfg: object               # the stage's config dataclass
    common: dict              # config, preset (the one in force), log_level
    sections: dict            # {stage: {option: value}}: preset and file merged, for every stage (the pipeline's)
    flags: dict               # the options given as flags
    launch: dict              # LaunchOptions given as flags


def build_parser(stage: str, prog: str | None = None, launcher: bool = False):
    """The HfArgumentParser of a stage: its dataclass, the common options (and the launcher's)."""
    from transformers import HfArgumentParser

    class StageParser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, field):
            field = copy.copy(field)  # our metadata keys (ranges, ...) are not argparse's
            field.metadata = {k: v for k, v in field.metadata.items() if k in ARGPARSE_KEYS}
            HfArgumentParser._parse_dataclass_field(parser, field)

        def error(self, message):  # one line, not the usage of every option
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    cls = STAGES[stage][0]
    types = [cls, CommonOptions] + ([LaunchOptions] if launcher else [])
    parser = StageParser(types, prog=prog or f"sealong {stage}", description=(cls.__doc__ or "").strip(),
                         allow_abbrev=False)
    lists = {f.name for f in dataclasses.fields(cls) if "list" in str(f.type)}
    for action in parser._actions:
        if action.dest in lists:
            action.type = None  # "a,b" or a b: split and typed by check_value
    return parser


def parse_flags(parser, argv) -> dict:
    """{dest: value} of the flags given (nothing for the ones left out); an unknown flag suggests the closest."""
    ns = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != "help"})
    ns, rest = parser.parse_known_args(argv, namespace=ns)
    if rest:
        hints = []
        for token in rest:
            close = difflib.get_close_matches(token.split("=")[0], list(parser._option_string_actions), n=1)
            if token.startswith("-") and close:
                hints.append(f"{token.split('=')[0]} (did you mean {close[0]}?)")
        parser.error(f"unrecognized arguments: {' '.join(rest)}" + (f"; {', '.join(hints)}" if hints else ""))
    return {k: v for k, v in vars(ns).items() if v is not _UNSET}


def make(cls, values: dict):
    """The config from layered values (each checked), then its own checks."""
    checked = {}
    for name, value in values.items():
        try:
            checked[name] = check_value(cls, name, value)
        except ConfigError as err:
            raise ConfigError(f"{cls.stage}: --{err}") from None
    return cls(**checked)


def resolve(stage: str, argv, common: dict | None = None, launcher: bool = False, prog: str | None = None) -> Resolved:
    """Parse a stage's command line and layer it: defaults < preset < --config file < flags."""
    parser = build_parser(stage, prog, launcher)
    flags = parse_flags(parser, list(argv))
    common = {**{f.name: f.default for f in dataclasses.fields(CommonOptions)}, **(common or {}),
              **{f.name: flags.pop(f.name) for f in dataclasses.fields(CommonOptions) if f.name in flags}}
    launch = {f.name: flags.pop(f.name) for f in dataclasses.fields(LaunchOptions) if launcher and f.name in flags}
    for name, value in launch.items():
        try:
            check_value(LaunchOptions, name, value)
        except ConfigError as err:
            raise ConfigError(f"{stage}: --{err}") from None
    classes = {name: entry[0] for name, entry in STAGES.items()}
    file = read_config(common["config"], classes) if common["config"] else {}
    preset = common["preset"]
    if preset is None and stage == "pipeline":
        model = flags.get("model", file.get("pipeline", {}).get("model"))
        preset = "demo" if model is None else "paper"
    layers = read_config(preset_path(preset), classes) if preset else {}
    sections = {s: {**layers.get(s, {}), **file.get(s, {})} for s in classes}
    cfg = make(classes[stage], {**sections[stage], **flags})
    try:
        check_required(cfg)
    except ConfigError as err:
        raise ConfigError(f"{stage}: {err}") from None
    return Resolved(stage, cfg, {**common, "preset": preset}, sections, flags, launch)


def stage_main(stage: str, argv=None, prog: str | None = None, common: dict | None = None) -> int:
    """`python -m sealong.<stage>` and `sealong <stage>`: resolve, set up logging, run; a bad option, value or
    input file is one line `prog: error: ...` and exit code 2."""
    from sealong.extras import MissingExtra
    from sealong.logs import setup_logging

    from sealong import interrupt

    module_name = STAGES[stage][1]
    prog = prog or f"python -m {module_name}"
    argv = list(sys.argv[1:] if argv is None else argv)
    module = cfg = None
    interrupt.watch()
    try:
        r = resolve(stage, argv, common=common, prog=prog)
        cfg = r.cfg
        setup_logging(r.common["log_level"])
        module = importlib.import_module(module_name)
        return module.run(r.cfg, r) if stage == "pipeline" else module.run(r.cfg)
    except BaseException as err:
        if interrupt.interrupted(err):  # Ctrl-C: one line of what was kept, exit code 130 (sealong.interrupt)
            return interrupt.stopped(prog, module, cfg)
        if isinstance(err, (ValueError, FileNotFoundError)):  # ConfigError, JsonlError: names option or file:line
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, MissingExtra):  # an option whose package is in an extra
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 1
        raise


__all__ = ["CommonOptions", "LaunchOptions", "Resolved", "build_parser", "make", "presets", "resolve", "stage_main"]
