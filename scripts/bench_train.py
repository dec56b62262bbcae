"""Training-step throughput: fnlm's functional step against a conventional PyTorch step.

    uv run python scripts/bench_train.py                                   # CPU, small config, eager
    uv run python scripts/bench_train.py --compile both --steps 10
    python scripts/bench_train.py --device cuda --config gpt2-small --autocast bfloat16 \\
        --compile compiled --out docs/results/bench_train_h200_gpt2-small.json

Presets (--config) with their batch sizes: tinystories (V10000 T256 d512 L4, batch 128),
leaderboard (V32000 T512 d768 L12, batch 64), gpt2-small (V50257 T1024 d768 L12, batch 32), and
small for the CPU. Beside tokens/s: the model FLOP utilisation (MFU), 6 x matmul parameters +
12 L T d attention FLOPs per token (PaLM's count, which includes the masked half of causal
attention) against the device's dense bf16 peak (989 TFLOP/s on an H100/H200 SXM; --peak-tflops
elsewhere), each side's peak GPU memory (the most its steps allocated, other variants' resident
state excluded), and each side's warm-up: its first --warmup steps, compilation included, timed
in a fresh process of this script from empty compile caches, after the compiler's one-time
start-up; with --warmup-runs N, the median of N such processes per side, the sides alternating
(one process moves a side's warm-up by about a fifth). (Timed in this process, the side that
compiles first pays that start-up and the other reuses every kernel the two compiles share:
`warmup_seconds_in_process` in the JSON.) The JSON also keeps every round's seconds and the
host's load average before and after the rounds.

fnlm:      params pytree -> torch.func.grad_and_value(loss) -> adamw (clip, Adam, decay, lr)
           -> the new params, all one pure function (compiled: the gradient torch.compile'd;
           on CUDA the update is one Triton kernel over all leaves, uncompiled).
reference: tests/reference.py's ReferenceLM (nn.Modules, F.scaled_dot_product_attention),
           loss.backward(), clip_grad_norm_, torch.optim.AdamW(fused=True); compiled means
           torch.compile(model), the usual way.

Both start from the same weights, see the same batches in the same order with the same
hyperparameters (constant lr, clipping at 1.0), and keep float32 weights and optimizer state
(autocast only around the forward). Timed rounds alternate between the variants (A B A B ...)
so that load from other processes hits all alike; tokens/s is the median over rounds. The losses
after the same number of steps are reported next to every speed figure: fnlm eager and fnlm
compiled must agree closely, and both with the reference. The first step's gap (the same weights,
one forward) measures the two sides' numerics alone; later steps amplify any rounding difference
as training does (at the gpt2-small shape, constant lr 1e-3 on 8 cycled random batches, 5e-6 at
step 1 grew to 5e-2 by step 53 between the reference's own eager and compiled runs), so the
reference's eager-vs-compiled gap is the noise floor to read fnlm's gap against.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accounting import forward_flops  # noqa: E402
from benchlib import (  # noqa: E402
    command_line, device_name, memory_allocated, peak_memory, reset_peak_memory, synchronize,
)
from fnlm.config import AUTOCAST_DTYPES, ModelConfig  # noqa: E402
from fnlm.data import load_tokens, resolve_device  # noqa: E402
from fnlm.files import write_json  # noqa: E402
from fnlm.model import init_params, num_params  # noqa: E402
from fnlm.optim import adamw  # noqa: E402
from fnlm.run.process import keep_freed_memory  # noqa: E402
from fnlm.train import autocast, make_train_step, parse_autocast  # noqa: E402
from fnlm.tree import flatten, tree_leaves  # noqa: E402
from tests.reference import ReferenceLM  # noqa: E402

CONFIGS = {  # issue 12's shapes: the handout's TinyStories model, the leaderboard's, GPT-2 small
    "tinystories": dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344),
    "leaderboard": dict(vocab_size=32_000, context_length=512, d_model=768, num_layers=12, num_heads=12, d_ff=2048),
    "gpt2-small": dict(vocab_size=50_257, context_length=1024, d_model=768, num_layers=12, num_heads=12, d_ff=2048),
    "small": dict(vocab_size=10_000, context_length=64, d_model=128, num_layers=2, num_heads=4, d_ff=344),
}
BATCH_SIZES = {"tinystories": 128, "leaderboard": 64, "gpt2-small": 32, "small": 16}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM datasheets; matched in the device name
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    for name in CONFIGS["small"]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the config's {name}")
    parser.add_argument("--batch-size", type=int, help="default: the preset's (see above)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: by name)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and variant")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="steps per variant before the timed rounds (compilation): the warm-up")
    parser.add_argument("--warmup-runs", type=int, default=1,
                        help="fresh processes per side whose warm-ups' median is reported (sides alternating)")
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
    parser.add_argument("--warmup-of", help=argparse.SUPPRESS)  # internal: time this variant's warm-up alone
    args = parser.parse_args()
    if args.warmup_runs < 1:
        parser.error(f"--warmup-runs must be at least 1, got {args.warmup_runs}")
    return args


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

    def resident_bytes(self) -> int:
        return tree_bytes(tree_leaves((self.params, self.opt_state)))


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

    def resident_bytes(self) -> int:
        params = list(self.model.parameters())
        state = [t for s in self.optimizer.state.values() for t in s.values()]
        return tree_bytes(params + [p.grad for p in params] + state)


def main() -> None:
    args = parse_args()
    # The warm-up times a cold compile for both sides: fresh inductor and Triton caches, not ones
    # that an earlier run on this machine filled (which made one side's warm-up 2.6 s).
    cold_cache = tempfile.TemporaryDirectory(prefix="bench_train_cache_")  # removed when main returns
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold_cache.name
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cold_cache.name, "triton")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    kept_freed_memory = device.type == "cpu" and args.keep_freed_memory and keep_freed_memory()
    dims = CONFIGS[args.config] | {k: v for k, v in vars(args).items() if k in CONFIGS["small"] and v is not None}
    args.batch_size = args.batch_size or BATCH_SIZES[args.config]
    cfg = ModelConfig(**dims)
    amp = parse_autocast(args.autocast)
    batches = make_batches(args, cfg, device)
    params = init_params(cfg, seed=args.seed, device=device)  # float32 master weights for everyone

    compiled = {"none": [False], "compiled": [True], "both": [False, True]}[args.compile]
    sides = {f"{name} {'compiled' if c else 'eager'}": (cls, c)
             for c in compiled for name, cls in (("fnlm", Fnlm), ("reference", Reference))}
    if args.warmup_of:  # a child process of fresh_warmup_seconds
        cls, is_compiled = sides[args.warmup_of]
        start_compiler(device)
        variant = cls(cfg, params, amp, device, is_compiled, args.compile_mode)
        start = time.perf_counter()
        for i in range(args.warmup):
            variant.step(*batches[i % len(batches)])
        synchronize(device)
        print(time.perf_counter() - start)
        return
    warmup_runs = {name: [] for name in sides}
    for _ in range(args.warmup_runs):
        for name in sides:
            warmup_runs[name].append(fresh_warmup_seconds(name))
    warmup_seconds = {name: statistics.median(runs) for name, runs in warmup_runs.items()}
    variants = {name: cls(cfg, params, amp, device, c, args.compile_mode) for name, (cls, c) in sides.items()}
    losses = {name: [] for name in variants}
    cursor = {name: 0 for name in variants}
    peak_bytes = {name: 0 for name in variants}

    def run(name: str, steps: int) -> float:
        variant = variants[name]
        synchronize(device)
        resident = memory_allocated(device)
        reset_peak_memory(device)
        start = time.perf_counter()
        for _ in range(steps):
            losses[name].append(variant.step(*batches[cursor[name] % len(batches)]))
            cursor[name] += 1
        synchronize(device)
        seconds = time.perf_counter() - start
        # this variant's peak: what its steps added on top of everything resident, plus its own resident state
        peak_bytes[name] = max(peak_bytes[name], peak_memory(device) - resident + variant.resident_bytes())
        return seconds

    in_process_warmup_seconds = {name: run(name, args.warmup) for name in variants}
    seconds = {name: [] for name in variants}
    load_before = host_load()
    for _ in range(args.rounds):
        for name in variants:
            seconds[name].append(run(name, args.steps))
    load_after = host_load()

    tokens_per_step = args.batch_size * cfg.context_length
    tokens_per_s = {name: tokens_per_step * args.steps / statistics.median(ts) for name, ts in seconds.items()}
    flops = flops_per_token(cfg)
    peak_tflops = args.peak_tflops or next(
        (tflops for name, tflops in PEAK_BF16_TFLOPS.items() if name in device_name(device)), None)
    mfu = {name: rate * flops / (peak_tflops * 1e12) for name, rate in tokens_per_s.items()} if peak_tflops else None
    loss_curves = {name: [float(loss) for loss in values] for name, values in losses.items()}
    ratios = {
        mode: tokens_per_s[f"fnlm {mode}"] / tokens_per_s[f"reference {mode}"]
        for mode in ("eager", "compiled") if f"fnlm {mode}" in variants
    }
    result = {
        "command": command_line(),
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
        "round_seconds": seconds,  # whether a slow median was one round or all of them
        # a step whose host time nears its GPU time (TinyStories' on an H200) slows when other processes load the CPU
        "host_load_average_1min": {"before_rounds": load_before, "after_rounds": load_after},
        "ratio_fnlm_over_reference": ratios,
        "flops_per_token": flops,
        "flops_formula": "6 x matmul parameters (blocks and LM head) + 12 x layers x context x d_model",
        "peak_bf16_tflops": peak_tflops,
        "mfu": mfu,
        "peak_memory_gib": {name: b / 2**30 for name, b in peak_bytes.items()} if device.type == "cuda" else None,
        "warmup_steps": args.warmup,
        "warmup_seconds": warmup_seconds,
        "warmup": "the first warmup_steps of each side in a fresh process, from empty caches, after the compiler's "
                  "start-up: the median over warmup_seconds_runs",
        "warmup_seconds_runs": warmup_runs,
        "warmup_seconds_in_process": in_process_warmup_seconds,
        "final_loss": {name: curve[-1] for name, curve in loss_curves.items()},
        "loss_curves": loss_curves,
        "max_loss_gap_fnlm_eager_vs_compiled": max_gap(loss_curves, "fnlm eager", "fnlm compiled"),
        "max_loss_gap_reference_eager_vs_compiled": max_gap(loss_curves, "reference eager", "reference compiled"),
        "max_loss_gap_fnlm_vs_reference": {
            mode: max_gap(loss_curves, f"fnlm {mode}", f"reference {mode}") for mode in ratios
        },
        "first_step_loss_gap_fnlm_vs_reference": {
            mode: max_gap(loss_curves, f"fnlm {mode}", f"reference {mode}", steps=1) for mode in ratios
        },
    }
    report(result)
    if args.out:
        write_json(args.out, result)


def fresh_warmup_seconds(name: str) -> float:
    """Variant `name`'s warm-up, timed in a fresh process of this script (same arguments): its
    compile from empty caches, with no kernel of another variant's compile to reuse."""
    print(f"  timing {name}'s warm-up in a fresh process ...", flush=True)
    command = [sys.executable, __file__, *sys.argv[1:], "--warmup-of", name]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"timing {name}'s warm-up failed:\n{child.stderr[-3000:]}")
    return float(child.stdout.split()[-1])


def start_compiler(device: torch.device) -> None:
    """The compiler's and the device's one-time start-up (inductor's worker processes, Triton, the
    first matmul), which neither side's warm-up should pay."""
    ones = torch.ones(64, 64, device=device)
    torch.compile(lambda x: (x @ x).sum())(ones)
    synchronize(device)


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


def max_gap(curves: dict[str, list[float]], a: str, b: str, steps: int | None = None) -> float | None:
    """The largest |loss a - loss b| over the first `steps` steps (all by default)."""
    if a not in curves or b not in curves:
        return None
    return max(abs(x - y) for x, y in list(zip(curves[a], curves[b]))[:steps])


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token: 3 x the forward's matrix multiplies (the backward is twice the
    forward), which is 6 x the matmul parameters + 12 L T d for attention (PaLM's count)."""
    return 3 * sum(forward_flops(cfg).values()) // cfg.context_length  # forward_flops is per sequence


def host_load() -> float | None:
    """The host's 1-minute load average, where the OS reports one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def tree_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def report(result: dict) -> None:
    cfg = result["config"]
    print(f"{result['device']}, torch {result['torch']}, d_model {cfg['d_model']} x {cfg['num_layers']} layers, "
          f"vocab {cfg['vocab_size']}, context {cfg['context_length']}, batch {result['batch_size']}, "
          f"autocast {result['autocast']}; median of {result['rounds']} rounds x {result['steps_per_round']} steps")
    if result["mfu"]:
        print(f"  MFU: {result['flops_per_token']:,} FLOPs/token ({result['flops_formula']}) "
              f"against {result['peak_bf16_tflops']:.0f} TFLOP/s dense bf16")
    for name, rate in result["tokens_per_s"].items():
        mfu = f"   MFU {100 * result['mfu'][name]:4.1f}%" if result["mfu"] else ""
        memory = f"   peak {result['peak_memory_gib'][name]:5.1f} GiB" if result["peak_memory_gib"] else ""
        print(f"  {name:20s} {rate:12,.0f} tokens/s{mfu}   loss after {len(result['loss_curves'][name])} steps "
              f"{result['final_loss'][name]:.4f}   warm-up {result['warmup_seconds'][name]:.1f} s{memory}")
    load = result["host_load_average_1min"]
    if load["before_rounds"] is not None:
        print(f"  host load average (1 min), before / after the timed rounds: {load['before_rounds']} / {load['after_rounds']}"
              f" on {os.cpu_count()} CPUs")
    for mode, ratio in result["ratio_fnlm_over_reference"].items():
        gap, first = result["max_loss_gap_fnlm_vs_reference"][mode], result["first_step_loss_gap_fnlm_vs_reference"][mode]
        print(f"  {mode}: fnlm / reference = {ratio:.3f}x tokens/s   (loss gap: max {gap:.2e}, first step {first:.2e})")
    for side in ("fnlm", "reference"):
        gap = result[f"max_loss_gap_{side}_eager_vs_compiled"]
        if gap is not None:
            print(f"  {side} eager vs compiled: max loss gap {gap:.2e}")


if __name__ == "__main__":
    main()
