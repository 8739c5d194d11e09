"""Entry points: `python -m jobs.<name>`."""

import os

# Before torch loads its OpenMP runtime (read once, at load), which the job's Ray workers inherit:
# threads that spin-wait between parallel regions take the cores from faiss and from the other
# processes of a job (a 1M-slot ivf memory step on 2 cores: 1.17 s spinning, 0.41 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
