"""What every training job does around its task: the command line built from a run-config
dataclass and its presets, the run folder, and a progress bar that follows the trainers.

    cfg, args = parse_run_config(OmniglotRunConfig, PRESETS, __doc__, argv, counts=("workers", "batches"))
    store = open_run(cfg, args, name="omniglot-default-episodic")
    result = follow(store, total, "training", train_fn, unit="batch", key="batch", postfix=...)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, fields
from typing import Any, Callable, TypeVar

from tqdm import tqdm

from distmem.runs import RunStore

Config = TypeVar("Config")


def _flag(text: str) -> bool:
    """A boolean flag's value: on/off (also true/false, yes/no, 1/0)."""
    value = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return value[text.lower()]


def parse_run_config(cls: type[Config], presets: dict[str, dict], description: str | None,
                     argv: list[str] | None, counts: tuple[str, ...] = ()) -> tuple[Config, argparse.Namespace]:
    """A run config from --preset (or --resume RUN's config.json) plus one flag per field; the
    fields named in `counts` must be >= 1. Also parses --storage, --resume, --address,
    --memory-storage and --max-failures."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets), default="default")
    p.add_argument("--storage", "--runs", dest="storage", default="runs",
                   help="where run folders go: a local folder (default ./runs) or a URI (s3://bucket/prefix, "
                        "gs://..., file:///...) so results outlive the cluster")
    p.add_argument("--resume", default=None, help="a run folder (path or URI) to continue")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else an "
                                                   "embedded local Ray)")
    p.add_argument("--memory-storage", default=None, help="a folder every node reaches for the life-long memory "
                                                          "shards' snapshots and write logs")
    p.add_argument("--max-failures", type=int, default=3, help="trainer-group restarts after a lost worker")
    for f in fields(cls):
        if f.name != "preset":
            kind = {"int": int, "float": float, "bool": _flag}.get(str(f.type), str)
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None,
                           metavar="{on,off}" if kind is _flag else None)
    args = p.parse_args(argv)
    if args.resume:
        try:
            saved = json.loads(RunStore(args.resume).read_text("config.json"))
        except FileNotFoundError:
            p.error(f"--resume: {args.resume} is not a run folder (no config.json)")
        cfg = cls(**saved)
    else:
        cfg = cls(preset=args.preset, **presets[args.preset])
    overrides = {f.name: getattr(args, f.name) for f in fields(cls)
                 if f.name != "preset" and getattr(args, f.name) is not None}
    cfg = cls(**{**asdict(cfg), **overrides})
    for name in counts:
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    return cfg, args


def open_run(cfg: Any, args: argparse.Namespace, name: str) -> RunStore:
    """The run folder: --resume's, or a new `<storage>/<name>-<timestamp>`; writes config.json
    (with a resume's overrides) and prints where it is."""
    if args.resume:
        store = RunStore(args.resume)
    else:
        store = RunStore(f"{str(args.storage).rstrip('/')}/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    store.write_text("config.json", json.dumps(asdict(cfg), indent=1))
    print(f"run folder: {store.uri}", flush=True)
    return store


def follow(store: RunStore, total: int, desc: str, work: Callable[[], Any], unit: str, key: str,
           postfix: Callable[[dict], dict[str, str]] = lambda state: {}, progress_file: str = "progress.json") -> Any:
    """Run `work()` (Ray Train) in a thread while a progress bar follows `progress_file` in the run
    folder (its `key` counts up to `total`). Returns what `work` returns; raises SystemExit if it failed.

    The caller connects to Ray first, in the main thread: an embedded Ray lives as long as the
    thread that starts it."""
    outcome: dict = {}

    def run() -> None:
        outcome["result"] = work()

    thread = threading.Thread(target=run)
    thread.start()
    with tqdm(total=total, desc=desc, unit=unit,
              mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:  # a log file gets a line per 30 s
        while thread.is_alive():
            thread.join(timeout=1.0)
            try:
                state = json.loads(store.read_text(progress_file))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            bar.update(state[key] - bar.n)
            bar.set_postfix(postfix(state), refresh=False)  # refreshed by update(), at most every mininterval
    if "result" not in outcome:
        raise SystemExit(f"{desc} failed (see the Ray Train error above)")
    return outcome["result"]
