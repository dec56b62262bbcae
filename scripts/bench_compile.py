"""Compile warm-up: fnlm's compiled training step against the reference's, in the same run.

    uv run python scripts/bench_compile.py --layers 4 12
    uv run python scripts/bench_compile.py --layers 4 12 --label after --out docs/results/compile_warmup_cpu.json

The warm-up is the first call of each side's compiled step: dynamo's graph capture plus
inductor's code generation and the first run. The capture cost grows with the number of
layers (leaves), not with width, so a tiny-width model (d_model 64, context 64, vocab 512)
shows it on the CPU in minutes. The two sides then alternate --steps timed steps (steady state:
each side's median). Inductor's on-disk and in-memory caches are off (set before torch loads),
so neither side reuses the other's kernels, and a trivial function is compiled first so that
neither side pays the compiler's one-time start-up. Each side's warm-up is also split by the
frames dynamo compiled (fnlm: the gradient, then the update; the reference: its loss, whose
backward AOT compiles lazily outside that timer).

fnlm:      fnlm.train.make_train_step(compile=True): grad_and_value + adamw's fused step (clip,
           Adam, decay, lr and the add), the gradient and the update each torch.compile'd
           (bench_train.py's Fnlm). On CUDA the update is one Triton kernel, uncompiled.
reference: tests/reference.py's ReferenceLM with torch.compile(model.loss), loss.backward(),
           clip_grad_norm_ and torch.optim.AdamW(fused=True) eagerly (bench_train.py's Reference).

--out merges this run into the JSON file under --label (e.g. "before" and "after" a change).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # before torch loads: every compile from scratch

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import Fnlm, Reference, start_compiler  # noqa: E402
from benchlib import command_line, device_name  # noqa: E402
from fnlm.config import ModelConfig  # noqa: E402
from fnlm.files import write_json  # noqa: E402
from fnlm.model import init_params  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12], help="num_layers to measure, in turn")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--context-length", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=172)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steady-state steps per side")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="run", help="the key of this run in --out")
    parser.add_argument("--out", type=Path, help="merge the results into this JSON file under --label")
    return parser.parse_args()


def compiled_frames_s() -> list[float]:
    """Seconds dynamo spent on each frame it compiled so far, in order: capture, AOT and inductor
    (torch's own timer; a backward that AOT compiles lazily at its first call is not in it)."""
    return list(torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner", []))


def warm_up(cls, cfg: ModelConfig, params, batch) -> tuple:
    """A side, its first (compiling) step's seconds, its loss and the seconds of each frame compiled."""
    side = cls(cfg, params, None, torch.device("cpu"), True, None)
    frames_before = len(compiled_frames_s())
    start = time.perf_counter()
    loss = float(side.step(*batch))
    return side, time.perf_counter() - start, loss, compiled_frames_s()[frames_before:]


def timed_steps(sides: dict, batches, steps: int) -> dict:
    """Each side's step seconds and losses over `steps` steps, the sides alternating step by step
    (A B A B ...) so that load from other processes hits both alike."""
    times, losses = {name: [] for name in sides}, {name: [] for name in sides}
    for i in range(1, steps + 1):
        for name, side in sides.items():
            start = time.perf_counter()
            losses[name].append(float(side.step(*batches[i % len(batches)])))
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], losses[name]) for name in sides}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start_compiler(torch.device("cpu"))  # paid by neither side
    generator = torch.Generator().manual_seed(args.seed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()  # the code measured: HEAD at the start
    results = {}
    for layers in args.layers:
        cfg = ModelConfig(vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
                          num_layers=layers, num_heads=args.num_heads, d_ff=args.d_ff)
        params = init_params(cfg, seed=args.seed)
        windows = [torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.context_length + 1), generator=generator)
                   for _ in range(4)]
        batches = [(w[:, :-1], w[:, 1:]) for w in windows]
        sides, first = {}, {}
        for name, cls in (("fnlm", Fnlm), ("reference", Reference)):
            sides[name], warmup, loss, frames = warm_up(cls, cfg, params, batches[0])
            first[name] = {"warmup_s": warmup, "first_loss": loss, "compiled_frames_s": frames}
        timed = timed_steps(sides, batches, args.steps)
        fnlm, reference = (
            first[name] | {"step_s": statistics.median(timed[name][0]), "losses": [first[name]["first_loss"]] + timed[name][1]}
            for name in sides
        )
        row = {
            "config": cfg.to_dict(),
            "fnlm": fnlm,
            "reference": reference,
            "warmup_ratio_fnlm_over_reference": fnlm["warmup_s"] / reference["warmup_s"],
            "step_time_ratio_fnlm_over_reference": fnlm["step_s"] / reference["step_s"],
            "max_loss_gap": max(abs(a - b) for a, b in zip(fnlm["losses"], reference["losses"])),
        }
        results[str(layers)] = row
        print(f"{layers:2d} layers: warm-up fnlm {fnlm['warmup_s']:6.1f} s, reference {reference['warmup_s']:6.1f} s, "
              f"ratio {row['warmup_ratio_fnlm_over_reference']:.2f}x | step fnlm {1e3 * fnlm['step_s']:.1f} ms, "
              f"reference {1e3 * reference['step_s']:.1f} ms, ratio {row['step_time_ratio_fnlm_over_reference']:.2f}x "
              f"| loss after {args.steps + 1} steps fnlm {fnlm['losses'][-1]:.4f}, reference "
              f"{reference['losses'][-1]:.4f} (max gap {row['max_loss_gap']:.1e})", flush=True)
        for name, side in (("fnlm", fnlm), ("reference", reference)):
            print(f"          {name}'s compiled frames: {', '.join(f'{s:.1f}' for s in side['compiled_frames_s'])} s",
                  flush=True)
    run = {
        "command": command_line(),
        "commit": commit,
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "warmup": "first call of the compiled step (dynamo capture + inductor + one step), caches off",
        "step": f"median of {args.steps} steps after the warm-up, the sides alternating step by step",
        "layers": results,
    }
    if args.out:
        merged = json.loads(args.out.read_text()) if args.out.exists() else {}
        merged[args.label] = run
        write_json(args.out, merged)


if __name__ == "__main__":
    main()
