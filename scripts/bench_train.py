"""Training-step throughput: fnlm's functional step against a conventional PyTorch step.

    uv run python scripts/bench_train.py                                   # CPU, small config, eager
    uv run python scripts/bench_train.py --compile both --steps 10
    python scripts/bench_train.py --device cuda --config tinystories --batch-size 128 \\
        --autocast bfloat16 --compile both --out bench_train_h100.json     # the issue's H100 target

fnlm:      params pytree -> torch.func.grad_and_value(loss) -> adamw chain (clip, Adam, decay, lr)
           -> apply_updates, all one pure function (torch.compile'd whole when compiled).
reference: tests/reference.py's ReferenceLM (nn.Modules, F.scaled_dot_product_attention),
           loss.backward(), clip_grad_norm_, torch.optim.AdamW(fused=True); compiled means
           torch.compile(model), the usual way.

Both start from the same weights, see the same batches in the same order with the same
hyperparameters (constant lr, clipping at 1.0), and keep float32 weights and optimizer state
(autocast only around the forward). Timed rounds alternate between the variants (A B A B ...)
so that load from other processes hits all alike; tokens/s is the median over rounds. The losses
after the same number of steps are reported next to every speed figure: fnlm eager and fnlm
compiled must agree closely, and both with the reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import device_name, synchronize  # noqa: E402
from fnlm.config import AUTOCAST_DTYPES, ModelConfig  # noqa: E402
from fnlm.data import load_tokens, resolve_device  # noqa: E402
from fnlm.model import init_params, num_params  # noqa: E402
from fnlm.optim import adamw  # noqa: E402
from fnlm.run.process import keep_freed_memory  # noqa: E402
from fnlm.train import autocast, make_train_step, parse_autocast  # noqa: E402
from fnlm.tree import flatten  # noqa: E402
from tests.reference import ReferenceLM  # noqa: E402

CONFIGS = {
    "tinystories": dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344),
    "small": dict(vocab_size=10_000, context_length=64, d_model=128, num_layers=2, num_heads=4, d_ff=344),
}
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    for name in CONFIGS["small"]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the config's {name}")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and variant")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compilation)")
    parser.add_argument("--compile", choices=["none", "compiled", "both"], default="none",
                        help="none: eager only; compiled: torch.compile'd only; both")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--autocast", choices=AUTOCAST_DTYPES, default="none")
    parser.add_argument("--data", type=Path, help="a .npy token file to draw batches from (default: random ids)")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, cycled")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="on CPU, keep freed memory in the heap (fnlm.run.process.keep_freed_memory), for both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args()


class Fnlm:
    def __init__(self, cfg, params, amp, device, compile, compile_mode):
        self.params = params  # shared with the other variants: steps never modify their inputs
        optimizer = adamw(HYPER["lr"], *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"],
                          max_grad_norm=HYPER["max_grad_norm"])
        self.opt_state = optimizer.init(self.params)
        self.step_fn = make_train_step(cfg, optimizer, autocast_dtype=amp, device_type=device.type,
                                       compile=compile, compile_mode=compile_mode)

    def step(self, x, y):
        self.params, self.opt_state, metrics = self.step_fn(self.params, self.opt_state, x, y)
        return metrics.loss


class Reference:
    def __init__(self, cfg, params, amp, device, compile, compile_mode):
        self.model = ReferenceLM(cfg).to(device)
        self.model.load_state_dict(flatten(params))
        self.forward_loss = torch.compile(self.model.loss, mode=compile_mode) if compile else self.model.loss
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=HYPER["lr"], betas=HYPER["betas"],
                                           eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], fused=True)
        self.amp, self.device_type = amp, device.type

    def step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device_type, self.amp):
            loss = self.forward_loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), HYPER["max_grad_norm"])
        self.optimizer.step()
        return loss.detach()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    kept_freed_memory = device.type == "cpu" and args.keep_freed_memory and keep_freed_memory()
    dims = CONFIGS[args.config] | {k: v for k, v in vars(args).items() if k in CONFIGS["small"] and v is not None}
    cfg = ModelConfig(**dims)
    amp = parse_autocast(args.autocast)
    batches = make_batches(args, cfg, device)
    params = init_params(cfg, seed=args.seed, device=device)  # float32 master weights for everyone

    compiled = {"none": [False], "compiled": [True], "both": [False, True]}[args.compile]
    variants = {
        f"{name} {'compiled' if c else 'eager'}": cls(cfg, params, amp, device, c, args.compile_mode)
        for c in compiled for name, cls in (("fnlm", Fnlm), ("reference", Reference))
    }
    losses = {name: [] for name in variants}
    cursor = {name: 0 for name in variants}

    def run(name: str, steps: int) -> float:
        variant, start = variants[name], time.perf_counter()
        for _ in range(steps):
            losses[name].append(variant.step(*batches[cursor[name] % len(batches)]))
            cursor[name] += 1
        synchronize(device)
        return time.perf_counter() - start

    compile_seconds = {name: run(name, args.warmup) for name in variants}
    seconds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            seconds[name].append(run(name, args.steps))

    tokens_per_step = args.batch_size * cfg.context_length
    tokens_per_s = {name: tokens_per_step * args.steps / statistics.median(ts) for name, ts in seconds.items()}
    loss_curves = {name: [float(loss) for loss in values] for name, values in losses.items()}
    ratios = {
        mode: tokens_per_s[f"fnlm {mode}"] / tokens_per_s[f"reference {mode}"]
        for mode in ("eager", "compiled") if f"fnlm {mode}" in variants
    }
    result = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": cfg.to_dict(),
        "parameters": num_params(params),
        "batch_size": args.batch_size,
        "autocast": args.autocast,
        "compile_mode": args.compile_mode,
        "keep_freed_memory": kept_freed_memory,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "tokens_per_s": tokens_per_s,
        "ratio_fnlm_over_reference": ratios,
        "warmup_seconds": compile_seconds,
        "final_loss": {name: curve[-1] for name, curve in loss_curves.items()},
        "loss_curves": loss_curves,
        "max_loss_gap_fnlm_eager_vs_compiled": max_gap(loss_curves, "fnlm eager", "fnlm compiled"),
        "max_loss_gap_fnlm_vs_reference": {
            mode: max_gap(loss_curves, f"fnlm {mode}", f"reference {mode}") for mode in ratios
        },
    }
    report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def make_batches(args, cfg: ModelConfig, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, cfg.context_length + 1)
    if args.data:
        tokens = torch.from_numpy(load_tokens(args.data, vocab_size=cfg.vocab_size)[: 50_000_000].astype("int64"))
        starts = torch.randint(0, len(tokens) - shape[1], (args.batches, args.batch_size), generator=generator)
        windows = [tokens[s[:, None] + torch.arange(shape[1])] for s in starts]
    else:
        windows = [torch.randint(0, cfg.vocab_size, shape, generator=generator) for _ in range(args.batches)]
    return [(w[:, :-1].to(device), w[:, 1:].to(device)) for w in windows]


def max_gap(curves: dict[str, list[float]], a: str, b: str) -> float | None:
    if a not in curves or b not in curves:
        return None
    return max(abs(x - y) for x, y in zip(curves[a], curves[b]))


def report(result: dict) -> None:
    cfg = result["config"]
    print(f"{result['device']}, torch {result['torch']}, d_model {cfg['d_model']} x {cfg['num_layers']} layers, "
          f"vocab {cfg['vocab_size']}, context {cfg['context_length']}, batch {result['batch_size']}, "
          f"autocast {result['autocast']}; median of {result['rounds']} rounds x {result['steps_per_round']} steps")
    for name, rate in result["tokens_per_s"].items():
        print(f"  {name:20s} {rate:12,.0f} tokens/s   loss after {len(result['loss_curves'][name])} steps "
              f"{result['final_loss'][name]:.4f}   warm-up {result['warmup_seconds'][name]:.1f} s")
    for mode, ratio in result["ratio_fnlm_over_reference"].items():
        gap = result["max_loss_gap_fnlm_vs_reference"][mode]
        print(f"  {mode}: fnlm / reference = {ratio:.3f}x tokens/s   (max loss gap {gap:.2e})")
    if result["max_loss_gap_fnlm_eager_vs_compiled"] is not None:
        print(f"  fnlm eager vs compiled: max loss gap {result['max_loss_gap_fnlm_eager_vs_compiled']:.2e}")


if __name__ == "__main__":
    main()
