"""Parameter, FLOP and memory accounting for the handout's transformer_accounting and adamwAccounting.

    uv run python scripts/accounting.py --out docs/accounting.json

Models are fnlm ModelConfigs and parameters are counted on fnlm's own tree (lm_spec, no tensors
allocated); a closed form of the same count is kept beside it as a cross-check. FLOPs are those of
matrix multiplies only (2mnp for an (m, n) @ (n, p) product), for one sequence of context_length
tokens. Shape legend: V vocab, T context, D d_model, F d_ff, H heads, L layers, B batch size.

transformer_accounting builds "our model" (SwiGLU, three FFN matrices) with d_ff = 4 D, which is
the 6,400 the handout gives for GPT-2 XL. adamwAccounting describes the FFN as "W1 matrix
multiply, SiLU, W2 matrix multiply" with d_ff = 4 D: fnlm's ffn_type="silu"; that is the model
of its answers, and fnlm's SwiGLU is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fnlm.config import ModelConfig  # noqa: E402
from fnlm.model import lm_spec  # noqa: E402
from fnlm.tree import flatten  # noqa: E402

GPT2_VOCAB = 50_257
GPT2_SIZES = {  # num_layers, d_model, num_heads
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 25),
}
FFN_MATRICES = {"swiglu": 3, "silu": 2}  # W1, W2 (+ W3 for the gate)
FLOAT32_BYTES = 4  # adamwAccounting: "assume we are using float32 for every tensor"
# One AdamW update per parameter: m <- b1 m + (1-b1) g (3 FLOPs), v <- b2 v + (1-b2) g^2 (4),
# theta -= a_t m / (sqrt(v) + eps) (5: sqrt, add, divide, multiply, subtract), theta -= a lambda theta
# (2; a lambda is one scalar). Per-step scalars such as a_t are negligible.
ADAMW_FLOPS_PER_PARAM = 3 + 4 + 5 + 2
# adamwAccounting (d): an A100's float32 peak, the MFU, steps and batch size of the handout.
A100_FP32_PEAK_FLOPS = 19.5e12

FLOP_LABELS = {
    "attn_proj": "attention projections Q, K, V, output (4 x 2TD^2)",
    "attn_scores": "attention scores Q K^T (2T^2D)",
    "attn_values": "attention-weighted values A V (2T^2D)",
    "ffn": "feed-forward W1, W3, W2 (3 x 2TDF; SiLU FFN: 2 x)",
    "lm_head": "LM head (2TDV)",
}


def gpt2_config(size: str, *, context_length: int = 1024, ffn_type: str = "swiglu") -> ModelConfig:
    num_layers, d_model, num_heads = GPT2_SIZES[size]
    return ModelConfig(
        vocab_size=GPT2_VOCAB, context_length=context_length, d_model=d_model, num_layers=num_layers,
        num_heads=num_heads, d_ff=4 * d_model, ffn_type=ffn_type,
    )


def param_count(cfg: ModelConfig) -> int:
    """Trainable parameters of fnlm's tree for cfg (an Init spec: shapes only, nothing allocated)."""
    return sum(math.prod(init.shape) for init in flatten(lm_spec(cfg)).values())


def param_count_closed_form(cfg: ModelConfig) -> int:
    """2VD (embedding, untied LM head) + L (4D^2 + k D F + 2D) + D (final norm), k FFN matrices."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    norms_per_block = 0 if cfg.remove_rmsnorm else 2
    final_norm = 0 if cfg.remove_rmsnorm or cfg.use_post_norm else 1
    block = 4 * d * d + FFN_MATRICES[cfg.ffn_type] * d * f + norms_per_block * d
    return 2 * v * d + cfg.num_layers * block + final_norm * d


def forward_flops(cfg: ModelConfig) -> dict[str, int]:
    """Matrix-multiply FLOPs of one forward pass over one sequence of context_length tokens."""
    t, d, f, layers = cfg.context_length, cfg.d_model, cfg.d_ff, cfg.num_layers
    return {
        "attn_proj": layers * 4 * 2 * t * d * d,
        "attn_scores": layers * 2 * t * t * d,  # H heads of (T, D/H) @ (D/H, T)
        "attn_values": layers * 2 * t * t * d,  # H heads of (T, T) @ (T, D/H)
        "ffn": layers * FFN_MATRICES[cfg.ffn_type] * 2 * t * d * f,
        "lm_head": 2 * t * d * cfg.vocab_size,
    }


def activation_floats(cfg: ModelConfig) -> dict[str, int]:
    """Floats kept for the backward pass per sequence, over adamwAccounting (a)'s list of activations."""
    t, d, f, h, layers = cfg.context_length, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_layers
    block = {
        "rmsnorms": 2 * t * d,
        "qkv_proj": 3 * t * d,
        "qk_scores": h * t * t,
        "softmax": h * t * t,
        "weighted_values": t * d,
        "output_proj": t * d,
        "w1": t * f,
        "silu": t * f,
        "w2": t * d,
    }
    if cfg.ffn_type == "swiglu":
        block |= {"w3": t * f, "gate": t * f}  # W3 x and SiLU(W1 x) * W3 x
    per_model = {"final_rmsnorm": t * d, "logits": t * cfg.vocab_size, "cross_entropy": t * cfg.vocab_size}
    return {f"blocks.{name}": layers * floats for name, floats in block.items()} | per_model


def adamw_memory(cfg: ModelConfig) -> dict[str, int]:
    """Peak bytes of an AdamW step = fixed + per_sequence * batch_size, float32 throughout."""
    params = param_count(cfg)
    fixed = {"parameters": params, "gradients": params, "optimizer_state": 2 * params}  # m and v
    return {name: FLOAT32_BYTES * floats for name, floats in fixed.items()} | {
        "activations_per_sequence": FLOAT32_BYTES * sum(activation_floats(cfg).values())
    }


def max_batch_size(cfg: ModelConfig, budget_bytes: float) -> int:
    memory = adamw_memory(cfg)
    per_sequence = memory.pop("activations_per_sequence")
    return int((budget_bytes - sum(memory.values())) // per_sequence)


def training_step_flops(cfg: ModelConfig, batch_size: int) -> int:
    """Forward + backward (twice the forward, per the handout) over a batch, then the AdamW update."""
    return 3 * batch_size * sum(forward_flops(cfg).values()) + ADAMW_FLOPS_PER_PARAM * param_count(cfg)


def training_days(cfg: ModelConfig, *, steps: int, batch_size: int, peak_flops: float, mfu: float) -> float:
    return steps * training_step_flops(cfg, batch_size) / (mfu * peak_flops) / 86_400


# ---- report -----------------------------------------------------------------------------------


def transformer_accounting() -> dict[str, dict]:
    configs = {f"gpt2-{size}": gpt2_config(size) for size in GPT2_SIZES}
    configs["gpt2-xl-ctx16384"] = gpt2_config("xl", context_length=16_384)
    results = {name: model_summary(cfg) for name, cfg in configs.items()}
    long, short = results["gpt2-xl-ctx16384"], results["gpt2-xl"]
    long["forward_flops_vs_gpt2-xl"] = long["forward_flops"] / short["forward_flops"]
    return results


def model_summary(cfg: ModelConfig) -> dict:
    params = param_count(cfg)
    if params != param_count_closed_form(cfg):
        raise AssertionError(f"tree count {params} != closed form {param_count_closed_form(cfg)} for {cfg}")
    flops = forward_flops(cfg)
    total = sum(flops.values())
    return {
        "config": cfg.to_dict(),
        "params": params,
        "load_bytes_float32": FLOAT32_BYTES * params,
        "forward_flops": total,
        "forward_flops_by_component": flops,
        "forward_flops_share": {name: value / total for name, value in flops.items()},
    }


def adamw_accounting(args: argparse.Namespace) -> dict[str, dict]:
    models = {"handout_silu_ffn": gpt2_config("xl", ffn_type="silu"), "fnlm_swiglu": gpt2_config("xl")}
    return {name: adamw_summary(cfg, args) for name, cfg in models.items()}


def adamw_summary(cfg: ModelConfig, args: argparse.Namespace) -> dict:
    memory = adamw_memory(cfg)
    fixed = sum(value for name, value in memory.items() if name != "activations_per_sequence")
    params = param_count(cfg)
    return {
        "config": cfg.to_dict(),
        "params": params,
        "memory_bytes": memory,
        "activation_floats_per_sequence": activation_floats(cfg),
        "peak_bytes": {"a_per_sequence": memory["activations_per_sequence"], "b_fixed": fixed},
        "max_batch_size": {f"{args.memory_gb:g}e9_bytes": max_batch_size(cfg, args.memory_gb * 1e9),
                           f"{args.memory_gb:g}_GiB": max_batch_size(cfg, args.memory_gb * 2**30)},
        "adamw_update_flops": ADAMW_FLOPS_PER_PARAM * params,
        "forward_flops_per_sequence": sum(forward_flops(cfg).values()),
        "training_step_flops": training_step_flops(cfg, args.batch_size),
        "training": {"steps": args.steps, "batch_size": args.batch_size, "peak_flops": args.peak_flops,
                     "mfu": args.mfu},
        "training_days": training_days(
            cfg, steps=args.steps, batch_size=args.batch_size, peak_flops=args.peak_flops, mfu=args.mfu
        ),
    }


def print_report(results: dict) -> None:
    print("transformer_accounting (our SwiGLU model, d_ff = 4 d_model, one sequence of context_length)")
    for name, model in results["transformer_accounting"].items():
        print(f"\n{name}: {model['params']:,} parameters, {model['load_bytes_float32'] / 1e9:.2f} GB in float32, "
              f"forward {model['forward_flops'] / 1e12:.3f} TFLOPs")
        for key, flops in model["forward_flops_by_component"].items():
            print(f"  {FLOP_LABELS[key]:<52} {flops / 1e12:9.3f} TFLOPs  {model['forward_flops_share'][key]:6.1%}")
        if "forward_flops_vs_gpt2-xl" in model:
            print(f"  {model['forward_flops_vs_gpt2-xl']:.1f} x the forward FLOPs of gpt2-xl at context 1,024")
    for name, model in results["adamwAccounting"].items():
        memory, peak = model["memory_bytes"], model["peak_bytes"]
        train = model["training"]
        print(f"\nadamwAccounting, GPT-2 XL ({name}, {model['params']:,} parameters), float32")
        for key, value in memory.items():
            print(f"  {key:<26} {value / 1e9:8.3f} GB")
        print(f"  peak = {peak['a_per_sequence']:,} B x batch_size + {peak['b_fixed']:,} B"
              f"  ({peak['a_per_sequence'] / 1e9:.3f} GB x batch_size + {peak['b_fixed'] / 1e9:.3f} GB)")
        print("  max batch size: " + ", ".join(f"{n} in {budget}" for budget, n in model["max_batch_size"].items()))
        print(f"  AdamW update: {model['adamw_update_flops']:.4g} FLOPs ({ADAMW_FLOPS_PER_PARAM} per parameter);"
              f" training step at batch {train['batch_size']}: {model['training_step_flops']:.4g} FLOPs")
        print(f"  {train['steps']:,} steps at {train['mfu']:.0%} MFU of {train['peak_flops'] / 1e12:g} TFLOP/s:"
              f" {model['training_days']:,.0f} days")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--memory-gb", type=float, default=80.0, help="accelerator memory (default 80)")
    parser.add_argument("--peak-flops", type=float, default=A100_FP32_PEAK_FLOPS,
                        help="peak FLOP/s (default: the handout's A100 float32 19.5e12)")
    parser.add_argument("--mfu", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=400_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args(argv)
    results = {"transformer_accounting": transformer_accounting(), "adamwAccounting": adamw_accounting(args)}
    print_report(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
