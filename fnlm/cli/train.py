"""`fnlm train`: the command line over the run loop (fnlm.run).

    fnlm train --config tinystories.toml --out runs/ts --train-data train.npy --val-data valid.npy
    fnlm train --out runs/ts --resume                 # continue exactly where the run stopped
    fnlm train --out runs/ts --resume --steps 8000 --cosine-steps 5000   # train on, same schedule
    torchrun --standalone --nproc_per_node 2 -m fnlm train ...   # data parallel
    fnlm train ... --out runs/lr --sweep lr=3e-4,1e-3,3e-3 --sweep seed=0,1   # 6 runs as one vmapped program

Every ModelConfig and TrainConfig field is a flag (--d-model, --lr, --compile/--no-compile, ...);
a JSON or TOML config file {"model": {...}, "train": {...}} gives base values that flags
override. On resume, the run folder's config.json is the configuration; flags may change only
how the run proceeds (--steps, --device, the logging and checkpoint cadence), not what it
computes; a new learning-rate schedule (--lr, --min-lr, --warmup-steps, --cosine-steps, or a
--steps that moves the default cosine length) needs --reschedule, and is recorded in
config.json and the log. Ctrl-C or SIGTERM saves the last completed step and exits 130 / 143;
a run whose loss turns non-finite stops (exit 1) with its finite checkpoints kept.

--sweep NAME=V1,V2,... (repeatable: the grid of the axes; NAME1:NAME2=A1:B1,A2:B2 varies two
together) trains every run at once with one torch.func.vmap'd step; --out then holds
sweep.json, learning_curves.png and one ordinary run folder per run. Sweepable: lr, min_lr,
warmup_steps, cosine_steps, weight_decay, max_grad_norm, muon_lr, seed. A diverged run of a
sweep is frozen at its last finite state while the others go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from ..config import ModelConfig, TrainConfig

HELP = {  # one line per config field; the default (or "required") is added from the dataclass
    "vocab_size": "vocabulary size: token ids are in [0, vocab_size)",
    "context_length": "tokens per training window (and the longest context)",
    "d_model": "width of the residual stream",
    "num_layers": "number of Transformer blocks",
    "num_heads": "attention heads per block (d_model must be divisible by it)",
    "d_ff": "hidden width of the feed-forward network",
    "rope_theta": "RoPE base frequency",
    "eps": "RMSNorm epsilon",
    "remove_rmsnorm": "ablation: no RMSNorm anywhere",
    "use_post_norm": "ablation: post-norm blocks, x = norm(x + sublayer(x))",
    "remove_rope": "ablation: no position information (NoPE)",
    "ffn_type": "feed-forward network: swiglu, silu (the parameter-matched ablation) or relu2",
    "tie_embeddings": "use the token embedding matrix as the output layer",
    "qk_norm": "RMS-normalize each head's queries and keys before RoPE",
    "logit_soft_cap": "cap the logits at c tanh(logits / c); none: raw logits",
    "train_data": "token file to train on (.npy, or raw binary of --data-dtype)",
    "val_data": "token file for validation; none: no validation",
    "data_dtype": "dtype of raw binary token files (.npy files carry their own)",
    "batch_size": "sequences per step (over all processes)",
    "steps": "total optimizer steps",
    "lr": "peak learning rate (after warm-up)",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warm-up steps from 0 to --lr",
    "cosine_steps": "step at which the cosine decay reaches --min-lr; none: --steps",
    "beta1": "AdamW first-moment decay, in [0, 1)",
    "beta2": "AdamW second-moment decay, in [0, 1)",
    "adam_eps": "AdamW epsilon, > 0",
    "weight_decay": "AdamW decoupled weight decay, >= 0",
    "max_grad_norm": "clip the global gradient norm to this; none: no clipping",
    "optimizer": "adamw, or muon: Muon for the hidden matrices, AdamW for the rest",
    "muon_lr": "Muon's peak learning rate (--optimizer muon)",
    "muon_momentum": "Muon's momentum (--optimizer muon)",
    "schedule": "cosine (warm-up, cosine decay) or wsd (warm-up, stable, decay)",
    "decay_fraction": "wsd: the share of the steps spent decaying to --min-lr",
    "seed": "seed of parameter init and batch sampling",
    "log_every": "steps per log record (mean train loss, grad norm, lr, throughput)",
    "eval_every": "steps between validations; 0: never",
    "eval_batches": "validation batches per evaluation; none: the whole validation set",
    "checkpoint_every": "steps between checkpoints; 0: only at the end",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "device": "auto (cuda, else mps, else cpu), or a torch device such as cpu, cuda, cuda:1",
    "autocast": "none, or bfloat16: autocast the forward pass",
    "compile": "torch.compile the whole training step (default: auto: on with CUDA, off elsewhere; "
               "--no-compile runs eager, for debugging)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a Transformer LM on token arrays", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--out", type=Path, required=True,
                        help="run folder: config, log, checkpoints, plot (required)")
    parser.add_argument("--config", type=Path, help="JSON or TOML file with 'model' and 'train' tables (default: none)")
    parser.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out (default: off)")
    parser.add_argument("--reschedule", action="store_true",
                        help="on --resume, accept a new learning-rate schedule (default: off: refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line (default: shown)")
    parser.add_argument("--sweep", action="append", metavar="NAME=V1,V2,...",
                        help="train a grid of runs as one vmapped program; repeat for more axes (default: one run)")
    parser.add_argument("--sweep-stream", choices=("per-run", "same"),
                        help="per-run: each run's batches from its own seed; same: all from --seed's "
                             "(default: per-run)")
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        group = parser.add_argument_group(f"{section} ({cls.__name__}, fnlm/config.py)")
        for field in dataclasses.fields(cls):
            _add_field_flag(group, section, field)
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..data import resolve_device
    from ..run import is_sweep_dir, load_run_config, load_sweep_config, train, train_sweep
    from ..run.process import StopOnSignal, keep_freed_memory

    flags: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if section in flags:
            flags[section][name] = value
    resume, reschedule = getattr(args, "resume", False), getattr(args, "reschedule", False)
    if reschedule and not resume:
        raise ValueError("--reschedule applies to --resume only")
    if resume:
        if is_sweep_dir(args.out):
            model_cfg, train_cfg, *saved = load_sweep_config(args.out)
        else:
            model_cfg, train_cfg = load_run_config(args.out)
        train_cfg = _resume_overrides(model_cfg, train_cfg, flags)
    else:
        model_cfg, train_cfg = _new_configs(getattr(args, "config", None), flags)
    sweep = _sweep_request(args)
    if resume and is_sweep_dir(args.out):
        if sweep is not None and sweep != tuple(saved):
            raise ValueError("--resume continues the saved sweep; drop --sweep/--sweep-stream or match them")
        sweep = tuple(saved)
    elif resume and sweep is not None:
        raise ValueError(f"--resume --sweep: {args.out} is not a sweep folder (no sweep.json)")

    if resolve_device(train_cfg.device).type == "cpu":
        keep_freed_memory()  # a quarter of an eager CPU step went to page faults without it
    show_progress = not getattr(args, "no_progress", False)
    with StopOnSignal() as stop:
        if sweep is not None:
            axes, stream = sweep
            result = train_sweep(model_cfg, train_cfg, axes, args.out, stream=stream, resume=resume,
                                 reschedule=reschedule, show_progress=show_progress, should_stop=stop)
            summary = result.summary()
        else:
            result = train(model_cfg, train_cfg, args.out, resume=resume, reschedule=reschedule,
                           show_progress=show_progress, should_stop=stop)
            summary = {"step": result.step, "train_loss": result.train_loss, "val_loss": result.val_loss,
                       "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                       "interrupted": result.interrupted}
    print(json.dumps(summary), file=sys.stderr)
    return stop.exit_code if result.interrupted else 0


def _new_configs(config_file: Path | None, flags: dict[str, dict[str, Any]]) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a new run, checked in the order that names the first real problem: the
    files (--config, the data), then the required model flags, then the values. Data paths are
    made absolute by the run layer (fnlm.run.loop.with_absolute_paths)."""
    from ..run.state import DATA_FIELDS

    base = _read_config_file(config_file) if config_file else {"model": {}, "train": {}}
    model, train = base["model"] | flags["model"], base["train"] | flags["train"]
    for name in DATA_FIELDS:
        path = train.get(name)
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{_flag(name)} {path}: no such file")
    if not train.get("train_data"):
        raise ValueError("--train-data is required: a token file (.npy, or raw binary)")
    required = [f.name for f in dataclasses.fields(ModelConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in model]
    if missing:
        listed = ", ".join(_flag(name) for name in missing)
        where = f" or in {config_file}'s [model] table" if config_file else " (or in a --config file)"
        raise ValueError(f"missing model flags {listed}: give them as flags{where}")
    try:
        return ModelConfig.from_dict(model), TrainConfig.from_dict(train)
    except ValueError as error:  # name the flag, not the dataclass field
        raise ValueError(_flag_names(str(error))) from None


def _sweep_request(args: argparse.Namespace) -> tuple[list, str] | None:
    """(axes, stream) from --sweep / --sweep-stream, or None for a single run."""
    from ..run import parse_axis

    texts, stream = getattr(args, "sweep", None), getattr(args, "sweep_stream", None)
    if texts is None:
        if stream is not None:
            raise ValueError("--sweep-stream needs --sweep")
        return None
    return [parse_axis(text) for text in texts], stream or "per-run"


def _add_field_flag(group: argparse._ArgumentGroup, section: str, field: dataclasses.Field) -> None:
    flag, dest, annotation = _flag(field.name), f"{section}.{field.name}", str(field.type)
    described = HELP.get(field.name, f"{section} setting {field.name} (see fnlm/config.py)")
    if field.default is dataclasses.MISSING or field.name == "train_data":
        described += " (required, or from --config)"
    elif "(default:" not in described:
        shown = {None: "none", False: "off", True: "on"}.get(field.default, field.default)
        described += f" (default: {shown})"
    if annotation in ("bool", "bool | None"):  # None: auto (TrainConfig.compile)
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=described)
        return
    base = int if annotation.startswith("int") else float if annotation.startswith("float") else str
    nullable = "None" in annotation

    def parse(text: str) -> Any:
        return None if nullable and text.lower() == "none" else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    metavar = field.name.upper() + (" | none" if nullable else "")
    group.add_argument(flag, dest=dest, type=parse, metavar=metavar, help=described)


def _read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = Path(path).read_text()
    try:
        values = tomllib.loads(text) if Path(path).suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path}: cannot parse: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a table with 'model' and 'train'")
    unknown = sorted(set(values) - {"model", "train"})
    if unknown:
        raise ValueError(f"--config {path}: unknown table(s) {unknown}; expected 'model' and 'train'")
    tables = {"model": values.get("model", {}), "train": values.get("train", {})}
    for name, table in tables.items():
        known = {field.name for field in dataclasses.fields(ModelConfig if name == "model" else TrainConfig)}
        if not isinstance(table, dict) or set(table) - known:
            raise ValueError(f"--config {path}: unknown [{name}] key(s) {sorted(set(table) - known)}; "
                             f"known: {sorted(known)}")
    return tables


def _resume_overrides(model_cfg: ModelConfig, train_cfg: TrainConfig, flags: dict[str, dict]) -> TrainConfig:
    """The saved TrainConfig with the train flags applied; the run layer refuses any change but
    a runtime setting or, with --reschedule, the schedule (fnlm.run.state.schedule_change).
    The model is the saved one: a model flag that differs is an error here."""
    saved = model_cfg.to_dict()
    refused = sorted(_flag(name) for name, value in flags["model"].items() if value != saved[name])
    if refused:
        raise ValueError(f"--resume continues the saved model; these flags would change it: {refused}")
    try:
        return dataclasses.replace(train_cfg, **flags["train"])
    except ValueError as error:
        raise ValueError(_flag_names(str(error))) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_names(message: str) -> str:
    """A config error in the command's words: "TrainConfig.adam_eps must ..." -> "--adam-eps must ..."."""
    return re.sub(r"(?:ModelConfig|TrainConfig)\.(\w+)", lambda match: _flag(match.group(1)), message)
