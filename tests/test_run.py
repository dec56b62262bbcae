"""fnlm.run and `fnlm train` on ordinary mistakes: nothing lost, nothing silently wrong, one line
naming what is at fault (issue 11). Tiny models, a few steps each."""

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fnlm.checkpoint import load_checkpoint
from fnlm.cli import build_parser, main
from fnlm.config import ModelConfig, TrainConfig
from fnlm.model import init_params
from fnlm.optim import schedule_value
from fnlm.run import DivergedError, latest_checkpoint, read_log, train
from fnlm.run.folder import locked
from fnlm.sweep import make_sweep_step
from fnlm.train import make_optimizer, make_schedule, make_train_step
from fnlm.tree import tree_leaves
from tests.conftest import REPO, cli_error, subprocess_env

TINY = ModelConfig(vocab_size=48, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=64)
MODEL_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.to_dict().items() if not isinstance(v, bool)]


def tiny_config(token_files, **changes):
    values = dict(train_data=str(token_files[0]), val_data=str(token_files[1]), batch_size=4, steps=6, lr=3e-3,
                  min_lr=3e-4, warmup_steps=2, log_every=2, eval_every=3, eval_batches=2, checkpoint_every=2,
                  device="cpu")
    return TrainConfig(**values | changes)


def cli(out, token_files, *extra):
    return ["train", "--out", str(out), "--no-progress", "--device", "cpu", "--train-data", str(token_files[0]),
            "--batch-size", "2", "--warmup-steps", "1", "--eval-every", "0", *MODEL_FLAGS, *extra]


# --- the optimizer path and the step's learning rate -------------------------------------------


def test_the_step_reports_the_learning_rate_of_its_schedule_and_the_log_writes_it(tmp_path, token_files):
    cfg = tiny_config(token_files, steps=4, log_every=1, eval_every=0)
    params = init_params(TINY)
    optimizer, schedule = make_optimizer(cfg), make_schedule(cfg)
    step, opt_state = make_train_step(TINY, optimizer, schedule=schedule), optimizer.init(params)
    x = torch.randint(0, 48, (2, 16))
    for t in range(4):
        params, opt_state, metrics = step(params, opt_state, x, x)
        assert float(metrics.lr) == pytest.approx(schedule_value(schedule, t), rel=1e-6)
    assert math.isnan(make_train_step(TINY, optimizer)(params, opt_state, x, x)[2].lr)  # no schedule: unknown
    train(TINY, cfg, tmp_path / "run", show_progress=False)
    logged = [r["lr"] for r in read_log(tmp_path / "run" / "log.jsonl") if "lr" in r]
    assert logged == pytest.approx([schedule_value(schedule, t) for t in range(4)], rel=1e-6)


def test_make_sweep_step_leaves_the_process_alone(monkeypatch):
    """Compilation settings are registered where fnlm's autograd.Functions are defined, not by
    building a compiled sweep step."""
    def refuse(*args, **kwargs):
        raise AssertionError("make_sweep_step registered something process-wide")

    monkeypatch.setattr(torch._dynamo, "allow_in_graph", refuse)
    make_sweep_step(TINY, TrainConfig(), compile=True)
    import fnlm.train

    assert not hasattr(fnlm.train, "keep_freed_memory")  # malloc settings belong to entry points


# --- hyperparameters, data files, the folder lock -----------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"adam_eps": 0.0}, "adam_eps must be > 0"),
    ({"lr": math.inf}, "lr must be finite"),
    ({"lr": math.nan}, "lr must be finite"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
    ({"beta2": -0.5}, r"beta2 must be in \[0, 1\)"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
    ({"min_lr": 1.0}, r"min_lr must be in \[0, lr=0.001\]"),
])
def test_every_hyperparameter_is_checked(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change)


@pytest.mark.parametrize("which", ["train_data", "val_data"])
@pytest.mark.parametrize("problem, message", [
    ("short", "15 tokens is too short for context_length 16"),
    ("bad id", "token id 99 at position 3 is outside the vocabulary"),
    ("not npy", "not a readable token array"),
    ("missing", "does not exist"),
])
def test_every_data_file_is_checked_before_step_one(tmp_path, token_files, which, problem, message):
    bad = tmp_path / "bad.npy"
    if problem == "short":
        np.save(bad, np.arange(15, dtype=np.uint16))
    elif problem == "bad id":
        np.save(bad, np.array([1, 2, 3, 99] + [0] * 40, dtype=np.uint16))
    elif problem == "not npy":
        bad.write_bytes(b"\x93NUMPY garbage")
    cfg = tiny_config(token_files, **{which: str(bad)})
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        train(TINY, cfg, tmp_path / "run", show_progress=False)
    assert str(bad) in str(error.value)
    assert latest_checkpoint(tmp_path / "run") is None and not (tmp_path / "run" / "log.jsonl").exists()


def test_a_run_folder_is_locked_while_a_run_trains_in_it(tmp_path, token_files):
    cfg = tiny_config(token_files, steps=2, eval_every=0)
    with locked([tmp_path / "run"]):  # another run holds the folder
        with pytest.raises(BlockingIOError, match=f"{tmp_path / 'run'} is in use: process {os.getpid()}"):
            train(TINY, cfg, tmp_path / "run", show_progress=False)
        assert not (tmp_path / "run" / "config.json").exists()
    # The lock file stays behind, as after a crash: it blocks nothing once its process is gone.
    assert (tmp_path / "run" / ".lock").exists()
    assert train(TINY, cfg, tmp_path / "run", show_progress=False).step == 2


def test_a_second_process_into_the_same_out_fails_at_once(tmp_path, token_files):
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (  # another process, holding the lock as fnlm.run.folder does
        "import fcntl, time\n"
        f"lock = open({str(tmp_path / 'run' / '.lock')!r}, 'a+'); fcntl.flock(lock, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(cli(tmp_path / "run", token_files, "--steps", "2")) == 1
    finally:
        holder.kill()
        holder.wait()
    assert main(cli(tmp_path / "run", token_files, "--steps", "2")) == 0  # the dead holder blocks nothing


# --- divergence ---------------------------------------------------------------------------------


def test_a_diverging_single_run_stops_keeping_only_finite_checkpoints(tmp_path, token_files, capsys):
    """lr 1e30 without clipping: step 2 makes the weights ~1e30, step 3's loss is not finite."""
    cfg = tiny_config(token_files, lr=1e30, min_lr=0.0, max_grad_norm=None, steps=8, log_every=4,
                      checkpoint_every=1, eval_every=0)
    with pytest.raises(DivergedError, match=r"not finite at step \d") as error:
        train(TINY, cfg, tmp_path / "run", show_progress=False)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert checkpoints and str(checkpoints[-1]) in str(error.value)
    for path in checkpoints:
        assert all(torch.isfinite(leaf).all() for leaf in tree_leaves(load_checkpoint(path).params))
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert log[-1]["diverged"] and log[-1]["step"] > load_checkpoint(checkpoints[-1]).step
    # The command: one line, exit 1.
    line = cli_error(cli(tmp_path / "cli", token_files, "--lr", "1e30", "--min-lr", "0", "--max-grad-norm", "none",
                         "--steps", "6", "--log-every", "2"), capsys)
    assert "training diverged" in line


# --- resume --------------------------------------------------------------------------------------


def test_resume_refuses_a_changed_schedule_unless_told_and_records_it(tmp_path, token_files):
    cfg = tiny_config(token_files, steps=4, eval_every=0)
    train(TINY, cfg, tmp_path / "run", show_progress=False)
    longer = dataclasses.replace(cfg, steps=6)
    with pytest.raises(ValueError, match="stretch the cosine schedule from 4 to 6 steps"):
        train(TINY, longer, tmp_path / "run", resume=True, show_progress=False)
    with pytest.raises(ValueError, match=r"lr 0.003 -> 0.01"):
        train(TINY, dataclasses.replace(cfg, lr=1e-2), tmp_path / "run", resume=True, show_progress=False)
    kept = train(TINY, dataclasses.replace(longer, cosine_steps=4), tmp_path / "run", resume=True, show_progress=False)
    assert kept.step == 6
    train(TINY, dataclasses.replace(cfg, steps=8), tmp_path / "run", resume=True, reschedule=True, show_progress=False)
    assert {"step": 6, "reschedule": {"decay_steps": [4, 8]}} in read_log(tmp_path / "run" / "log.jsonl")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (saved["steps"], saved["cosine_steps"]) == (8, None)


def test_relative_data_paths_are_stored_absolute_and_resume_from_elsewhere(tmp_path, token_files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli("run", token_files, "--steps", "2")
    args[args.index("--train-data") + 1] = "train.npy"  # relative to tmp_path
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["train_data"] == str(tmp_path / "train.npy")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, "--resume", "--steps", "3", "--cosine-steps", "2", "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)  # the same file named relatively is no change
    assert main(["train", "--out", "run", "--resume", "--train-data", "train.npy", "--steps", "4",
                 "--cosine-steps", "2", "--no-progress"]) == 0
    assert load_checkpoint(latest_checkpoint(tmp_path / "run")).step == 4


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_last_step_and_exits_with_its_code(tmp_path, token_files, signum, code):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "fnlm", *cli(run_dir, token_files, "--steps", "100000", "--log-every", "1",
                                                  "--checkpoint-every", "0")]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    log = run_dir / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(read_log(log)) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    process.send_signal(signum)
    assert process.wait(timeout=60) == code
    summary = json.loads(process.stderr.read().strip().splitlines()[-1])
    assert summary["interrupted"] and summary["step"] >= 3
    assert load_checkpoint(summary["checkpoint"]).step == summary["step"]


# --- the command's messages ----------------------------------------------------------------------


def test_fnlm_train_errors_are_one_line_naming_the_fault(tmp_path, token_files, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--out", out, "--no-progress"]
    line = cli_error(base + ["--train-data", str(token_files[0])], capsys)
    assert "missing model flags --vocab-size, --context-length, --d-model, --num-layers, --num-heads, --d-ff" in line
    # A missing file comes first, before missing flags and before the default warm-up (100) > --steps.
    line = cli_error(base + ["--train-data", str(tmp_path / "nope.npy"), "--steps", "50"], capsys)
    assert f"--train-data {tmp_path / 'nope.npy'}: no such file" in line
    line = cli_error(base + MODEL_FLAGS + ["--train-data", str(token_files[0]), "--steps", "50"], capsys)
    assert "--steps (the default cosine_steps) (50) must be >= warmup_steps (100)" in line
    line = cli_error(base + MODEL_FLAGS + ["--train-data", str(token_files[0]), "--adam-eps", "0"], capsys)
    assert "--adam-eps must be > 0" in line
    assert "--sweep 'lr=abc': 'abc' is not a number" in cli_error(
        base + MODEL_FLAGS + ["--train-data", str(token_files[0]), "--sweep", "lr=abc"], capsys)
    # --resume: the folder's files, named.
    assert "config.json does not exist" in cli_error(base + ["--resume"], capsys)
    assert main(cli(tmp_path / "run", token_files, "--steps", "2")) == 0
    checkpoint = latest_checkpoint(tmp_path / "run")
    checkpoint.write_bytes(b"not a checkpoint")
    assert str(checkpoint) in cli_error(base + ["--resume", "--steps", "3", "--reschedule"], capsys)
    (tmp_path / "run" / "config.json").write_text('{"model": {"vocab_size": 4')
    line = cli_error(base + ["--resume"], capsys)
    assert f"{tmp_path / 'run' / 'config.json'}: not valid JSON (line 1" in line


def test_fnlm_train_help_describes_every_flag_with_its_default():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = commands.choices["train"]
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert "(default: " in action.help or "(required" in action.help, (action.option_strings, action.help)
    required = {action.option_strings[0] for action in parser._actions if action.help and "(required" in action.help}
    assert {"--out", "--train-data", "--vocab-size", "--d-model", "--num-heads"} <= required
