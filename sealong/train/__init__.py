"""`sealong train`: the training stage (ORPO / SFT on MBR pairs; LoRA, QLoRA or full; data x sequence parallel).

    loop.py        the training loop and `python -m sealong.train` / `torchrun -m sealong.train`
    config.py      TrainConfig and the learning-rate schedule
    loss.py        the ORPO / SFT objective over packed rows (sealong_kernels.fused_linear_orpo_loss)
    pairs.py       pairs files -> packed rows (shared-prompt packing or the classic layout)
    mesh.py parallel.py distributed.py   the dp x sp mesh, zigzag sharding, process start-up
    checkpoint.py  atomic checkpoints, PEFT adapters, exact resume
"""
