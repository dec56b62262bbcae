"""Forward + backward of fnlm's pure LM vs the same model as ordinary nn.Modules (tests/reference.py).

    uv run python scripts/bench_model.py                 # TinyStories size, batch 8, CPU
    uv run python scripts/bench_model.py --device cuda --dtype bfloat16

Both sides start from the same weights and see the same batch; timings alternate between the
two (A B A B ...) so that load from other processes hits both alike, and the ratio of medians
is printed with the losses, which must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fnlm.config import ModelConfig  # noqa: E402
from fnlm.model import init_params, transformer_lm  # noqa: E402
from fnlm.nn import cross_entropy  # noqa: E402
from fnlm.tree import flatten  # noqa: E402
from tests.reference import ReferenceLM  # noqa: E402

TINYSTORIES = dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig(**TINYSTORIES)
    device = torch.device(args.device)
    autocast = args.dtype == "bfloat16"
    params = init_params(cfg, seed=0, device=device)
    reference = ReferenceLM(cfg).to(device)
    reference.load_state_dict(flatten(params))
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.context_length), generator=gen).to(device) for _ in range(2))

    def loss_fn(p):
        return cross_entropy(transformer_lm(p, x, cfg), y)

    fnlm_step = torch.func.grad_and_value(loss_fn)

    def run_fnlm() -> float:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            _, loss = fnlm_step(params)
        return loss.item()

    def run_reference() -> float:
        reference.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = reference.loss(x, y)
        loss.backward()
        return loss.item()

    sides = {"fnlm": run_fnlm, "reference": run_reference}
    times: dict[str, list[float]] = {name: [] for name in sides}
    losses = {name: fn() for name, fn in sides.items()}  # warm-up
    for _ in range(args.repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    tokens = args.batch_size * cfg.context_length
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "config": cfg.to_dict(),
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "tokens_per_s": {name: tokens / t for name, t in medians.items()},
        "time_ratio_fnlm_over_reference": medians["fnlm"] / medians["reference"],
        "loss": losses,
    }
    print(f"forward+backward, {tokens} tokens/step, {result['device']}, {args.dtype}, median of {args.repeats}")
    for name in sides:
        print(f"  {name:9s} {tokens / medians[name]:10.0f} tokens/s   loss {losses[name]:.5f}")
    print(f"  time ratio fnlm / reference = {result['time_ratio_fnlm_over_reference']:.3f} (<= 1.1 is the target)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
