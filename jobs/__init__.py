"""Entry points: `python -m jobs.<name>`."""

import os

# Before torch loads its OpenMP runtime (read once, at load), which the job's Ray workers inherit:
# threads that spin between parallel regions take the cores from the job's other processes (an
# Omniglot life-long run on 2 cores, trainer and shard: 115 s of training spinning, 92 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
