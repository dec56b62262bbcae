"""Checkpoints: a config header and flat str -> tensor dicts, written atomically.

    save_checkpoint(path, model_config=cfg, params=params, step=100, opt_state=opt_state, rng=gen.get_state())
    ckpt = load_checkpoint(path)              # .model_config, .params, .step, .opt_state (flat), .rng, ...
    opt_state = unflatten(ckpt.opt_state, like=optimizer.init(ckpt.params))

Files hold only dicts, lists, str, numbers and CPU tensors, so torch.load(weights_only=True) reads
them. A save writes a temporary file beside the target, fsyncs it and renames it over the target:
a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .config import ModelConfig
from .data import resolve_device
from .files import atomic_write
from .model import lm_spec
from .tree import PyTree, flatten, unflatten

FORMAT = "fnlm.checkpoint/1"
MODULE_FORMAT = "fnlm.module-checkpoint/1"  # the adapters' nn.Module + torch.optim pair

PathOrFile = str | os.PathLike | IO[bytes]


class CheckpointError(ValueError):
    """A file that is not a complete checkpoint of the expected kind."""


class Checkpoint(NamedTuple):
    model_config: ModelConfig
    params: PyTree  # the parameter tree of model_config, on map_location
    step: int
    opt_state: dict[str, Tensor] | None  # flat; rebuild with unflatten(..., like=optimizer.init(params))
    rng: Tensor | None  # a torch.Generator state (the data sampler's)
    train_config: dict[str, Any] | None
    extra: dict[str, Any]  # data position, tokens seen, wall-clock seconds, ...


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_config: ModelConfig,
    params: PyTree,
    step: int,
    opt_state: Any = None,
    rng: Tensor | None = None,
    train_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically; tensors are copied to the CPU first."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    blob = {
        "format": FORMAT,
        "model_config": model_config.to_dict(),
        "train_config": train_config,
        "step": step,
        "params": _cpu(flatten(params)),
        "opt_state": None if opt_state is None else _cpu(flatten(opt_state)),
        "rng": rng,
        "extra": dict(extra or {}),
    }
    atomic_save(blob, path)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    blob = _load(path, FORMAT, map_location)
    model_config = ModelConfig.from_dict(blob["model_config"])
    return Checkpoint(
        model_config=model_config,
        params=unflatten(blob["params"], like=lm_spec(model_config)),
        step=blob["step"],
        opt_state=blob["opt_state"],
        rng=blob["rng"],
        train_config=blob["train_config"],
        extra=blob["extra"],
    )


def export_npz(checkpoint: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write a checkpoint's parameters as float32 arrays named by their state-dict keys, and the
    model config as JSON under "config.json", to a .npz that numpy alone reads (no pickle)."""
    ckpt = load_checkpoint(checkpoint)
    arrays = {key: leaf.float().numpy() for key, leaf in flatten(ckpt.params).items()}
    with atomic_write(out) as file:
        np.savez(file, **arrays, **{"config.json": np.array(json.dumps(ckpt.model_config.to_dict()))})


def save_module_checkpoint(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int, out: PathOrFile
) -> None:
    """The handout's save_checkpoint: model and optimizer state dicts and the iteration."""
    blob = {
        "format": MODULE_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": int(iteration),
    }
    if isinstance(out, (str, os.PathLike)):
        atomic_save(blob, out)
    else:
        torch.save(blob, out)


def load_module_checkpoint(src: PathOrFile, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore `model` and `optimizer` from save_module_checkpoint's file; returns the iteration."""
    blob = _load(src, MODULE_FORMAT, "cpu")
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    return blob["iteration"]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the target's directory, fsync, then rename over the target
    (fnlm.files.atomic_write); a full disk is an OSError "no space left writing PATH"."""
    with atomic_write(path) as file:
        torch.save(obj, file)


def _load(src: PathOrFile, expected_format: str, map_location: str | torch.device) -> dict[str, Any]:
    name = str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<file object>")
    if isinstance(src, (str, os.PathLike)):
        if not Path(src).exists():
            raise FileNotFoundError(f"checkpoint {name} does not exist")
        if not Path(src).is_file():
            raise IsADirectoryError(f"checkpoint {name} is not a file")
    try:
        device = resolve_device(map_location)  # "auto" -> a device; an unavailable one is no fault of the file
    except RuntimeError as error:
        raise ValueError(f"cannot load {name}: {error}") from None
    if not _is_torch_file(src):
        raise CheckpointError(f"{name} is not an fnlm checkpoint: it is not a file that torch.save wrote")
    try:
        blob = torch.load(src, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: torch's file, but not ours
        raise CheckpointError(f"{name} is not an fnlm checkpoint: it holds objects other than tensors "
                              "and plain data (fnlm never loads those)") from None
    except Exception:  # torch raises several types for a damaged zip
        raise CheckpointError(f"{name} is a damaged or cut-short checkpoint: PyTorch cannot read it") from None
    found = blob.get("format") if isinstance(blob, dict) else None
    if found != expected_format:
        raise CheckpointError(f"{name} is not an {expected_format} checkpoint (format: {found!r})")
    return blob


def _is_torch_file(src: PathOrFile) -> bool:
    """Whether src starts as torch.save's files do: a zip archive, or (before torch 1.6) a pickle."""
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as file:
            head = file.read(4)
    else:
        at = src.tell()
        head = src.read(4)
        src.seek(at)
    return head.startswith((b"PK\x03\x04", b"\x80"))


def _cpu(flat: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: leaf.detach().cpu() for key, leaf in flat.items()}
