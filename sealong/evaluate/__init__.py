"""`sealong eval`: SubEM / F1 (metrics.py) over greedy, MBR@N, oracle@N and random@N outputs (report.py)."""
