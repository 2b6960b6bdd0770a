"""Data: MuSiQue and LongBench readers, the long-context builder, the built-in offline world, prompts."""
