"""Where a training step's GPU time goes: fnlm's compiled step and the compiled reference step
of scripts/bench_train.py, side by side, by kernel family, from torch.profiler.

    python3 scripts/profile_step.py --config gpt2-small --out docs/results/profile_step_h200_gpt2-small.json

Families, by kernel name: matmul (cuBLAS/CUTLASS GEMMs), attention (fnlm's Triton kernels,
SDPA's flash/cuDNN/memory-efficient ones), optimizer (torch's fused AdamW and multi-tensor
kernels, fnlm's AdamW kernel), fused pointwise (inductor's triton_* kernels: norms, RoPE,
SwiGLU; and fnlm's cross-entropy kernel), and other. Milliseconds are per step (the mean over
--steps profiled steps, after --warmup steps that compile), beside each side's loss at the last
profiled step.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import BATCH_SIZES, CONFIGS, Fnlm, Reference, make_batches  # noqa: E402
from benchlib import command_line, device_name  # noqa: E402
from fnlm.config import ModelConfig  # noqa: E402
from fnlm.files import write_json  # noqa: E402
from fnlm.model import init_params  # noqa: E402

FAMILIES = [  # first match wins; lower-case substrings of kernel names
    ("attention", ("flash", "fmha", "cudnn", "attention", "_forward_kernel", "_backward_kernel", "efficient")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "norm_kernel")),
    ("fused pointwise", ("triton_", "_cross_entropy_kernel")),
]


def family(name: str) -> str:
    lower = name.lower()
    return next((fam for fam, keys in FAMILIES if any(key in lower for key in keys)), "other")


def profile_side(side, batches, steps: int, top: int) -> dict:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            loss = side.step(*batches[i % len(batches)])
        torch.cuda.synchronize()
    kernels = collections.Counter()
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            kernels[event.key] += event.device_time_total / 1e3 / steps  # ms per step
    families = collections.Counter()
    for name, ms in kernels.items():
        families[family(name)] += ms
    return {"ms_per_step": sum(kernels.values()), "families_ms": dict(families.most_common()),
            "top_kernels_ms": {name[:120]: ms for name, ms in kernels.most_common(top)}, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="gpt2-small")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=20, help="how many kernels to list per side")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg = ModelConfig(**CONFIGS[args.config])
    args.batch_size, args.data, args.batches, args.seed = BATCH_SIZES[args.config], None, 8, 0
    batches = make_batches(args, cfg, device)
    params = init_params(cfg, device=device)
    result = {"command": command_line(), "device": device_name(device),
              "torch": torch.__version__, "config": cfg.to_dict(), "batch_size": args.batch_size}
    for name, cls in (("fnlm compiled", Fnlm), ("reference compiled", Reference)):
        side = cls(cfg, params, torch.bfloat16, device, True, None)
        for i in range(args.warmup):
            side.step(*batches[i % len(batches)])
        result[name] = profile_side(side, batches, args.steps, args.top)
        del side
        torch.cuda.empty_cache()
    if args.out:  # first, so that a reader closing the printout's pipe early loses nothing
        write_json(args.out, result, indent=1)
    fnlm, ref = result["fnlm compiled"], result["reference compiled"]
    print(f"{result['device']}, {args.config}, batch {args.batch_size}: GPU ms per step (loss after "
          f"{args.warmup + args.steps} steps)")
    print(f"  {'family':18s} {'fnlm':>8s} {'reference':>10s}")
    for fam in [f for f, _ in FAMILIES] + ["other"]:
        print(f"  {fam:18s} {fnlm['families_ms'].get(fam, 0):8.2f} {ref['families_ms'].get(fam, 0):10.2f}")
    print(f"  {'total':18s} {fnlm['ms_per_step']:8.2f} {ref['ms_per_step']:10.2f}   "
          f"(loss {fnlm['loss']:.4f} / {ref['loss']:.4f})")
    for name in ("fnlm compiled", "reference compiled"):
        print(f"  top kernels, {name}:")
        for kernel, ms in result[name]["top_kernels_ms"].items():
            print(f"    {ms:7.3f}  {family(kernel):16s} {kernel}")


if __name__ == "__main__":
    main()
