"""`torchrun ... tests/sealong/stuck_rank.py PHASE TRAIN-FLAGS`: `python -m sealong.train`, except that rank 1 falls
asleep (alive, stuck) for 600 s in PHASE of step 2, the other ranks carrying on into their next collective:

    start-up   before the job's first collective (the output_dir claim)
    forward    in the first decoder layer's forward (FSDP: after its all-gather, before the next layer's)
    backward   in the backward, at the gradient of the first decoder layer's output
    optimizer  in AdamW's step
    save       in the checkpoint save of step 2 (after its first barrier)
    none       nowhere (a plain run, e.g. the resumed one)

With SEALONG_TEST_BACKEND_TIMEOUT=S the process group's collectives wait S seconds instead of --dist_timeout (as
NCCL's abort or a caller's own group would leave the watchdog's side thread to report).
"""

import os
import sys
import time

import torch

import sealong.train.checkpoint as ckpt
import sealong.train.loop as loop

NAP = 600
PHASE = sys.argv.pop(1)
STEP = 2
current = {"step": 0}


def nap(where):
    if current["step"] == STEP or where == "start-up":
        print(f"stuck_rank: rank 1 falls asleep in {where} of step {current['step']} at {time.time():.3f}",
              file=sys.stderr, flush=True)
        time.sleep(NAP)


if os.environ.get("SEALONG_TEST_BACKEND_TIMEOUT"):
    setup = loop.setup
    loop.setup = lambda device, timeout: setup(device, timeout=float(os.environ["SEALONG_TEST_BACKEND_TIMEOUT"]))

if os.environ.get("RANK") == "1":
    train_step = loop.train_step

    def counting_step(*args, **kwargs):
        current["step"] += 1
        return train_step(*args, **kwargs)

    loop.train_step = counting_step

    if PHASE == "start-up":
        claim = loop.claim_output_dir

        def sleepy_claim(*args, **kwargs):
            nap("start-up")
            return claim(*args, **kwargs)

        loop.claim_output_dir = sleepy_claim
    elif PHASE in ("forward", "backward"):
        build = loop.build_model

        def sleepy_build(*args, **kwargs):
            model, lm_head, params = build(*args, **kwargs)
            layers = loop.fsdp.base_transformer(model).model.layers
            if PHASE == "forward":
                layers[0].register_forward_pre_hook(lambda module, args: nap("forward"))
            else:
                def on_output(module, args, output):
                    out = output[0] if isinstance(output, tuple) else output
                    if torch.is_grad_enabled() and out.requires_grad:
                        out.register_hook(lambda grad: nap("backward"))
                layers[0].register_forward_hook(on_output)
            return model, lm_head, params

        loop.build_model = sleepy_build
    elif PHASE == "optimizer":
        adamw_step = torch.optim.AdamW.step

        def sleepy_step(self, *args, **kwargs):
            nap("optimizer")
            return adamw_step(self, *args, **kwargs)

        torch.optim.AdamW.step = sleepy_step
    elif PHASE == "save":
        rng_state = ckpt._rng_state

        def sleepy_rng_state():
            nap("save")
            return rng_state()

        ckpt._rng_state = sleepy_rng_state
    elif PHASE != "none":
        raise SystemExit(f"stuck_rank.py: unknown phase {PHASE!r}")

if __name__ == "__main__":
    sys.exit(loop.main())
