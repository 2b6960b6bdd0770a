"""Config files and presets: YAML with one section per stage, keys = the stage's option names (or aliases).

    train:
      lr: 1.0e-4          # or learning_rate
      lora_r: 8
    sample:
      num_samples: 16

One format for `sealong --config F`, `sealong STAGE --config F` and `python -m sealong.train --config F`. Every
section and key is checked (an unknown one is an error with the file:line and the closest valid name), every
value is coerced to the option's type and range-checked with the file:line; YAML is parsed with the safe loader
(a `!!python/...` tag is an error, never code).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from .fields import ConfigError, canonical, check_value

PRESET_DIR = Path(__file__).parent / "presets"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    if name not in presets():
        raise ConfigError(f"--preset: unknown preset {name!r}; presets: {', '.join(presets())}")
    return PRESET_DIR / f"{name}.yaml"


def _yaml_nodes(path: Path, text: str):
    """(data, top-level node) of the YAML text; syntax and tag errors as ConfigError with the file:line."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(str(x) for x in (err.context, err.problem) if x)
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    finally:
        loader.dispose()
    return data, node


def read_config(path, stages: dict) -> dict:
    """{stage: {option: value}} of a config file, every key and value checked against `stages`
    ({name: config class}); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    data, node = _yaml_nodes(path, text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: expected sections named after the stages "
                          f"({', '.join(stages)}), got a {type(data).__name__}")
    result = {}
    for key_node, value_node in node.value:
        section, line = key_node.value, key_node.start_mark.line + 1
        if section not in stages:
            close = difflib.get_close_matches(str(section), list(stages), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            flat = canonical_or_none(stages, section)
            if flat:
                hint += f"; {section!r} is an option of [{flat}]: put it under `{flat}:`"
            raise ConfigError(f"{path}:{line}: unknown section {section!r}{hint}; sections: {', '.join(stages)}")
        if section in result:
            raise ConfigError(f"{path}:{line}: section {section!r} given twice")
        values = data[section]
        if values is None:
            result[section] = {}
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{path}:{line}: section {section!r} must be a mapping of option: value, "
                              f"got {type(values).__name__}")
        result[section] = _section(path, stages[section], section, value_node, values)
    return result


def _section(path, cls, section, node, values) -> dict:
    out = {}
    for key_node, _ in node.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        where = f"{path}:{line}: [{section}] "
        name = canonical(cls, key, where)
        if name in out:
            raise ConfigError(f"{where}{name!r} given twice")
        try:
            out[name] = check_value(cls, name, values[key])
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
    return out


def canonical_or_none(stages, key):
    """The first stage that has option `key` (for a hint on flat, section-less files)."""
    for name, cls in stages.items():
        try:
            canonical(cls, str(key))
            return name
        except ConfigError:
            continue
    return None
