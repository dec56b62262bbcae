"""The CS336 Transformer LM as pure functions over a parameter pytree.

    params = {
        "token_embeddings": {"weight": (V, D)},
        "layers": [{"attn": {"q_proj" | "k_proj" | "v_proj" | "output_proj": {"weight": (D, D)}},
                    "ln1": {"weight": (D,)},
                    "ffn": {"w1": {"weight": (F, D)}, "w2": {"weight": (D, F)}, "w3": {"weight": (F, D)}},
                    "ln2": {"weight": (D,)}}, ...],
        "ln_final": {"weight": (D,)},
        "lm_head": {"weight": (V, D)},
    }

Ablations change the tree as well as the function: without RMSNorm there are no ln* leaves, the
ungated SiLU and ReLU^2 FFNs have no w3, and a post-norm model has no ln_final (each block already
ends in a norm). So do the leaderboard switches: tied embeddings have no lm_head (token_embeddings
is both), and QK-norm adds attn.q_norm / attn.k_norm gains (Dh,) to every layer. Shape legend: B batch dims, T sequence, D d_model, V vocabulary.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import ModelConfig
from .fused_ce import linear_cross_entropy
from .nn import embedding, linear, multihead_self_attention, relu_squared_ffn, rmsnorm, silu_ffn, swiglu
from .tree import PyTree, tree_leaves, tree_map_with_path


@dataclass(frozen=True)
class Init:
    """A parameter leaf before it exists: its shape and a truncated-normal std (None: ones)."""

    shape: tuple[int, ...]
    std: float | None = None


def linear_spec(d_in: int, d_out: int) -> PyTree:
    # N(0, 2 / (d_in + d_out)) truncated at 3 sigma (handout 3.4.1).
    return {"weight": Init((d_out, d_in), std=math.sqrt(2 / (d_in + d_out)))}


def embedding_spec(vocab_size: int, d_model: int) -> PyTree:
    return {"weight": Init((vocab_size, d_model), std=1.0)}


def rmsnorm_spec(d_model: int) -> PyTree:
    return {"weight": Init((d_model,))}


def ffn_spec(d_model: int, d_ff: int, ffn_type: str = "swiglu") -> PyTree:
    spec = {"w1": linear_spec(d_model, d_ff), "w2": linear_spec(d_ff, d_model)}
    if ffn_type == "swiglu":
        spec["w3"] = linear_spec(d_model, d_ff)
    return spec


def attention_spec(d_model: int) -> PyTree:
    return {name: linear_spec(d_model, d_model) for name in ("q_proj", "k_proj", "v_proj", "output_proj")}


def block_spec(cfg: ModelConfig) -> PyTree:
    spec = {"attn": attention_spec(cfg.d_model), "ffn": ffn_spec(cfg.d_model, cfg.d_ff, cfg.ffn_type)}
    if cfg.qk_norm:
        spec["attn"] |= {"q_norm": rmsnorm_spec(cfg.head_dim), "k_norm": rmsnorm_spec(cfg.head_dim)}
    if not cfg.remove_rmsnorm:
        spec |= {"ln1": rmsnorm_spec(cfg.d_model), "ln2": rmsnorm_spec(cfg.d_model)}
    return spec


def lm_spec(cfg: ModelConfig) -> PyTree:
    spec = {
        "token_embeddings": embedding_spec(cfg.vocab_size, cfg.d_model),
        "layers": [block_spec(cfg) for _ in range(cfg.num_layers)],
        "lm_head": linear_spec(cfg.d_model, cfg.vocab_size),
    }
    if cfg.tie_embeddings:  # one matrix, initialized as the output layer (an N(0, 1) one would give huge logits)
        spec["token_embeddings"] = spec.pop("lm_head")
    if not (cfg.remove_rmsnorm or cfg.use_post_norm):
        spec["ln_final"] = rmsnorm_spec(cfg.d_model)
    return spec


def materialize(
    spec: PyTree, *, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> PyTree:
    """Sample every Init leaf on the CPU from a generator seeded by (seed, leaf path), then move it.

    Per-leaf generators make a leaf's values independent of the rest of the tree and of the
    device, so CPU and GPU inits agree and adding a layer leaves the others unchanged.
    """

    def sample(path: str, init: Init) -> Tensor:
        digest = hashlib.blake2b(f"{seed}/{path}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        leaf = torch.ones(init.shape)
        if init.std is not None:
            std = init.std
            torch.nn.init.trunc_normal_(leaf, 0.0, std, -3 * std, 3 * std, generator=generator)
        return leaf.to(device=device, dtype=dtype)

    return tree_map_with_path(sample, spec)


def init_params(
    cfg: ModelConfig, *, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> PyTree:
    return materialize(lm_spec(cfg), seed=seed, device=device, dtype=dtype)


def num_params(params: PyTree) -> int:
    return sum(leaf.numel() for leaf in tree_leaves(params))


def transformer_block(
    params: PyTree, x: Tensor, cfg: ModelConfig, token_positions: Tensor | None = None, *, attention: str = "auto"
) -> Tensor:
    """x (B, T, D) -> (B, T, D): causal self-attention and FFN sublayers, pre-norm or post-norm.

    attention picks the attention kernel: "auto", "triton" or "plain" (fnlm.nn.causal_attention)."""

    def attend(h: Tensor) -> tuple[Tensor, None]:
        theta = None if cfg.remove_rope else cfg.rope_theta
        out = multihead_self_attention(
            params["attn"], h, cfg.num_heads, token_positions=token_positions, rope_theta=theta, attention=attention
        )
        return out, None

    return residual_block(params, x, cfg, attend)[0]


FFNS = {"swiglu": swiglu, "silu": silu_ffn, "relu2": relu_squared_ffn}  # ModelConfig.ffn_type -> the FFN


def residual_block(
    params: PyTree, x: Tensor, cfg: ModelConfig, attention: Callable[[Tensor], tuple[Tensor, Any]]
) -> tuple[Tensor, Any]:
    """The block's wiring around an attention sublayer `h -> (out, aux)`; returns (x, aux).

    Pre-norm: x + attn(norm(x)), then x + ffn(norm(x)). Post-norm: norm(x + attn(x)), then
    norm(x + ffn(x)). The attention is a parameter so that cached decoding (fnlm.decode) reuses
    this wiring with its own attention, threading the KV cache out through `aux`.
    """

    def ffn(h: Tensor) -> Tensor:
        return FFNS[cfg.ffn_type](params["ffn"], h)

    def norm(name: str, h: Tensor) -> Tensor:
        return h if cfg.remove_rmsnorm else rmsnorm(params[name], h, cfg.eps)

    if cfg.use_post_norm:
        attended, aux = attention(x)
        x = norm("ln1", x + attended)
        return norm("ln2", x + ffn(x)), aux
    attended, aux = attention(norm("ln1", x))
    x = x + attended
    return x + ffn(norm("ln2", x)), aux


def transformer_lm(params: PyTree, token_ids: Tensor, cfg: ModelConfig, *, attention: str = "auto") -> Tensor:
    """token_ids (B, T) integer, T <= context_length -> logits (B, T, V)."""
    return output_logits(params, transformer_trunk(params, token_ids, cfg, attention=attention), cfg)


def lm_loss(
    params: PyTree, token_ids: Tensor, targets: Tensor, cfg: ModelConfig, *, attention: str = "auto"
) -> Tensor:
    """Mean cross-entropy of transformer_lm's logits at targets (B, T) -> 0-d float32.

    The same number as cross_entropy(transformer_lm(...), targets), computed by the fused LM
    head (fnlm.fused_ce), which never holds the (B, T, V) logits.
    """
    x = final_norm(params, transformer_trunk(params, token_ids, cfg, attention=attention), cfg)
    return linear_cross_entropy(lm_head_weight(params, cfg), x, targets, soft_cap=cfg.logit_soft_cap)


def transformer_trunk(params: PyTree, token_ids: Tensor, cfg: ModelConfig, *, attention: str = "auto") -> Tensor:
    """token_ids (B, T) -> the last block's output (B, T, D): the embedding and every block."""
    check_token_ids(token_ids, cfg)
    x = embedding(params["token_embeddings"], token_ids)  # (B, T, D)
    for layer in params["layers"]:
        x = transformer_block(layer, x, cfg, attention=attention)
    return x


def output_logits(params: PyTree, x: Tensor, cfg: ModelConfig) -> Tensor:
    """The last block's output (B, T, D) -> logits (B, T, V): final norm (if any), then lm_head
    (token_embeddings when tied), then the soft cap (if any)."""
    logits = linear({"weight": lm_head_weight(params, cfg)}, final_norm(params, x, cfg))
    if cfg.logit_soft_cap is not None:
        logits = cfg.logit_soft_cap * torch.tanh(logits / cfg.logit_soft_cap)
    return logits


def final_norm(params: PyTree, x: Tensor, cfg: ModelConfig) -> Tensor:
    """(B, T, D) -> (B, T, D): ln_final where the model has one (pre-norm with RMSNorm)."""
    return rmsnorm(params["ln_final"], x, cfg.eps) if "ln_final" in params else x


def lm_head_weight(params: PyTree, cfg: ModelConfig) -> Tensor:
    """The (V, D) output projection: lm_head, or token_embeddings when tied."""
    return params["token_embeddings" if cfg.tie_embeddings else "lm_head"]["weight"]


def check_token_ids(token_ids: Tensor, cfg: ModelConfig) -> None:
    """Raise a clear error for ids that are not integers, too long a sequence, or out of range.

    The range check reads the values, so it runs only in eager code outside function
    transforms; compiled and vmapped steps rely on the data pipeline's one-time check.
    """
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if token_ids.ndim < 1:
        raise ValueError("token_ids must have a sequence dimension, got a 0-d tensor")
    if token_ids.shape[-1] > cfg.context_length:
        raise ValueError(
            f"sequence length {token_ids.shape[-1]} exceeds context_length {cfg.context_length}"
        )
    if torch.compiler.is_compiling() or _under_vmap():
        return
    if token_ids.numel() and bool(((token_ids < 0) | (token_ids >= cfg.vocab_size)).any()):
        bad = token_ids[(token_ids < 0) | (token_ids >= cfg.vocab_size)][0].item()
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")


def _under_vmap() -> bool:
    """Inside torch.func.vmap, where reading a value is an error (under grad, ids are wrapped
    tensors even when they are not batched, so the tensor itself cannot tell)."""
    functorch = torch._C._functorch
    return any(level.key() == functorch.TransformType.Vmap for level in functorch.get_interpreter_stack() or ())
