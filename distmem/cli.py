"""Command lines built from run-config dataclasses, the run folder, and a progress bar.

A run config is a dataclass whose fields are declared with `option(default, "help line")` and
typed int, float, str, bool, `Literal[...]` (choices), `tuple[int, ...]` (comma-separated) or
`X | None`; it validates itself in `__post_init__`. `parse_run_config` turns every field into a
flag from its real type (`typing.get_type_hints`), starting from a named preset or a run to
resume, and ends the command with one clear line on a bad flag or value:

    cfg, args = parse_run_config(OmniglotRunConfig, PRESETS, __doc__, argv)
    store = open_run(cfg, args, name="omniglot-default-episodic")
    result = follow(store, total, "training", train_fn, unit="batch")

(The standard library is enough for flat configs like these, so no CLI dependency is added.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, field, fields
from typing import Any, Literal, TypeVar

from tqdm import tqdm

from distmem.runs import RunStore

Config = TypeVar("Config")
_BOOL = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}


def option(default: Any, help: str) -> Any:  # noqa: A002 - argparse's name for it
    """A run-config field with its command-line help line."""
    return field(default=default, metadata={"help": help})


def check_fields(cfg: Any, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 positive_finite: tuple[str, ...] = ()) -> None:
    """Range checks for a run config's `__post_init__`; errors name the flag."""
    def fail(name: str, expected: str) -> None:
        raise ValueError(f"--{name.replace('_', '-')}: expected {expected}, got {getattr(cfg, name)}")

    for name in at_least_one:
        if getattr(cfg, name) < 1:
            fail(name, ">= 1")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            fail(name, ">= 0")
    for name in positive_finite:
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            fail(name, "a finite number > 0")


def _parse_bool(text: str) -> bool:
    if text.lower() not in _BOOL:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return _BOOL[text.lower()]


def _parse_tuple(item: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values such as "
                                             f"'1,10,100', got {text!r}") from None
    return parse


def _unwrap_optional(kind: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def flag_spec(kind: Any) -> dict[str, Any]:
    """argparse keywords (type, choices, metavar) for a field's type."""
    kind = _unwrap_optional(kind)
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        return {"type": type(choices[0]), "choices": choices}
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return {"type": _parse_tuple(item), "metavar": f"{item.__name__.upper()},..."}
    if kind is bool:
        return {"type": _parse_bool, "metavar": "{on,off}"}
    if kind in (int, float, str):
        return {"type": kind}
    raise TypeError(f"run-config fields must be int, float, str, bool, Literal, tuple or optional; got {kind}")


def from_dict(cls: type[Config], data: dict[str, Any]) -> Config:
    """A run config from plain data (config.json, a checkpoint): JSON lists (and the comma-separated
    strings of older runs) become tuples."""
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    coerced = {}
    for name, value in data.items():
        kind = _unwrap_optional(hints[name])
        if typing.get_origin(kind) is tuple and isinstance(value, (list, str)):  # str: configs of older runs
            value = tuple(value) if isinstance(value, list) else _parse_tuple(typing.get_args(kind)[0])(value)
        coerced[name] = value
    return cls(**coerced)


def build_parser(cls: type, presets: dict[str, dict], description: str | None) -> argparse.ArgumentParser:
    """The parser: --preset, the run-folder options, and one flag per config field."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset_field = cls.__dataclass_fields__.get("preset")  # the config's own default preset, else "default"
    default_name = preset_field.default if preset_field is not None and preset_field.default in presets else "default"
    p.add_argument("--preset", choices=sorted(presets), default=default_name,
                   help=f"named settings to start from (default: {default_name})")
    p.add_argument("--storage", "--runs", dest="storage", default="runs",
                   help="where run folders go: a local folder (default ./runs) or a URI (s3://bucket/prefix, "
                        "gs://..., file:///...) so results outlive the cluster")
    p.add_argument("--resume", default=None, help="a run folder (path or URI) to continue from its latest checkpoint")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else an "
                                                   "embedded local Ray)")
    p.add_argument("--memory-storage", default=None, help="a folder every node reaches for the life-long memory "
                                                          "shards' snapshots and write logs")
    p.add_argument("--max-failures", type=int, default=3, help="trainer-group restarts after a lost worker")
    hints = typing.get_type_hints(cls)
    default_preset = presets.get(default_name, {})
    for f in fields(cls):
        if f.name == "preset":
            continue
        default = default_preset.get(f.name, f.default if f.default is not MISSING else None)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        suffix = "" if default is None else f" (default preset: {shown})"
        p.add_argument(f"--{f.name.replace('_', '-')}", default=None, dest=f.name,
                       help=f"{f.metadata.get('help', '')}{suffix}", **flag_spec(hints[f.name]))
    return p


def parse_run_config(cls: type[Config], presets: dict[str, dict], description: str | None,
                     argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    """A run config from --preset (or --resume RUN's config.json) plus the flags given. A bad flag
    or value ends the command with one line naming it (exit status 2)."""
    p = build_parser(cls, presets, description)
    args = p.parse_args(argv)
    try:
        if args.resume:
            try:
                base = asdict(from_dict(cls, json.loads(RunStore(args.resume).read_text("config.json"))))
            except FileNotFoundError:
                p.error(f"--resume: {args.resume} is not a run folder (no config.json)")
        else:
            base = asdict(cls(preset=args.preset, **presets[args.preset]))
        overrides = {f.name: getattr(args, f.name) for f in fields(cls)
                     if f.name != "preset" and getattr(args, f.name) is not None}
        return from_dict(cls, {**base, **overrides}), args
    except (TypeError, ValueError) as err:
        p.error(str(err))


@contextlib.contextmanager
def user_errors(*also: type[Exception]) -> Iterator[None]:
    """Missing files, unreachable clusters, refused checkpoints (and the exception types `also`)
    end a command with one line and exit status 2."""
    from distmem.checkpoints import CheckpointError  # noqa: PLC0415

    try:
        yield
    except (FileNotFoundError, NotADirectoryError, ConnectionError, CheckpointError, *also) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def open_run(cfg: Any, args: argparse.Namespace, name: str) -> RunStore:
    """The run folder: --resume's, or a new `<storage>/<name>-<timestamp>`; writes config.json
    (with a resume's overrides) and prints where it is."""
    if args.resume:
        store = RunStore(args.resume)  # its checkpoint is checked by the trainer (distributed.fit), once
    else:
        store = RunStore(f"{str(args.storage).rstrip('/')}/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    store.write_text("config.json", json.dumps(asdict(cfg), indent=1))
    print(f"run folder: {store.uri}", flush=True)
    return store


def follow(store: RunStore, total: int, desc: str, work: Callable[[], Any], unit: str = "step",
           postfix: Callable[[dict], dict[str, str]] = lambda state: {}, progress_file: str = "progress.json") -> Any:
    """Run `work()` (the trainer) in a thread while a progress bar follows `progress_file` in the
    run folder (its "step" counts up to `total`). Returns what `work` returns, or raises what it
    raised (here, in the caller's thread).

    The caller connects to Ray first, in the main thread: an embedded Ray lives as long as the
    thread that starts it."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as err:  # re-raised in the caller's thread, after the bar closes
            outcome["error"] = err

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
            bar.update(state["step"] - bar.n)
            bar.set_postfix(postfix(state), refresh=False)  # refreshed by update(), at most every mininterval
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
