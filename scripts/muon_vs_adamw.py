"""Muon against AdamW on the same model, tokens and seed, each at its own tuned learning rate.

    python scripts/muon_vs_adamw.py --train .muon_data/train.npy --val .muon_data/val.npy \
        --device cuda --out docs/results/muon_vs_adamw.json --plot docs/results/muon_vs_adamw.png

Two vmapped sweeps (fnlm.sweep), one program each: AdamW over --adamw-lrs, then Muon (hidden
matrices; AdamW at the best AdamW learning rate for the embeddings, the head and the gains) over
--muon-lrs. Every run starts from the same initialization and reads the same batches in the same
order; the validation loss is measured on the same fixed batches every --eval-every steps.
The JSON holds every curve and "muon_steps_to_match_adamw_ratio": the steps the best Muon run
needs to reach the best AdamW run's final validation loss (linear between evaluations), over
AdamW's steps.

With --leaderboard CONFIG it then times the leaderboard config (a `fnlm train --config` file):
tokens/s of its training step with AdamW and with Muon (the peer in the same run, both losses
beside), and a run of --leaderboard-seconds on the same tokens with its validation loss.
Shape legend: K runs, B batch, T context.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accounting import param_count  # noqa: E402
from benchlib import synchronize  # noqa: E402
from fnlm.config import ModelConfig, TrainConfig  # noqa: E402
from fnlm.files import write_json  # noqa: E402
from fnlm.model import init_params  # noqa: E402
from fnlm.sweep import make_sweep_step, stack  # noqa: E402
from fnlm.train import make_loss_fn, make_optimizer, make_train_step  # noqa: E402


def parse_floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help=".npy token array")
    parser.add_argument("--val", type=Path, required=True, help=".npy token array")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--plot", type=Path, help="PNG of the validation curves")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--d-ff", type=int, default=1344)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--adamw-lrs", type=parse_floats, default=parse_floats("1e-3,2e-3,4e-3,8e-3"))
    parser.add_argument("--muon-lrs", type=parse_floats, default=parse_floats("2.5e-3,5e-3,1e-2,2e-2"))
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="initialization and batch order, shared by every run")
    parser.add_argument("--autocast", choices=("none", "bfloat16"), default="bfloat16")
    parser.add_argument("--leaderboard", type=Path, help="a `fnlm train --config` TOML to time")
    parser.add_argument("--leaderboard-steps", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--leaderboard-seconds", type=float, default=30.0, help="length of the stand-in run")
    parser.add_argument("--deadline-seconds", type=float, default=math.inf,
                        help="shorten the stand-in run so that the script ends by then (from its start)")
    args = parser.parse_args()

    args.started = time.perf_counter()
    device = torch.device(args.device)
    amp = None if args.autocast == "none" else torch.bfloat16
    train_tokens = torch.from_numpy(np.load(args.train).astype(np.int64)).to(device)
    val_tokens = torch.from_numpy(np.load(args.val).astype(np.int64)).to(device)
    cfg = ModelConfig(vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
                      num_layers=args.num_layers, num_heads=args.num_heads, d_ff=args.d_ff)
    result = {
        "command": "muon_vs_adamw.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": cfg.to_dict(),
        "parameters": param_count(cfg),
        "data": {"train": str(args.train), "val": str(args.val), "train_tokens": len(train_tokens),
                 "val_tokens_per_eval": args.eval_batches * args.batch_size * args.context_length},
        "batch_size": args.batch_size, "steps": args.steps,
        "tokens_per_run": args.steps * args.batch_size * args.context_length,
        "seed": args.seed, "autocast": args.autocast,
        "schedule": f"linear warm-up {args.warmup_steps} steps, cosine to lr/10 at step {args.steps}",
        "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
        "muon": {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "scale": "0.2 sqrt(max(m, n))"},
    }
    base = TrainConfig(batch_size=args.batch_size, steps=args.steps, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed)
    result["train_config"] = base.to_dict()
    batches = Batches(train_tokens, args.batch_size, args.context_length, args.seed)
    val_batches = fixed_batches(val_tokens, args.eval_batches, args.batch_size, args.context_length, args.seed + 1)

    # Each run's rate replaces the config's as a tensor (min_lr = lr / 10 for each): fnlm.train.make_optimizer.
    adamw_cfg = dataclasses.replace(base, optimizer="adamw")
    adamw_hparams = {"lr": args.adamw_lrs, "min_lr": [lr / 10 for lr in args.adamw_lrs]}
    adamw_sweep = run_sweep("adamw", cfg, adamw_cfg, adamw_hparams, batches, val_batches, args, device, amp)
    result["adamw"] = adamw_sweep
    best_adam_lr = adamw_sweep["best_lr"]
    write(args.out, result)

    muon_cfg = dataclasses.replace(base, optimizer="muon", lr=best_adam_lr, min_lr=best_adam_lr / 10)
    muon_sweep = run_sweep("muon", cfg, muon_cfg, {"muon_lr": args.muon_lrs}, batches, val_batches, args, device, amp)
    muon_sweep["adamw_lr_for_embeddings_head_and_gains"] = best_adam_lr
    result["muon"] = muon_sweep
    target = adamw_sweep["final_val_loss"][adamw_sweep["best_lr"]]
    best_muon = muon_sweep["final_val_loss"][muon_sweep["best_lr"]]
    steps_to_match = first_crossing(muon_sweep["eval_steps"], muon_sweep["val_loss"][muon_sweep["best_lr"]], target)
    result["summary"] = {
        "adamw_best_lr": best_adam_lr, "adamw_final_val_loss": target,
        "muon_best_lr": muon_sweep["best_lr"], "muon_final_val_loss": best_muon,
        "muon_steps_to_match_adamw": steps_to_match,
    }
    result["muon_steps_to_match_adamw_ratio"] = None if steps_to_match is None else steps_to_match / args.steps
    print(json.dumps(result["summary"]), "ratio", result["muon_steps_to_match_adamw_ratio"], flush=True)
    write(args.out, result)
    if args.plot:
        plot(result, args.plot)
    if args.leaderboard:
        result["leaderboard"] = leaderboard(args, train_tokens, val_tokens, device, amp)
        write(args.out, result)


class Batches:
    """The same random windows, in the same order, for every sweep: step i's batch is a function of (seed, i)."""

    def __init__(self, tokens, batch_size, context_length, seed):
        self.tokens, self.batch_size, self.context_length, self.seed = tokens, batch_size, context_length, seed

    def __call__(self, step):
        return window_batch(self.tokens, self.batch_size, self.context_length, self.seed * 1_000_003 + step)


def window_batch(tokens, batch_size, context_length, seed):
    """(x, y) (B, T) long: B random windows of T + 1 tokens."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - context_length - 1, (batch_size,), generator=generator).to(tokens.device)
    windows = tokens[starts.unsqueeze(1) + torch.arange(context_length + 1, device=tokens.device)]  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def fixed_batches(tokens, count, batch_size, context_length, seed):
    return [window_batch(tokens, batch_size, context_length, seed * 1_000_003 + i) for i in range(count)]


def run_sweep(name, cfg, train_cfg, hparams, batches, val_batches, args, device, amp):
    """K runs from one initialization, trained together, run k with hparams' k-th values in
    place of train_cfg's (the first of hparams names the runs); curves and timings."""
    lrs = next(iter(hparams.values()))
    runs = len(lrs)
    initial = init_params(cfg, seed=args.seed, device=device)  # stack copies it; optimizer inits only read it
    params = stack([initial] * runs)
    opt_state = stack([make_optimizer(dataclasses.replace(train_cfg, **{n: v[k] for n, v in hparams.items()})).init(
        initial) for k in range(runs)])
    hparams = {name: torch.tensor(values, device=device) for name, values in hparams.items()}
    alive = torch.ones(runs, dtype=torch.bool, device=device)
    step = make_sweep_step(cfg, train_cfg, autocast_dtype=amp, device_type=device.type)
    loss_fn = make_loss_fn(cfg, autocast_dtype=amp, device_type=device.type)
    val_loss_fn = torch.func.vmap(loss_fn, in_dims=(0, None, None))

    def validate(params):
        with torch.no_grad():
            return (sum(val_loss_fn(params, x, y) for x, y in val_batches) / len(val_batches)).tolist()

    eval_steps, val_curves, train_curves = [0], [validate(params)], []
    synchronize(device)
    start, train_seconds = time.perf_counter(), 0.0
    for i in range(args.steps):
        x, y = batches(i)
        params, opt_state, metrics = step(params, opt_state, hparams, alive, x, y)
        alive = metrics.alive
        train_curves.append(metrics.loss)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            synchronize(device)
            train_seconds += time.perf_counter() - start
            eval_steps.append(i + 1)
            val_curves.append(validate(params))
            print(f"{name} step {i + 1}: val {['%.3f' % v for v in val_curves[-1]]} "
                  f"({train_seconds:.1f}s training)", flush=True)
            start = time.perf_counter()
    train_curves = torch.stack(train_curves).T.tolist()  # (K, steps)
    final = {lr: val_curves[-1][k] if bool(alive[k]) else math.inf for k, lr in enumerate(lrs)}
    best = min(final, key=final.get)
    tokens = args.steps * args.batch_size * args.context_length * runs
    return {
        "lrs": lrs, "best_lr": best, "final_val_loss": final, "alive": alive.tolist(),
        "eval_steps": eval_steps,
        "val_loss": {lr: [curve[k] for curve in val_curves] for k, lr in enumerate(lrs)},
        "train_loss": {lr: train_curves[k] for k, lr in enumerate(lrs)},
        "train_seconds": train_seconds, "tokens_per_s_all_runs": tokens / train_seconds,
    }


def first_crossing(steps, losses, target):
    """The first step (linear between evaluations) where losses reach target, or None."""
    for (s0, l0), (s1, l1) in zip(zip(steps, losses), zip(steps[1:], losses[1:])):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def leaderboard(args, train_tokens, val_tokens, device, amp):
    """Tokens/s of the config's step with AdamW and Muon, and a short run with its optimizer."""
    config = tomllib.loads(args.leaderboard.read_text())
    cfg, train_cfg = ModelConfig.from_dict(config["model"]), TrainConfig.from_dict(config["train"])
    batch = train_cfg.batch_size
    out = {"config": str(args.leaderboard), "model": cfg.to_dict(), "train": train_cfg.to_dict(),
           "parameters": param_count(cfg)}
    batches = Batches(train_tokens, batch, cfg.context_length, args.seed + 7)
    throughput = {}
    for kind in ("adamw", "muon"):
        params = init_params(cfg, seed=args.seed, device=device)
        optimizer = make_optimizer(dataclasses.replace(train_cfg, optimizer=kind))
        state = optimizer.init(params)
        step = make_train_step(cfg, optimizer, autocast_dtype=amp, device_type=device.type)
        for i in range(2):  # warm-up: kernels, allocator
            params, state, metrics = step(params, state, *batches(i))
        synchronize(device)
        start = time.perf_counter()
        for i in range(args.leaderboard_steps):
            params, state, metrics = step(params, state, *batches(2 + i))
        synchronize(device)
        seconds = time.perf_counter() - start
        throughput[kind] = {"tokens_per_s": args.leaderboard_steps * batch * cfg.context_length / seconds,
                            "loss_after": metrics.loss.item(), "steps": args.leaderboard_steps + 2}
        print(f"leaderboard {kind}: {throughput[kind]}", flush=True)
    out["throughput_eager"] = throughput
    out["muon_over_adamw_tokens_per_s"] = throughput["muon"]["tokens_per_s"] / throughput["adamw"]["tokens_per_s"]

    # A short run with the config's own optimizer, its schedule compressed to what the seconds allow.
    tokens_per_s = throughput[train_cfg.optimizer]["tokens_per_s"]
    seconds_left = args.deadline_seconds - (time.perf_counter() - args.started) - 15  # 15 s: validation, writing
    run_seconds = max(0.0, min(args.leaderboard_seconds, seconds_left))
    run_steps = max(10, int(run_seconds * tokens_per_s / (batch * cfg.context_length)))
    short_cfg = dataclasses.replace(train_cfg, steps=run_steps, cosine_steps=None,
                                    warmup_steps=min(train_cfg.warmup_steps, run_steps // 10))
    params = init_params(cfg, seed=args.seed, device=device)
    optimizer = make_optimizer(short_cfg)
    state = optimizer.init(params)
    step = make_train_step(cfg, optimizer, autocast_dtype=amp, device_type=device.type)
    synchronize(device)
    start = time.perf_counter()
    for i in range(run_steps):
        params, state, metrics = step(params, state, *batches(1000 + i))
    synchronize(device)
    seconds = time.perf_counter() - start
    loss_fn = make_loss_fn(cfg, autocast_dtype=amp, device_type=device.type)
    val = fixed_batches(val_tokens, args.eval_batches, batch, cfg.context_length, args.seed + 1)
    with torch.no_grad():
        val_loss = sum(loss_fn(params, x, y).item() for x, y in val) / len(val)
    out["short_run"] = {"train_config": short_cfg.to_dict(), "steps": run_steps, "seconds": seconds,
                        "tokens": run_steps * batch * cfg.context_length, "final_train_loss": metrics.loss.item(),
                        "val_loss": val_loss, "val_tokens": len(val) * batch * cfg.context_length}
    print(f"leaderboard short run: {out['short_run']}", flush=True)
    return out


def write(path, result):
    write_json(path, result, indent=1)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, color in (("adamw", "tab:blue"), ("muon", "tab:red")):
        sweep = result[name]
        for lr in sweep["lrs"]:
            best = lr == sweep["best_lr"]
            ax.plot(sweep["eval_steps"], sweep["val_loss"][lr], color=color, alpha=1.0 if best else 0.3,
                    linewidth=2 if best else 1, label=f"{name} lr={lr:g}" + (" (best)" if best else ""))
    target = result["summary"]["adamw_final_val_loss"]
    ax.axhline(target, color="gray", linestyle=":", linewidth=1)
    ratio = result["muon_steps_to_match_adamw_ratio"]
    ax.set_title(f"validation loss, {result['parameters'] / 1e6:.1f}M params, {result['device']}\n"
                 f"Muon reaches AdamW's final loss at {ratio:.2f} of the steps" if ratio else "validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    low = min(min(result[n]["final_val_loss"].values()) for n in ("adamw", "muon"))
    ax.set_ylim(low - 0.1, low + 2.0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
