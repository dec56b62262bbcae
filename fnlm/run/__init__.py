"""The run layer: one loop for a single run and a sweep, over run folders.

    folder.py   the run folder: config.json, log.jsonl, checkpoints (naming, rotation, latest), plots, lock
    state.py    RunState (one type for one run or K stacked ones), fresh start and exact resume
    loop.py     the loop: data checks, steps, validation, logs, checkpoints, divergence; train, train_sweep
    sweep.py    a sweep's grid (--sweep axes), run names, sweep.json
    process.py  process-wide settings for entry points: malloc, SIGINT/SIGTERM
"""

from .folder import latest_checkpoint, load_run_config, read_log
from .loop import DivergedError, RunResult, RunSummary, SweepResult, train, train_sweep
from .sweep import grid, is_sweep_dir, load_sweep_config, parse_axis, run_name

__all__ = [
    "DivergedError",
    "RunResult",
    "RunSummary",
    "SweepResult",
    "grid",
    "is_sweep_dir",
    "latest_checkpoint",
    "load_run_config",
    "load_sweep_config",
    "parse_axis",
    "read_log",
    "run_name",
    "train",
    "train_sweep",
]
