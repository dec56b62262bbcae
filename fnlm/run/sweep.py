"""A sweep's grid and its folder: `fnlm train --sweep` axes, run names, sweep.json.

    fnlm train --train-data T.npy --val-data V.npy --out runs/lr --sweep lr=1e-4,3e-4,1e-3 --sweep seed=0,1
    fnlm train --out runs/lr --resume                       # continue every run of the sweep

    runs/lr/sweep.json                  {"model", "train" (the base), "axes", "stream", "runs"}
    runs/lr/learning_curves.png         every run's train and validation loss
    runs/lr/lr=0.0001_seed=0/...        an ordinary run folder (config.json, log.jsonl,
                                        checkpoints/, loss_curve.png): `fnlm generate` and
                                        `fnlm train --resume` take it like any single run

The runs train together in fnlm.run.loop, the same loop as a single run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ..config import ModelConfig, TrainConfig
from ..files import read_json, write_json
from ..train import TENSOR_HPARAMS
from .folder import configs_from

# TrainConfig fields a sweep may vary: fnlm.train.TENSOR_HPARAMS, tensors inside the step, and
# the seed, which chooses the initial parameters and, with the per-run stream, the batches. Each
# is an int or a float field ("int | None" sweeps ints: None is no point of a grid).
_FIELD_TYPES = {field.name: str(field.type) for field in dataclasses.fields(TrainConfig)}
AXES: dict[str, type] = {name: int if _FIELD_TYPES[name].startswith("int") else float
                         for name in (*TENSOR_HPARAMS, "seed")}
STREAMS = ("per-run", "same")
SWEEP_FILE = "sweep.json"
Axis = tuple[tuple[str, ...], list[tuple[Any, ...]]]  # (names, one value tuple per point)


# --- the grid ----------------------------------------------------------------------------------


def parse_axis(text: str) -> Axis:
    """"lr=1e-4,3e-4" -> (("lr",), [(1e-4,), (3e-4,)]). Joint values: "lr:min_lr=1e-3:1e-4,3e-3:3e-4"
    varies lr and min_lr together (two runs, not four)."""
    names_text, sep, values_text = text.partition("=")
    names = tuple(name.strip().replace("-", "_") for name in names_text.split(":"))
    if not sep or not all(names) or not values_text.strip():
        raise ValueError(f"--sweep {text!r}: expected NAME=V1,V2,... (or NAME1:NAME2=A1:B1,A2:B2)")
    for name in names:
        if name not in AXES:
            raise ValueError(f"--sweep {text!r}: cannot sweep {name!r}; sweepable: {', '.join(AXES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--sweep {text!r}: a name appears twice")
    points = []
    for point in values_text.split(","):
        parts = point.strip().split(":")
        if len(parts) != len(names):
            raise ValueError(f"--sweep {text!r}: {point!r} has {len(parts)} values for {len(names)} names")
        try:
            points.append(tuple(_number(AXES[name], part) for name, part in zip(names, parts)))
        except ValueError as error:
            raise ValueError(f"--sweep {text!r}: {error}") from None
    if len(set(points)) != len(points):
        raise ValueError(f"--sweep {text!r}: a value appears twice")
    return names, points


def grid(axes: Sequence[Axis]) -> list[dict[str, Any]]:
    """The product of the axes (the first varies slowest): one {name: value} dict per run."""
    seen = [name for names, _ in axes for name in names]
    twice = sorted({name for name in seen if seen.count(name) > 1})
    if twice:
        raise ValueError(f"--sweep: {twice} given in more than one axis")
    return [
        {name: value for (names, _), point in zip(axes, points) for name, value in zip(names, point)}
        for points in itertools.product(*(points for _, points in axes))
    ]


def run_name(overrides: dict[str, Any]) -> str:
    """{"lr": 0.0003, "seed": 1} -> "lr=0.0003_seed=1" (a directory name)."""
    return "_".join(f"{name}={value:g}" for name, value in overrides.items()) or "run"


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'an int' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


class SweepRun(NamedTuple):
    name: str
    overrides: dict[str, Any]
    config: TrainConfig  # the base with the overrides: what a single `fnlm train` of this run would use
    dir: Path


def sweep_runs(base: TrainConfig, axes: Sequence[Axis], out_dir: str | Path) -> list[SweepRun]:
    """The grid's runs, each with its TrainConfig (checked as any TrainConfig is)."""
    runs = []
    for overrides in grid(axes):
        name = run_name(overrides)
        try:
            config = dataclasses.replace(base, **overrides)
        except ValueError as error:
            raise ValueError(f"sweep run {name}: {str(error).removeprefix('TrainConfig.')}") from None
        runs.append(SweepRun(name, overrides, config, Path(out_dir) / name))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep runs share a directory name: {names}")
    return runs


# --- files -------------------------------------------------------------------------------------


def save_sweep_config(out_dir: Path, model_cfg: ModelConfig, base: TrainConfig, axes: Sequence[Axis], stream: str,
                      runs: list[SweepRun]) -> None:
    """out_dir/sweep.json: the model, the base TrainConfig, the axes, the stream and the runs."""
    values = {"model": model_cfg.to_dict(), "train": base.to_dict(), "stream": stream,
              "axes": [{"names": list(names), "values": [list(point) for point in points]} for names, points in axes],
              "runs": {run.name: run.overrides for run in runs}}
    write_json(Path(out_dir) / SWEEP_FILE, values)


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def load_sweep_config(out_dir: str | Path) -> tuple[ModelConfig, TrainConfig, list[Axis], str]:
    path = Path(out_dir) / SWEEP_FILE
    values = read_json(path)
    model_cfg, base = configs_from(values, path)
    try:
        axes = [(tuple(axis["names"]), [tuple(point) for point in axis["values"]]) for axis in values["axes"]]
        stream = values["stream"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: no valid 'axes' and 'stream' ({error!r})") from None
    if stream not in STREAMS:
        raise ValueError(f"{path}: stream must be one of {STREAMS}, got {stream!r}")
    return model_cfg, base, axes, stream
