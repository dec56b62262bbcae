"""Data parallelism on CPU with gloo: 2 processes on half batches equal 1 process on the whole batch."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fnlm import distributed
from fnlm.checkpoint import load_checkpoint
from fnlm.config import ModelConfig, TrainConfig
from fnlm.run import train
from fnlm.model import init_params
from fnlm.optim import adamw
from fnlm.train import make_train_step
from fnlm.tree import flatten

TINY = ModelConfig(vocab_size=48, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64)
OPTIMIZER = dict(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5)


def batches(steps=3, batch_size=4):
    generator = torch.Generator().manual_seed(0)
    return [tuple(torch.randint(0, 48, (batch_size, 16), generator=generator) for _ in range(2)) for _ in range(steps)]


def run_steps(rows: slice, grad_sync=None):
    """Three float64 steps on rows of each batch: (params, loss and grad norm of the last step)."""
    params = init_params(TINY, seed=0, dtype=torch.float64)
    optimizer = adamw(**OPTIMIZER)
    step, opt_state = make_train_step(TINY, optimizer, grad_sync=grad_sync), optimizer.init(params)
    for x, y in batches():
        params, opt_state, metrics = step(params, opt_state, x[rows], y[rows])
    return params, metrics


def _worker(rank: int, port: int, out: str, cfg: TrainConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.joined("cpu") as world:
        assert world == (rank, 2, rank)
        params, metrics = run_steps(slice(2 * rank, 2 * rank + 2), grad_sync=distributed.all_reduce_mean)
        if world.is_main:
            torch.save({"params": flatten(params), "metrics": tuple(metrics)}, os.path.join(out, "steps.pt"))
        train(TINY, cfg, os.path.join(out, "two"), show_progress=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    stream = np.random.default_rng(0).integers(0, 48, 20_000).astype(np.uint16)
    np.save(tmp_path / "train.npy", stream)
    np.save(tmp_path / "val.npy", stream[:3_000])
    cfg = TrainConfig(train_data=str(tmp_path / "train.npy"), val_data=str(tmp_path / "val.npy"), batch_size=4,
                      steps=6, warmup_steps=1, log_every=3, eval_every=3, eval_batches=3, checkpoint_every=0,
                      device="cpu")
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), cfg), nprocs=2, start_method="spawn")

    # The step: gradients averaged over halves are the whole batch's gradient (float64, to rounding).
    params, metrics = run_steps(slice(0, 4))
    two = torch.load(tmp_path / "steps.pt", weights_only=True)
    for key, leaf in flatten(params).items():
        torch.testing.assert_close(two["params"][key], leaf, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.stack(two["metrics"]).double(), torch.stack(tuple(metrics)).double(), rtol=1e-6, atol=0,
                               equal_nan=True)  # lr: NaN, a constant rate has no schedule to report

    # The loop: each process keeps its rows of the same global batch; logs and checkpoints on rank 0.
    one = train(TINY, cfg, tmp_path / "one", show_progress=False)
    one_ckpt, two_ckpt = load_checkpoint(one.checkpoint), load_checkpoint(tmp_path / "two" / "checkpoints" / "step_0000006.pt")
    for key, leaf in flatten(one_ckpt.params).items():
        torch.testing.assert_close(flatten(two_ckpt.params)[key], leaf, rtol=1e-4, atol=1e-5)
    one_log, two_log = ((tmp_path / name / "log.jsonl").read_text().splitlines() for name in ("one", "two"))
    assert len(one_log) == len(two_log) == 4
