"""Sweep throughput: K training runs as one vmapped program against the same K runs one after another.

    uv run python scripts/bench_sweep.py                                      # CPU, K = 4 and 8, eager
    python scripts/bench_sweep.py --device cuda --runs 4,8 --autocast bfloat16 --compile both \\
        --out bench_sweep_h100.json                                           # the issue's H100 target

The K runs differ as a learning-rate x seed sweep does: run k starts from init_params(seed=k) and
trains with its own peak learning rate (lr_k = lr * 2^(k - K/2), min_lr = lr_k / 10, warm-up and
cosine decay), on its own batches (--stream per-run) or on one shared stream (--stream same).

sequential: K ordinary steps one after another, each run with its own state. Eager, each run has
            fnlm.train.make_train_step with its own float optimizer (what `fnlm train` runs);
            compiled, one torch.compile'd step takes the run's numbers as tensors, so it compiles
            once rather than K times (the step's speed is the same).
vmapped:    fnlm.sweep.make_sweep_step: one vmapped step over the stacked runs (compiled whole).

Both sides do the same work: per timed round, `--steps` steps of every run. Timed rounds
alternate between the variants (A B A B ...) so load from other processes hits all alike;
tokens/s (all runs together) is the median over rounds. Every variant trains the same runs from
the same weights on the same batches, so their per-run loss curves must agree: the report gives
the final losses of both sides and the largest loss gap along the curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import device_name, synchronize  # noqa: E402
from fnlm.config import AUTOCAST_DTYPES, ModelConfig, TrainConfig  # noqa: E402
from fnlm.data import load_tokens, resolve_device  # noqa: E402
from fnlm.model import init_params, num_params  # noqa: E402
from fnlm.run.process import keep_freed_memory  # noqa: E402
from fnlm.sweep import make_sweep_step, stack  # noqa: E402
from fnlm.train import make_optimizer, make_schedule, make_train_step, parse_autocast  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto")
    parser.add_argument("--runs", default="4,8", help="comma-separated numbers of runs K to measure")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, help="default: 8/3 d_model rounded up to a multiple of 64")
    parser.add_argument("--batch-size", type=int, default=16, help="per run")
    parser.add_argument("--lr", type=float, default=1e-3, help="the middle run's peak learning rate")
    parser.add_argument("--stream", choices=("per-run", "same"), default="per-run",
                        help="per-run: every run its own batches (x (K, B, T)); same: one shared batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of every run per round and variant")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compilation)")
    parser.add_argument("--compile", choices=["none", "compiled", "both"], default="none",
                        help="none: eager only; compiled: torch.compile'd only; both")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--autocast", choices=AUTOCAST_DTYPES, default="none")
    parser.add_argument("--data", type=Path, help="a .npy token file to draw batches from (default: random ids)")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches per run, cycled")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0, help="data seed; run k's init seed is k")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args()


class Sequential:
    """K runs, each its own params / optimizer state, stepped one after another."""

    def __init__(self, cfg, base, configs, params, states, amp, device, compile, compile_mode, shared_compiled):
        self.params, self.states = list(params), list(states)
        if compile:
            self.hparams = [{"lr": torch.tensor(c.lr, device=device), "min_lr": torch.tensor(c.min_lr, device=device)}
                            for c in configs]
            self.steps = [shared_compiled] * len(configs)
        else:
            self.hparams = [None] * len(configs)
            self.steps = [make_train_step(cfg, make_optimizer(c), schedule=make_schedule(c), autocast_dtype=amp,
                                          device_type=device.type) for c in configs]

    def step(self, batches):
        losses = []
        for k, (x, y) in enumerate(batches):
            args = (self.params[k], self.states[k]) + (() if self.hparams[k] is None else (self.hparams[k],))
            self.params[k], self.states[k], metrics = self.steps[k](*args, x, y)
            losses.append(metrics.loss)
        return torch.stack(losses)


class Vmapped:
    def __init__(self, cfg, base, configs, params, states, amp, device, compile, compile_mode, shared_batch):
        self.params, self.states = stack(params), stack(states)
        self.hparams = {name: torch.tensor([getattr(c, name) for c in configs], device=device)
                        for name in ("lr", "min_lr")}
        self.alive = torch.ones(len(configs), dtype=torch.bool, device=device)
        self.step_fn = make_sweep_step(cfg, base, shared_batch=shared_batch,
                                       autocast_dtype=amp, device_type=device.type, compile=compile,
                                       compile_mode=compile_mode)

    def step(self, batch):
        self.params, self.states, metrics = self.step_fn(self.params, self.states, self.hparams, self.alive, *batch)
        return metrics.loss


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    kept_freed_memory = device.type == "cpu" and keep_freed_memory()
    # One compiled program per (variant, K): no shape-generic recompiles across K.
    torch._dynamo.config.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    d_ff = args.d_ff or -(-8 * args.d_model // 3 // 64) * 64
    cfg = ModelConfig(vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
                      num_layers=args.num_layers, num_heads=args.num_heads, d_ff=d_ff)
    amp = parse_autocast(args.autocast)
    total_steps = args.warmup + args.rounds * args.steps
    base = TrainConfig(steps=total_steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, total_steps // 10),
                       weight_decay=0.1, beta2=0.95, max_grad_norm=1.0, autocast=args.autocast)
    modes = {"none": [False], "compiled": [True], "both": [False, True]}[args.compile]
    shared_compiled = None  # the sequential side's one compiled step, shared by every K
    results = []
    for runs in (int(k) for k in args.runs.split(",")):
        configs = [dataclasses.replace(base, lr=args.lr * 2.0 ** (k - runs // 2), min_lr=args.lr * 2.0 ** (k - runs // 2) / 10)
                   for k in range(runs)]
        params = [init_params(cfg, seed=k, device=device) for k in range(runs)]
        states = [make_optimizer(c).init(p) for c, p in zip(configs, params)]
        batches = make_batches(args, cfg, runs, device)
        variants, errors = {}, {}
        for compile in modes:
            mode = "compiled" if compile else "eager"
            if compile and shared_compiled is None:
                shared_compiled = torch.compile(tensor_hparam_step(cfg, base, amp, device), mode=args.compile_mode)
            for side in ("sequential", "vmapped"):
                try:
                    if side == "sequential":
                        variants[f"{side} {mode}"] = Sequential(cfg, base, configs, params, states, amp, device,
                                                                compile, args.compile_mode, shared_compiled)
                    else:
                        variants[f"{side} {mode}"] = Vmapped(cfg, base, configs, params, states, amp, device, compile,
                                                             args.compile_mode, args.stream == "same")
                except Exception:  # noqa: BLE001 - report and measure the rest
                    errors[f"{side} {mode}"] = traceback.format_exc(limit=3)
        results.append(measure(args, runs, cfg, variants, errors, batches, device))
        report(results[-1], args)

    result = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": cfg.to_dict(),
        "parameters_per_run": num_params(init_params(cfg)),
        "batch_size_per_run": args.batch_size,
        "stream": args.stream,
        "autocast": args.autocast,
        "compile_mode": args.compile_mode,
        "keep_freed_memory": kept_freed_memory,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "warmup_steps": args.warmup,
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def tensor_hparam_step(cfg, base, amp, device):
    """One run's step with its lr and min_lr as tensor arguments: compiled once for every run."""

    def step(params, opt_state, hparams, x, y):
        optimizer, schedule = make_optimizer(base, **hparams), make_schedule(base, **hparams)
        return make_train_step(cfg, optimizer, schedule=schedule, autocast_dtype=amp,
                               device_type=device.type)(params, opt_state, x, y)

    return step


def measure(args, runs, cfg, variants, errors, batches, device) -> dict:
    losses = {name: [] for name in variants}  # per step: (K,) losses
    cursor = {name: 0 for name in variants}

    def run(name: str, steps: int) -> float:
        variant, start = variants[name], time.perf_counter()
        for _ in range(steps):
            i = cursor[name] % len(batches)
            batch = batches[i]
            if isinstance(variant, Sequential):
                per_run = [batch] * runs if args.stream == "same" else list(zip(batch[0], batch[1]))
                losses[name].append(variant.step(per_run))
            else:
                losses[name].append(variant.step(batch))
            cursor[name] += 1
        synchronize(device)
        return time.perf_counter() - start

    warmup_seconds = {}
    for name in list(variants):
        try:
            warmup_seconds[name] = run(name, args.warmup)
        except Exception:  # noqa: BLE001 - e.g. a compile failure: report it, measure the rest
            errors[name] = traceback.format_exc(limit=3)
            del variants[name], losses[name]
    seconds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            seconds[name].append(run(name, args.steps))

    tokens_per_round = runs * args.batch_size * cfg.context_length * args.steps
    tokens_per_s = {name: tokens_per_round / statistics.median(ts) for name, ts in seconds.items()}
    curves = {name: torch.stack(values).T.tolist() for name, values in losses.items()}  # (K, steps)
    ratios, gaps = {}, {}
    for mode in ("eager", "compiled"):
        seq, vm = f"sequential {mode}", f"vmapped {mode}"
        if seq in tokens_per_s and vm in tokens_per_s:
            ratios[mode] = tokens_per_s[vm] / tokens_per_s[seq]
            gaps[mode] = max(abs(a - b) for ca, cb in zip(curves[seq], curves[vm]) for a, b in zip(ca, cb))
    return {
        "runs": runs,
        "tokens_per_s": tokens_per_s,
        "ratio_vmapped_over_sequential": ratios,
        "max_loss_gap_vmapped_vs_sequential": gaps,
        "final_losses": {name: [curve[-1] for curve in per_run] for name, per_run in curves.items()},
        "warmup_seconds": warmup_seconds,
        "round_seconds": seconds,
        "errors": errors,
        "loss_curves": curves,
    }


def make_batches(args, cfg: ModelConfig, runs: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`--batches` batches: x, y (B, T) shared by the runs, or (K, B, T) with one batch per run."""
    generator = torch.Generator().manual_seed(args.seed)
    lead = () if args.stream == "same" else (runs,)
    shape = (*lead, args.batch_size, cfg.context_length + 1)
    if args.data:
        tokens = torch.from_numpy(load_tokens(args.data, vocab_size=cfg.vocab_size)[: 50_000_000].astype("int64"))
        starts = torch.randint(0, len(tokens) - shape[-1], (args.batches, *shape[:-1]), generator=generator)
        windows = [tokens[s[..., None] + torch.arange(shape[-1])] for s in starts]
    else:
        windows = [torch.randint(0, cfg.vocab_size, shape, generator=generator) for _ in range(args.batches)]
    return [(w[..., :-1].to(device), w[..., 1:].to(device)) for w in windows]


def report(result: dict, args) -> None:
    runs = result["runs"]
    print(f"K = {runs} runs, batch {args.batch_size} per run, stream {args.stream}, autocast {args.autocast}; "
          f"median of {args.rounds} rounds x {args.steps} steps of every run")
    for name, rate in result["tokens_per_s"].items():
        finals = ", ".join(f"{loss:.4f}" for loss in result["final_losses"][name])
        print(f"  {name:20s} {rate:12,.0f} tokens/s   warm-up {result['warmup_seconds'][name]:.1f} s   "
              f"final losses [{finals}]")
    for mode, ratio in result["ratio_vmapped_over_sequential"].items():
        gap = result["max_loss_gap_vmapped_vs_sequential"][mode]
        print(f"  {mode}: vmapped / sequential = {ratio:.2f}x tokens/s   (max loss gap {gap:.2e})")
    for name, error in result["errors"].items():
        print(f"  {name} FAILED:\n{error}")


if __name__ == "__main__":
    main()
