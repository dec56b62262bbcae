"""Generation speed of fnlm's decoding paths, and of HF transformers on the same weights, in one run.

    uv run python scripts/bench_generate.py                        # TinyStories-size model, CPU
    python3 scripts/bench_generate.py --device cuda --dtype bfloat16 --batch 1 16 --peer hf \\
        --out docs/results/bench_generate_h200.json

fnlm's paths: the static KV cache (fnlm.static_cache; replayed as a CUDA graph on a GPU, and
compiled with --compile, the default on CUDA), the dynamic KV cache (the CPU default) and, with
--uncached (the default on CPU), the whole model on the window at every step. --peer hf adds HF
transformers' LlamaForCausalLM built from the same weights (fnlm.hf) with its dynamic cache and
with its static cache, which `generate` compiles itself on a GPU (torch.compile,
"reduce-overhead"). The model is randomly initialised (speed does not depend on the weights);
decoding is greedy so that every path does the same work and their tokens can be compared.

For each path: tokens/s over a whole call (prefill included; best of --repeats after a warm-up
call, which also compiles) and the time to the first token (the same call with one new token).
Tokens are compared with fnlm's dynamic cache; where two paths part, the script recomputes the
float32 logits at the first differing step and prints whether the two choices were a near-tie
that rounding decides. fnlm hops its window at the context length (fnlm.decode.window_start)
while HF's Llama reads on past it, so fnlm and HF are compared on the tokens before that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fnlm without installing it

from fnlm.config import ModelConfig  # noqa: E402
from fnlm.decode import generate, window_start  # noqa: E402
from fnlm.files import write_json  # noqa: E402
from fnlm.model import init_params, num_params, transformer_lm  # noqa: E402
from fnlm.tree import tree_map  # noqa: E402
from benchlib import device_name, synchronize  # noqa: E402

REFERENCE = "fnlm dynamic cache"


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
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (prompts decoded together)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per path and batch; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile fnlm's static-cache step (default: on CUDA)")
    parser.add_argument("--uncached", action=argparse.BooleanOptionalAction, default=None,
                        help="also time fnlm without a cache (default: on CPU; on a GPU at batch 1 only)")
    parser.add_argument("--peer", choices=["none", "hf"], default="none", help="hf: HF transformers on the same weights")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def fnlm_paths(device: torch.device, compile: bool, uncached: bool) -> dict[str, dict]:
    """Name -> generate() keyword arguments, the path to beat first."""
    paths = {}
    if compile:
        paths["fnlm static cache + compile"] = {"compile": True}
    paths["fnlm static cache" + (" (CUDA graph)" if device.type == "cuda" else "")] = {"static_cache": True}
    paths[REFERENCE] = {}
    if uncached:
        paths["fnlm uncached"] = {"use_cache": False}
    return paths


def timed(call, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - start, result


def measure(run, device: torch.device, repeats: int) -> dict:
    """run(max_new_tokens) -> completions (B lists of ids); run() decodes every new token. A warm-up
    call (compiles), the best of `repeats` timed calls, and the time of a one-token call (the time
    to the first token)."""
    first_call, _ = timed(run, device)
    best, completions = float("inf"), None
    for _ in range(repeats):
        seconds, completions = timed(run, device)
        best = min(best, seconds)
    ttft = min(timed(lambda: run(1), device)[0] for _ in range(2))
    tokens = sum(len(c) for c in completions)
    return {"tokens_per_s": tokens / best, "seconds": best, "tokens": tokens, "ttft_ms": 1e3 * ttft,
            "first_call_s": first_call, "completions": completions}


# -- HF transformers -------------------------------------------------------------------------------


def hf_model(params, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """LlamaForCausalLM with fnlm's weights (fnlm.hf permutes q/k rows for Llama's half-split RoPE)."""
    import transformers

    from fnlm.hf import hf_config, to_hf_state_dict

    config = transformers.LlamaConfig(**hf_config(cfg), pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.load_state_dict(to_hf_state_dict(params, cfg), strict=True)
    model.generation_config.pad_token_id = 0
    return model


def hf_paths(model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> dict[str, object]:
    """Name -> run(max_new_tokens) for HF's dynamic and static caches, greedy, exactly new_tokens."""
    input_ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed

    def runner(cache_implementation: str | None):
        @torch.no_grad()
        def run(count: int = new_tokens):
            out = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=count, min_new_tokens=count,
                do_sample=False, cache_implementation=cache_implementation,
            )
            return out[:, input_ids.shape[1]:].tolist()

        return run

    compiled = " + compile" if device.type == "cuda" else ""  # generate compiles a static cache's step on GPUs
    return {"HF dynamic cache": runner(None), f"HF static cache{compiled}": runner("static")}


# -- token agreement -------------------------------------------------------------------------------


def first_difference(a: list[list[int]], b: list[list[int]], limit: int) -> tuple[int, int] | None:
    """(row, step) of the first token where a and b part within each row's first `limit`, else None."""
    for row, (x, y) in enumerate(zip(a, b)):
        for step, (s, t) in enumerate(zip(x[:limit], y[:limit])):
            if s != t:
                return row, step
    return None


@torch.no_grad()
def diagnose(params, cfg: ModelConfig, prompt: list[int], common: list[int], choices: tuple[int, int]) -> dict:
    """At a step where two paths chose different tokens after prompt + common: the float32 logits
    of both choices, their gap, and how far the model's own dtype moves the logits there."""
    sequence = prompt + common
    window = sequence[window_start(len(sequence), cfg.context_length):]
    prefix = sequence[-cfg.context_length:]
    device = params["token_embeddings"]["weight"].device
    params32 = tree_map(lambda leaf: leaf.float(), params)
    window_logits = transformer_lm(params32, torch.tensor([window], device=device), cfg)[0]  # (T, V)
    exact = window_logits[-1]  # (V,)
    rounded = transformer_lm(params, torch.tensor([window], device=device), cfg)[0, -1].float()
    # The float32 top-2 gaps along the sequence so far: how close a typical choice is. While the
    # sequence fits the context, the prefix is the window: its logits are at hand.
    prefix_logits = window_logits if prefix == window else transformer_lm(
        params32, torch.tensor([prefix], device=device), cfg)[0]
    top2 = prefix_logits.topk(2, dim=-1).values  # (T, 2)
    a, b = choices
    return {
        "tokens": [a, b], "float32_logits": [exact[a].item(), exact[b].item()],
        "gap": abs(exact[a] - exact[b]).item(), "float32_top2_gap": (exact.topk(2).values.diff().abs()).item(),
        "median_top2_gap": (top2[:, 0] - top2[:, 1]).median().item(),
        "low_precision_error": (rounded - exact).abs().max().item(),
    }


def compare(name: str, ours, reference, params, cfg, prompts, limit: int) -> dict:
    where = first_difference(ours, reference, limit)
    if where is None:
        print(f"  same tokens as {REFERENCE}: yes ({name}, first {limit} of each row)")
        return {"same_tokens": True, "compared_per_row": limit}
    row, step = where
    agree = sum(x == y for o, r in zip(ours, reference) for x, y in zip(o[:limit], r[:limit]))
    total = sum(min(limit, len(o), len(r)) for o, r in zip(ours, reference))
    found = diagnose(params, cfg, prompts[row], reference[row][:step], (ours[row][step], reference[row][step]))
    near_tie = found["gap"] <= found["low_precision_error"]
    print(f"  same tokens as {REFERENCE}: NO ({name}): they part at row {row} step {step}: {found['tokens'][0]} vs "
          f"{found['tokens'][1]}; float32 logits {found['float32_logits'][0]:.5f} vs {found['float32_logits'][1]:.5f} "
          f"(gap {found['gap']:.5f}; median top-2 gap {found['median_top2_gap']:.3f}; {cfg_dtype(params)} moves "
          f"these logits by up to {found['low_precision_error']:.5f}) -> "
          + ("a near-tie that rounding decides" if near_tie else "NOT a near-tie: a bug?"))
    return {"same_tokens": False, "first_difference": {"row": row, "step": step, **found}, "near_tie": near_tie,
            "agreeing_tokens": agree, "compared_tokens": total}


def cfg_dtype(params) -> str:
    return str(params["token_embeddings"]["weight"].dtype).removeprefix("torch.")


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    compile = device.type == "cuda" if args.compile is None else args.compile
    cfg = ModelConfig(
        vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
        num_layers=args.num_layers, num_heads=args.num_heads, d_ff=args.d_ff,
    )
    params = init_params(cfg, seed=args.seed, device=device, dtype=dtype)
    print(f"model {num_params(params) / 1e6:.1f}M params {cfg}")
    print(f"device {device_name(device)} {args.dtype} torch {torch.__version__}")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, batches {args.batch}")
    report_errors: dict[str, str] = {}
    hf_model_ = None
    if args.peer == "hf":
        try:
            hf_model_ = hf_model(params, cfg, device, dtype)
        except Exception as error:  # a peer that cannot be built leaves fnlm's numbers standing
            traceback.print_exc()
            report_errors["HF model"] = repr(error)
    # fnlm and HF both read every token while prompt + new tokens fit the context.
    within_context = max(0, min(args.new_tokens, cfg.context_length - args.prompt_tokens))

    report = {
        "device": device_name(device), "dtype": args.dtype, "torch": torch.__version__, "config": cfg.to_dict(),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "compile": compile,
        "results": {}, "agreement": {}, "errors": report_errors,
    }
    if hf_model_ is not None:
        import transformers

        report["transformers"] = transformers.__version__
    for batch in args.batch:
        key = f"batch {batch}"
        generator = torch.Generator().manual_seed(args.seed + batch)
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_tokens), generator=generator).tolist()
        uncached = (device.type == "cpu" or batch == 1) if args.uncached is None else args.uncached
        runs = {}
        for name, kwargs in fnlm_paths(device, compile, uncached).items():
            runs[name] = lambda count=args.new_tokens, kwargs=kwargs: generate(
                params, cfg, prompts, max_new_tokens=count, temperature=0, **kwargs)
        if hf_model_ is not None:
            runs |= hf_paths(hf_model_, prompts, args.new_tokens, device)
        print(f"\n{key}:")
        results = report["results"][key] = {}
        for name, run in runs.items():
            try:
                results[name] = measure(run, device, args.repeats)
            except Exception as error:  # one broken path leaves the others' numbers standing
                traceback.print_exc()
                report_errors[f"{key}: {name}"] = repr(error)
                continue
            r = results[name]
            print(f"  {name:>32}: {r['tokens_per_s']:10.1f} tokens/s  time to first token {r['ttft_ms']:7.2f} ms  "
                  f"({r['seconds']:.3f} s for {r['tokens']} tokens; first call {r['first_call_s']:.1f} s)")
            write(args.out, report)
        reference = results[REFERENCE]["completions"]
        agreement = report["agreement"][key] = {}
        for name, r in results.items():
            if name != REFERENCE:
                limit = within_context if name.startswith("HF") else args.new_tokens
                agreement[name] = compare(name, r["completions"], reference, params, cfg, prompts, limit)
        fnlm_best = max((r["tokens_per_s"], name) for name, r in results.items() if name.startswith("fnlm"))
        for name, r in results.items():
            if name != fnlm_best[1]:
                print(f"  {fnlm_best[1]} is {fnlm_best[0] / r['tokens_per_s']:.2f}x {name}")
        hf = [(r["tokens_per_s"], name) for name, r in results.items() if name.startswith("HF")]
        if hf:
            report.setdefault("ratio_vs_hf", {})[key] = fnlm_best[0] / max(hf)[0]
            report.setdefault("hf_best", {})[key] = max(hf)[1]
        report.setdefault("fnlm_best", {})[key] = fnlm_best[1]
        write(args.out, report)
    if dtype != torch.float32:
        try:
            report["float32_check"] = float32_check(params, cfg, args, device)
        except Exception as error:
            traceback.print_exc()
            report_errors["float32 check"] = repr(error)
        write(args.out, report)
    if "ratio_vs_hf" in report:
        print(f"\nratio_vs_hf (fnlm's best over HF's best, tokens/s): {report['ratio_vs_hf']}")


@torch.no_grad()
def float32_check(params, cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> dict:
    """The same weights in float32 at batch 1: every fnlm path should choose the same tokens."""
    params32 = tree_map(lambda leaf: leaf.float(), params)
    prompts = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed + 1)).tolist()
    paths = fnlm_paths(device, compile=False, uncached=True)
    completions = {name: generate(params32, cfg, prompts, max_new_tokens=args.new_tokens, temperature=0, **kwargs)
                   for name, kwargs in paths.items()}
    print("\nfloat32, batch 1:")
    return {name: compare(name, c, completions[REFERENCE], params32, cfg, prompts, args.new_tokens)
            for name, c in completions.items() if name != REFERENCE}


def write(path: Path | None, report: dict) -> None:
    if path is None:
        return
    slim = json.loads(json.dumps(report))
    for results in slim["results"].values():
        for r in results.values():
            r.pop("completions", None)
    write_json(path, slim)


if __name__ == "__main__":
    main()
