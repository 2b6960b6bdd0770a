"""`sealong score`: MBR scores of the samples and the preference pairs (mbr.py; embeddings in embed.py)."""
