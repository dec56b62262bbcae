"""Tokens per second of cached vs uncached decoding, measured in the same run.

    uv run python scripts/bench_generate.py                  # TinyStories-size model, CPU
    uv run python scripts/bench_generate.py --device cuda --new-tokens 512

The model is randomly initialised (speed does not depend on the weights); decoding is greedy so
that both paths do identical work, and the script checks that they produce the same tokens.
Both runs cross the context limit the same way when prompt + new tokens exceed it (see
fnlm.decode.window_start). Each path gets a short warm-up run first; with --repeats > 1 the
paths alternate and the best time of each is kept.
"""

from __future__ import annotations

import argparse
import time

import torch

from fnlm.config import ModelConfig
from fnlm.decode import generate
from fnlm.model import init_params, num_params


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--d-ff", type=int, default=1344)
    parser.add_argument("--prompt-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def timed_generate(params, cfg, prompts, new_tokens, *, use_cache, device) -> tuple[float, list[list[int]]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    completions = generate(params, cfg, prompts, max_new_tokens=new_tokens, temperature=0, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, completions


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(
        vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
        num_layers=args.num_layers, num_heads=args.num_heads, d_ff=args.d_ff,
    )
    params = init_params(cfg, seed=args.seed, device=device, dtype=getattr(torch, args.dtype))
    prompt_generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_tokens), generator=prompt_generator).tolist()
    print(f"model {num_params(params) / 1e6:.1f}M params {cfg}")
    print(f"device {device} {args.dtype} threads {torch.get_num_threads()} torch {torch.__version__}")
    print(f"batch {args.batch} prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy")

    for use_cache in (True, False):  # warm-up: first calls of each op, allocator
        timed_generate(params, cfg, prompts, 8, use_cache=use_cache, device=device)
    best = {True: float("inf"), False: float("inf")}
    outputs = {}
    for _ in range(args.repeats):
        for use_cache in (True, False):
            seconds, outputs[use_cache] = timed_generate(
                params, cfg, prompts, args.new_tokens, use_cache=use_cache, device=device
            )
            best[use_cache] = min(best[use_cache], seconds)

    tokens = sum(len(completion) for completion in outputs[True])
    for use_cache, name in ((True, "cached"), (False, "uncached")):
        print(f"{name:>9}: {tokens / best[use_cache]:9.1f} tokens/s  ({best[use_cache]:.2f} s for {tokens} tokens)")
    print(f"    ratio: cached is {best[False] / best[True]:.1f}x faster than uncached")
    print(f"same tokens: {'yes' if outputs[True] == outputs[False] else 'NO (float near-ties?)'}")


if __name__ == "__main__":
    main()
