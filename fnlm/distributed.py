"""Data parallelism over torch.distributed: one process per device, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 -m fnlm train ...

Every process holds the whole model and computes the gradient of its slice of the batch;
`all_reduce_mean` averages the gradients (and the loss) in one collective, so every process
applies the same update. NCCL's own settings are left untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from .tree import PyTree, tree_flatten, tree_unflatten


class World(NamedTuple):
    rank: int
    size: int
    local_rank: int  # the process's index on its host: its CUDA device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def joined(device_type: str) -> Iterator[World]:
    """Join the process group that torchrun's environment describes (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) for the duration; a lone process (no WORLD_SIZE) is World(0, 1, 0).
    A group that already exists is used as is and left for its creator to destroy."""
    if dist.is_available() and dist.is_initialized():
        yield World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World(0, 1, 0)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), local_rank)
    finally:
        dist.destroy_process_group()


def all_reduce_mean(tree: PyTree) -> PyTree:
    """The mean over all processes of a tree of tensors, as one all-reduce of one flat buffer."""
    leaves, structure = tree_flatten(tree)
    buffer = torch.cat([leaf.reshape(-1) for leaf in leaves])  # a fresh tensor: the inputs stay untouched
    dist.all_reduce(buffer)  # SUM: gloo has no AVG
    buffer /= dist.get_world_size()
    pieces = buffer.split([leaf.numel() for leaf in leaves])
    return tree_unflatten(structure, [piece.view_as(leaf).to(leaf.dtype) for piece, leaf in zip(pieces, leaves)])


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is True on any (e.g. a Ctrl-C seen by one)."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `value` over all processes (a fresh tensor)."""
    total = value.clone()
    dist.all_reduce(total)
    return total
