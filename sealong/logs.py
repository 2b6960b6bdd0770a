"""Logging of every stage: one handler on the `sealong` logger, to stderr, with the level of `--log_level`."""

import logging
import sys


def setup_logging(level: str = "info") -> logging.Logger:
    """Configure the `sealong` logger once per process (idempotent): `HH:MM:SS name: message` on stderr."""
    logger = logging.getLogger("sealong")
    logger.setLevel(level.upper())
    if not any(getattr(h, "sealong", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.sealong = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    return logger
