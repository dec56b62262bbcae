"""Pure neural-network primitives.

Shape legend: ... any leading batch dims, T query positions, S key positions, D d_model,
F d_ff, H heads, Dh head dim (D / H), V vocabulary.

Layers take their parameter subtree first (`linear(params, x)` with params = {"weight": W});
stateless ops take tensors only. Weights are (d_out, d_in) and applied as x @ W.T.
Reductions that lose precision in half precision (norms, softmax, log-sum-exp) run in float32
at least and return the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tree import PyTree


def linear(params: PyTree, x: Tensor) -> Tensor:
    """x (..., d_in) -> (..., d_out); params {"weight": (d_out, d_in)}."""
    return x @ params["weight"].T


def embedding(params: PyTree, token_ids: Tensor) -> Tensor:
    """token_ids (...) integer -> (..., D); params {"weight": (V, D)}."""
    return params["weight"][token_ids]


def rmsnorm(params: PyTree, x: Tensor, eps: float) -> Tensor:
    """x (..., D) -> (..., D): x / rms(x) * gain; params {"weight": (D,)}."""
    x32 = _at_least_float32(x)
    inv_rms = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return (x32 * inv_rms * params["weight"]).to(x.dtype)


def silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def swiglu(params: PyTree, x: Tensor) -> Tensor:
    """x (..., D) -> (..., D): W2 (SiLU(W1 x) * W3 x); params {w1: (F, D), w2: (D, F), w3: (F, D)}."""
    w13 = torch.cat([params["w1"]["weight"], params["w3"]["weight"]])  # (2F, D): both gates, one matmul
    gate, up = (x @ w13.T).chunk(2, dim=-1)  # (..., F) each
    return linear(params["w2"], silu(gate) * up)


def silu_ffn(params: PyTree, x: Tensor) -> Tensor:
    """x (..., D) -> (..., D): W2 SiLU(W1 x), the ungated FFN of the swiglu_ablation."""
    return linear(params["w2"], silu(linear(params["w1"], x)))


def rope(x: Tensor, token_positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding of interleaved pairs (x[2i], x[2i+1]) by pos / theta^(2i/Dh).

    x (..., T, Dh); token_positions (..., T), broadcastable against x's leading dims.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rope rotates pairs: the last dim of x must be even, got {head_dim}")
    dtype = torch.promote_types(x.dtype, torch.float32)  # angles need float32 at least
    exponents = torch.arange(0, head_dim, 2, device=x.device, dtype=dtype) / head_dim
    angles = token_positions.to(dtype).unsqueeze(-1) * theta**-exponents  # (..., T, Dh/2)
    cos, sin = angles.cos(), angles.sin()
    pairs = x.unflatten(-1, (-1, 2))  # (..., T, Dh/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """exp(x - max) / sum, in float32 at least. A row that is all -inf gives zeros, not NaN."""
    x32 = _at_least_float32(x)
    # Shifting by any constant leaves softmax unchanged, so the shift carries no gradient; the
    # clamp keeps an all -inf row's shift finite so that its exps are 0 rather than NaN.
    shift = x32.amax(dim, keepdim=True).detach().clamp_min(torch.finfo(x32.dtype).min)
    exps = torch.exp(x32 - shift)
    total = exps.sum(dim, keepdim=True).clamp_min(torch.finfo(x32.dtype).tiny)  # >= 1 unless all -inf
    return (exps / total).to(x.dtype)


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(Dk)) v. q (..., T, Dk), k (..., S, Dk), v (..., S, Dv) -> (..., T, Dv).

    mask (..., T, S) boolean, True = may attend; a query that may attend nowhere gets zeros.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor (True = attend), got {mask.dtype}")
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (..., T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(scores, dim=-1).to(v.dtype) @ v


def multihead_self_attention(
    params: PyTree,
    x: Tensor,
    num_heads: int,
    *,
    token_positions: Tensor | None = None,
    rope_theta: float | None = None,
) -> Tensor:
    """Causal multi-head self-attention. x (..., T, D) -> (..., T, D).

    params {q_proj, k_proj, v_proj, output_proj: {"weight": (D, D)}}; rows h*Dh:(h+1)*Dh of each
    projection belong to head h. RoPE rotates queries and keys when rope_theta is given, at
    token_positions (..., T) (default 0..T-1); rope_theta=None is NoPE.
    """
    seq_len = x.shape[-2]
    if token_positions is None:
        token_positions = torch.arange(seq_len, device=x.device)
    q, k, v = attention_heads(params, x, num_heads, token_positions, rope_theta)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).tril()  # (T, T)
    return attention_output(params, scaled_dot_product_attention(q, k, v, causal))


def attention_heads(
    params: PyTree, x: Tensor, num_heads: int, token_positions: Tensor, rope_theta: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., T, D) -> q, k, v (..., H, T, Dh), queries and keys rotated by RoPE unless rope_theta is None."""
    d_model = x.shape[-1]
    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
    w_qkv = torch.cat([params[name]["weight"] for name in ("q_proj", "k_proj", "v_proj")])  # (3D, D)
    qkv = (x @ w_qkv.T).unflatten(-1, (3, num_heads, d_model // num_heads))  # (..., T, 3, H, Dh)
    q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # (..., H, T, Dh) each
    if rope_theta is not None:
        head_positions = token_positions.unsqueeze(-2)  # (..., 1, T): the same angles for every head
        q, k = rope(q, head_positions, rope_theta), rope(k, head_positions, rope_theta)
    return q, k, v


def attention_output(params: PyTree, heads: Tensor) -> Tensor:
    """Per-head attention outputs (..., H, T, Dh) -> concatenated and projected (..., T, D)."""
    return linear(params["output_proj"], heads.transpose(-3, -2).flatten(-2))


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean of -log softmax(logits)[target]. logits (..., V), targets (...) integer -> 0-d float32."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    logits = _at_least_float32(logits)
    shift = logits.amax(-1, keepdim=True).detach()  # (..., 1)
    log_normalizer = shift.squeeze(-1) + torch.exp(logits - shift).sum(-1).log()  # (...)
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)
    return (log_normalizer - target_logits).mean()


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
