"""`fnlm train`: the command line over the run loop.

    fnlm train --config tinystories.toml --out runs/ts --train-data train.npy --val-data valid.npy
    fnlm train --out runs/ts --resume                 # continue exactly where the run stopped
    torchrun --standalone --nproc_per_node 2 -m fnlm train ...   # data parallel
    fnlm train ... --out runs/lr --sweep lr=3e-4,1e-3,3e-3 --sweep seed=0,1   # 6 runs as one vmapped program

Every ModelConfig and TrainConfig field is a flag (--d-model, --lr, --compile/--no-compile, ...);
a JSON or TOML config file {"model": {...}, "train": {...}} gives base values that flags
override. On resume, the run directory's config.json is the configuration; flags may change
only how the run proceeds (RUNTIME_FIELDS), not what it computes.

--sweep NAME=V1,V2,... (repeatable: the grid of the axes; NAME1:NAME2=A1:B1,A2:B2 varies two
together) trains every run at once with one torch.func.vmap'd step (fnlm.sweep_loop); --out then holds
sweep.json, learning_curves.png and one ordinary run directory per run. Sweepable: lr, min_lr,
warmup_steps, cosine_steps, weight_decay, max_grad_norm, seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

from ..config import ModelConfig, TrainConfig

RUNTIME_FIELDS = frozenset(
    {"device", "compile", "steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"}
)
INTERRUPTED = 130  # the shell's code for a SIGINT exit


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a Transformer LM on token arrays", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory (config, log, checkpoints, plot)")
    parser.add_argument("--config", type=Path, help="JSON or TOML file with 'model' and 'train' tables")
    parser.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    parser.add_argument("--sweep", action="append", metavar="NAME=V1,V2,...",
                        help="train a grid of runs as one vmapped program (repeat for more axes)")
    parser.add_argument("--sweep-stream", choices=("per-run", "same"),
                        help="per-run (default): each run's batches from its own seed; same: all from --seed's")
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        group = parser.add_argument_group(f"{section} ({cls.__name__}; defaults in fnlm/config.py)")
        for field in dataclasses.fields(cls):
            _add_field_flag(group, section, field)
    parser.set_defaults(run=run_train)



def run_train(args: argparse.Namespace) -> int:
    from ..data import resolve_device
    from ..loop import load_run_config, train
    from ..sweep_loop import is_sweep_dir, load_sweep_config, train_sweep
    from ..run.process import keep_freed_memory

    flags = {"model": {}, "train": {}}
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if section in flags:
            flags[section][name] = value
    resume = getattr(args, "resume", False)
    sweep = _sweep_request(args)
    if resume:
        if is_sweep_dir(args.out):
            model_cfg, train_cfg, *saved = load_sweep_config(args.out)
            if sweep is not None and sweep != tuple(saved):
                raise ValueError("--resume continues the saved sweep; drop --sweep/--sweep-stream or match them")
            sweep = tuple(saved)
        else:
            if sweep is not None:
                raise ValueError(f"--resume --sweep: {args.out} is not a sweep directory (no sweep.json)")
            model_cfg, train_cfg = load_run_config(args.out)
        train_cfg = _resume_overrides(model_cfg, train_cfg, flags)
    else:
        base = _read_config_file(args.config) if getattr(args, "config", None) else {"model": {}, "train": {}}
        model_cfg = ModelConfig.from_dict(base["model"] | flags["model"])
        train_cfg = TrainConfig.from_dict(base["train"] | flags["train"])

    if resolve_device(train_cfg.device).type == "cpu":
        keep_freed_memory()  # a quarter of an eager CPU step went to page faults without it
    stop = _StopOnInterrupt()
    show_progress = not getattr(args, "no_progress", False)
    with stop:
        if sweep is not None:
            axes, stream = sweep
            result = train_sweep(model_cfg, train_cfg, axes, args.out, stream=stream, resume=resume,
                                 show_progress=show_progress, should_stop=stop)
        else:
            result = train(model_cfg, train_cfg, args.out, resume=resume, show_progress=show_progress,
                           should_stop=stop)
    if sweep is not None:
        summary = result.summary()
    else:
        summary = {"step": result.step, "train_loss": result.train_loss, "val_loss": result.val_loss,
                   "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                   "interrupted": result.interrupted}
    print(json.dumps(summary), file=sys.stderr)
    return INTERRUPTED if result.interrupted else 0


def _sweep_request(args: argparse.Namespace) -> tuple[list, str] | None:
    """(axes, stream) from --sweep / --sweep-stream, or None for a single run."""
    from ..sweep_loop import parse_axis

    texts, stream = getattr(args, "sweep", None), getattr(args, "sweep_stream", None)
    if texts is None:
        if stream is not None:
            raise ValueError("--sweep-stream needs --sweep")
        return None
    return [parse_axis(text) for text in texts], stream or "per-run"


def _add_field_flag(group: argparse._ArgumentGroup, section: str, field: dataclasses.Field) -> None:
    flag, dest, annotation = "--" + field.name.replace("_", "-"), f"{section}.{field.name}", str(field.type)
    if annotation == "bool":
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction)
        return
    base = int if annotation.startswith("int") else float if annotation.startswith("float") else str
    nullable = "None" in annotation

    def parse(text: str) -> Any:
        return None if nullable and text.lower() == "none" else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    metavar = field.name.upper() + (" | none" if nullable else "")
    group.add_argument(flag, dest=dest, type=parse, metavar=metavar)


def _read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    text = Path(path).read_text()
    try:
        values = tomllib.loads(text) if Path(path).suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path}: cannot parse: {error}") from error
    unknown = sorted(set(values) - {"model", "train"})
    if unknown:
        raise ValueError(f"--config {path}: unknown table(s) {unknown}; expected 'model' and 'train'")
    return {"model": values.get("model", {}), "train": values.get("train", {})}


def _resume_overrides(model_cfg: ModelConfig, train_cfg: TrainConfig, flags: dict[str, dict]) -> TrainConfig:
    """The saved TrainConfig with runtime flags applied; any flag that would change the
    computation (a model field, a data or optimizer setting) is an error."""
    saved = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}
    changed = sorted(
        f"--{name.replace('_', '-')}"
        for section, values in flags.items()
        for name, value in values.items()
        if value != saved[section][name] and not (section == "train" and name in RUNTIME_FIELDS)
    )
    if changed:
        raise ValueError(f"--resume continues the saved configuration; these flags would change it: {changed}")
    return dataclasses.replace(train_cfg, **{k: v for k, v in flags["train"].items() if k in RUNTIME_FIELDS})


class _StopOnInterrupt:
    """While active, the first Ctrl-C asks the loop to stop after its current step (and save);
    a second one interrupts at once. Called, it says whether a stop was asked for."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def __enter__(self) -> _StopOnInterrupt:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr)
