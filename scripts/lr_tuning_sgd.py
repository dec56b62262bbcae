"""The handout's learning_rate_tuning toy: SGD with a 1/sqrt(t+1) decay on mean(w^2), 10 steps per rate.

    uv run python scripts/lr_tuning_sgd.py                  # lr 1 (the handout's example), 1e1, 1e2, 1e3

w starts as 5 * N(0, 1) of shape (10, 10), the same draw for every rate (an explicit generator).
The gradient of mean(w^2) is w / 50, so step t multiplies w by 1 - lr / (50 sqrt(t+1)): for
lr = 10 that is 0.8, 0.86, ... (a steady decay); for lr = 100 it is -1, -0.41, -0.15, 0 (w is
zeroed, up to rounding, at the fourth step); for lr = 1e3 it is -19, -13, -10.5, ... (divergence).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def loss_fn(weights: torch.Tensor) -> torch.Tensor:
    return (weights**2).mean()


def sgd_losses(lr: float, *, steps: int, seed: int) -> list[float]:
    """The loss before each of `steps` SGD updates  w <- w - lr / sqrt(t + 1) * grad."""
    weights = 5 * torch.randn((10, 10), generator=torch.Generator().manual_seed(seed))
    grad_and_loss = torch.func.grad_and_value(loss_fn)
    losses = []
    for t in range(steps):
        grad, loss = grad_and_loss(weights)
        losses.append(loss.item())
        weights = weights - lr / math.sqrt(t + 1) * grad
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1.0, 1e1, 1e2, 1e3])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write {lr: losses} as JSON here")
    args = parser.parse_args()
    results = {f"{lr:g}": sgd_losses(lr, steps=args.steps, seed=args.seed) for lr in args.lrs}
    print("step " + "".join(f"{'lr ' + lr:>14}" for lr in results))
    for step in range(args.steps):
        print(f"{step:4d} " + "".join(f"{losses[step]:14.4g}" for losses in results.values()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"seed": args.seed, "losses": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
