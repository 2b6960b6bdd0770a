"""`sealong train`'s job: `torchrun --standalone --nproc-per-node N -m sealong.train FLAGS` (no torch import)."""

import sys


def launch_command(nproc: int, train_flags: list) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "sealong.train", *train_flags]


def without_launcher_flags(argv: list) -> list:
    """`argv` less `--nproc-per-node N` / `--nproc_per_node=N`: what sealong.train itself reads."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in ("--nproc-per-node", "--nproc_per_node"):
            skip = "=" not in token
            continue
        out.append(token)
    return out
