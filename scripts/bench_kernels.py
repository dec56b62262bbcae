"""The GPU-only kernels against their peers, one device, no training: Triton causal attention
(fnlm.flash_attention, at several tilings) vs PyTorch's SDPA, and the fused LM head +
cross-entropy (fnlm.fused_ce) vs the plain path (bf16 logits, then fnlm.nn.cross_entropy).

    python3 scripts/bench_kernels.py --out docs/results/bench_kernels_h200.json   # a CUDA machine

Attention, at issue 12's (B, H, T, D) shapes: forward and forward + backward milliseconds, timed
by replaying a CUDA graph (triton.testing.do_bench_cudagraph), so that the Python launch cost,
which a compiled training step hides, does not count; TFLOP/s count the causal half (backward as
2.5 forwards). Each tiling in --forward / --backward is timed with the other kernel at its
TUNING default ("fnlm default" is both at theirs); the fastest per shape, the default included,
is reported. Then each kernel's largest error against the float32 definition
(fnlm.nn.scaled_dot_product_attention) on two batch entries, beside SDPA's. Fused CE: milliseconds of grad_and_value, extra peak memory, warm-up, and the relative gradient
error against plain eager.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from benchlib import (  # noqa: E402
    command_line, device_name, memory_allocated, peak_memory, reset_peak_memory,
)
from fnlm import flash_attention  # noqa: E402
from fnlm import nn as fnn  # noqa: E402
from fnlm.files import write_json  # noqa: E402
from fnlm.fused_ce import linear_cross_entropy  # noqa: E402

ATTENTION_SHAPES = [(32, 12, 1024, 64), (128, 16, 256, 32), (64, 12, 512, 64)]  # gpt2-small, tinystories, leaderboard
LM_HEAD_SHAPES = [(32768, 768, 50257), (32768, 768, 32000), (32768, 512, 10000)]  # (tokens, D, V)
FORWARD_TILINGS = ["64,64,4,3", "128,64,4,3", "128,64,8,3", "128,128,8,3", "128,32,4,3", "64,32,4,4"]
BACKWARD_TILINGS = ["32,128,4,3", "32,128,8,3", "64,128,8,3", "32,64,4,3", "16,128,4,3", "64,64,4,3", "16,64,4,3"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["attention", "lm-head", "all"], default="all")
    parser.add_argument("--forward", nargs="*", default=FORWARD_TILINGS, help="BLOCK_M,BLOCK_N,warps,stages tilings")
    parser.add_argument("--backward", nargs="*", default=BACKWARD_TILINGS, help="SMALL,BIG,warps,stages tilings")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def bench(fn) -> float:
    """Milliseconds per call of fn, replayed from a CUDA graph."""
    fn()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100)


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def attention_inputs(shape, seed=0):
    """q, k, v as the model makes them ((B, T, H, D) heads viewed as (B, H, T, D)), and dO."""
    batch, heads, seq_len, head_dim = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, grad_out = (torch.randn(batch, seq_len, heads, head_dim, device="cuda", generator=g,
                                     dtype=torch.bfloat16).transpose(1, 2) for _ in range(4))
    return q, k, v, grad_out.contiguous()


def time_attention(attend, q, k, v, grad_out) -> dict:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def forward():
        with torch.no_grad():
            attend(q, k, v)

    def forward_backward():
        torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out)

    forward_ms, both_ms = bench(forward), bench(forward_backward)
    return dict(forward_ms=forward_ms, forward_backward_ms=both_ms, backward_ms=both_ms - forward_ms)


def with_tiling(kernel: str, head_dim: int, tiling: tuple[int, ...]):
    """Set one TUNING entry; returns a function that restores it."""
    key = flash_attention.tuning_key(head_dim)
    old = flash_attention.TUNING[kernel][key]
    flash_attention.TUNING[kernel][key] = tiling
    return lambda: flash_attention.TUNING[kernel].__setitem__(key, old)


def attention(args) -> dict:
    results = {}
    for shape in ATTENTION_SHAPES:
        batch, heads, seq_len, head_dim = shape
        inputs = attention_inputs(shape)
        causal_flops = 4 * batch * heads * seq_len * seq_len * head_dim / 2
        timings = {"sdpa": time_attention(sdpa, *inputs), "fnlm default": time_attention(flash_attention.causal_attention, *inputs)}
        for kernel, tilings in (("forward", args.forward), ("backward", args.backward)):
            for text in tilings:
                tiling = tuple(int(part) for part in text.split(","))
                restore = with_tiling(kernel, head_dim, tiling)
                try:
                    timings[f"fnlm {kernel} {text}"] = time_attention(flash_attention.causal_attention, *inputs)
                except Exception as error:  # a tiling that does not fit the shared memory, say
                    timings[f"fnlm {kernel} {text}"] = {"error": repr(error)[:300]}
                restore()
        for timing in timings.values():
            if "error" not in timing:
                timing["forward_tflops"] = causal_flops / timing["forward_ms"] / 1e9
                timing["backward_tflops"] = 2.5 * causal_flops / timing["backward_ms"] / 1e9
        best = {kernel: min((name for name, t in timings.items()
                             if name == "fnlm default" or name.startswith(f"fnlm {kernel} ") and "error" not in t),
                            key=lambda name: timings[name][f"{kernel}_ms"]) for kernel in ("forward", "backward")}
        sdpa_time = timings["sdpa"]
        summary = {
            "best_forward": best["forward"], "best_backward": best["backward"],
            "forward_ms_fnlm_over_sdpa": timings[best["forward"]]["forward_ms"] / sdpa_time["forward_ms"],
            "backward_ms_fnlm_over_sdpa": timings[best["backward"]]["backward_ms"] / sdpa_time["backward_ms"],
        }
        results[str(shape)] = dict(timings=timings, summary=summary, error_vs_float32=attention_errors(inputs))
        print(shape, json.dumps(summary), flush=True)
        for name, timing in timings.items():
            print(f"  {name:28s} {json.dumps({k: round(v, 4) for k, v in timing.items()} if 'error' not in timing else timing)}")
    return results


def attention_errors(inputs) -> dict:
    """Largest |error| of out, dq, dk, dv against the float32 definition, on two batch entries."""
    q, k, v, grad_out = (t[:2].detach() for t in inputs)
    seq_len = q.shape[2]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    exact = [t.float().requires_grad_() for t in (q, k, v)]
    want = fnn.scaled_dot_product_attention(*exact, causal)
    want_grads = torch.autograd.grad(want, exact, grad_out.float())
    errors = {}
    for name, attend in (("sdpa", sdpa), ("fnlm", flash_attention.causal_attention)):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*qkv)
        grads = torch.autograd.grad(out, qkv, grad_out)
        errors[name] = {"out": (out.float() - want).abs().max().item()} | {
            f"d{n}": (got.float() - w).abs().max().item() for n, got, w in zip("qkv", grads, want_grads)}
    return errors


def lm_head() -> dict:
    results, cuda = {}, torch.device("cuda")  # the current CUDA device, as the tensors' "cuda" below
    for tokens, d_model, vocab in LM_HEAD_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(tokens, d_model, device="cuda", generator=g)
        w = torch.randn(vocab, d_model, device="cuda", generator=g) * 0.02
        y = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)

        def plain(w, x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = x @ w.T
            return fnn.cross_entropy(logits, y)

        def fused(w, x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return linear_cross_entropy(w, x, y)

        rows, reference = {}, None
        for name, fn in (("plain", plain), ("fused", fused)):
            for mode in ("eager", "compiled"):
                step = torch.func.grad_and_value(fn, argnums=(0, 1))
                step = torch.compile(step) if mode == "compiled" else step
                start = time.perf_counter()
                (gw, gx), loss = step(w, x)
                torch.cuda.synchronize()
                warmup = time.perf_counter() - start
                reset_peak_memory(cuda)
                base = memory_allocated(cuda)
                ms = triton.testing.do_bench(lambda: step(w, x), warmup=10, rep=40)
                reference = reference or (loss, gw, gx)
                rows[f"{name} {mode}"] = dict(
                    ms=ms, peak_extra_gib=(peak_memory(cuda) - base) / 2**30, warmup_s=warmup,
                    loss=loss.item(), rel_err_vs_plain_eager=dict(
                        loss=(loss - reference[0]).abs().item(),
                        gw=((gw - reference[1]).abs().max() / reference[1].abs().max()).item(),
                        gx=((gx - reference[2]).abs().max() / reference[2].abs().max()).item()))
                print((tokens, d_model, vocab), name, mode, rows[f"{name} {mode}"], flush=True)
        results[str((tokens, d_model, vocab))] = rows
    return results


def main() -> None:
    args = parse_args()
    result = {"command": command_line(), "device": device_name(torch.device("cuda")),
              "torch": torch.__version__, "triton": triton.__version__,
              "tuning": {kernel: {str(k): v for k, v in table.items()} for kernel, table in flash_attention.TUNING.items()}}
    if args.part in ("attention", "all"):
        result["attention"] = attention(args)
    if args.part in ("lm-head", "all"):
        result["lm_head"] = lm_head()
    if args.out:
        write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
