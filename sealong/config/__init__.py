"""sealong's configuration: one dataclass per stage (stages.py, train: sealong/train/config.py), presets as YAML
overrides (presets/), config files with one section per stage (files.py), command lines (parser.py).
Precedence everywhere: flags > --config FILE > --preset > dataclass defaults."""
