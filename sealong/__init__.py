"""sealong: the SEALONG self-improvement pipeline (sample N, score by MBR, fine-tune), built on sealong_kernels."""

__version__ = "0.1.0"
