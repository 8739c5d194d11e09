"""Fault-injection soak of ShardedMemory: 2 writers x 3 shards step through a seeded stream (age
noise on) while shards, writers and the coordinator are killed at seeded random steps; the memory
must end equal to one LocalMemory fed the same batches. Prints steps/s without kills (a calm run
in the same process) and with them, and every kill with the wall time of its step.

    python -m jobs.soak                     # 5,000 steps, 12 kills (the slow test's run)
    python -m jobs.soak --steps 100000      # the long version (kills: one per 400 steps)

Exit status 1 if the final state differs from the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from distmem.distributed import connect
from distmem.distributed.soak import SoakConfig, SoakReport, run_soak


def run(cfg: SoakConfig, label: str) -> SoakReport:
    with tqdm(total=cfg.steps, desc=label, unit="step") as bar:
        return run_soak(cfg, progress=lambda n: bar.update(n - bar.n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5000, help="steps of the stream with kills (default 5000)")
    p.add_argument("--kills", type=int, default=None, help="kills (default: max(12, steps // 400))")
    p.add_argument("--calm-steps", type=int, default=1000, help="steps of the run without kills (default 1000)")
    p.add_argument("--seed", type=int, default=7, help="seed of the stream and of the kills (default 7)")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--writers", type=int, default=2)
    p.add_argument("--address", default=None, help="Ray cluster HOST:PORT (default: $RAY_ADDRESS, else an embedded "
                                                    "local Ray)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    kills = args.kills if args.kills is not None else max(12, args.steps // 400)
    try:
        soak = SoakConfig(steps=args.steps, kills=kills, seed=args.seed, shards=args.shards, writers=args.writers)
        calm_cfg = SoakConfig(steps=args.calm_steps, kills=0, seed=args.seed, shards=args.shards,
                              writers=args.writers)
    except ValueError as err:
        p.error(str(err))
    try:
        connect(args.address)
    except ConnectionError as err:
        p.error(str(err))
    calm = run(calm_cfg, "without kills")
    faults = run(soak, f"with {kills} kills")
    print(f"without kills: {calm.summary()}\nwith kills:    {faults.summary()}")
    for kill in faults.kills:
        print(f"  step {kill.step:>6}: {kill.kind:<11} {kill.target} killed {kill.moment:<13} "
              f"step took {kill.recovery_s:.2f} s")
    if args.out is not None:
        args.out.write_text(json.dumps({
            "steps": faults.steps, "kills": [vars(k) for k in faults.kills], "redone_steps": faults.redone_steps,
            "steps_per_s_with_kills": faults.steps_per_s, "steps_per_s_without_kills": calm.steps_per_s,
            "calm_steps": calm.steps, "final_state_equal": faults.equal and calm.equal}, indent=2))
    return 0 if faults.equal and calm.equal else 1


if __name__ == "__main__":
    sys.exit(main())
