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

from . import flash_attention
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
    return linear(params["w2"], _GatedSilu.apply((x @ w13.T).unflatten(-1, (2, -1))))


class _GatedSilu(torch.autograd.Function):
    """(..., 2, F) gate and up -> (..., F): SiLU(gate) * up, whose backward writes the gradient of
    both halves as one elementwise expression over (..., 2, F).

    Through autograd that gradient is two expressions concatenated, which inductor wrote as one
    kernel loading both halves' inputs at every element. On an H200 this form took the FFN's
    compiled gradient from 1.70 to 1.65 ms at the leaderboard shape (docs/experiments.md).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(gates: Tensor) -> Tensor:
        gate, up = gates.unbind(-2)
        return silu(gate) * up

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (gates,) = ctx.saved_tensors
        gate, up = _at_least_float32(gates).split(1, dim=-2)  # (..., 1, F) each
        sig = torch.sigmoid(gate)
        is_gate = torch.arange(2, device=gates.device).view(2, 1) == 0  # (2, 1): which half
        d_gates = torch.where(is_gate, up * sig * (1 + gate * (1 - sig)), gate * sig)  # (..., 2, F)
        return (_at_least_float32(grad).unsqueeze(-2) * d_gates).to(gates.dtype)


torch._dynamo.allow_in_graph(_GatedSilu)  # as _LastDimSoftmax below, for compiled vmap


def silu_ffn(params: PyTree, x: Tensor) -> Tensor:
    """x (..., D) -> (..., D): W2 SiLU(W1 x), the ungated FFN of the swiglu_ablation."""
    return linear(params["w2"], silu(linear(params["w1"], x)))


def relu_squared_ffn(params: PyTree, x: Tensor) -> Tensor:
    """x (..., D) -> (..., D): W2 ReLU(W1 x)^2 (Primer's FFN); params {w1: (F, D), w2: (D, F)}."""
    return linear(params["w2"], linear(params["w1"], x).clamp_min(0).square())


def rope(x: Tensor, token_positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding of interleaved pairs (x[2i], x[2i+1]) by pos / theta^(2i/Dh).

    x (..., T, Dh); token_positions (..., T), broadcastable against x's leading dims.
    """
    return rotate_pairs(x, *rope_tables(token_positions, x.shape[-1], theta, x.dtype))


def rope_tables(
    token_positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype, *, opaque: bool = True
) -> tuple[Tensor, Tensor]:
    """token_positions (..., T) -> cos, sin (..., T, Dh) for rotate_pairs, in dtype promoted to float32 at least.

    Each angle appears twice, once per member of its pair: cos = (c0, c0, c1, c1, ...) and
    sin = (-s0, s0, -s1, s1, ...). opaque: computed by an op that inductor cannot see into, so
    that a compiled step reads this small table rather than evaluating cos and sin at every
    element of q and k (a quarter of the pointwise time of a GPT-2-small step on an H200). A
    consumer that inductor cannot fuse into anyway (a Triton op) takes opaque=False: plain ops,
    one small fused kernel in a compiled step, where the op's call cost ~0.4 ms of host time.
    """
    if head_dim % 2:
        raise ValueError(f"rope rotates pairs: the last dim of x must be even, got {head_dim}")
    tables = torch.ops.fnlm.rope_tables if opaque else _rope_table_values
    return tables(token_positions, head_dim, theta, torch.promote_types(dtype, torch.float32))


def _rope_table_values(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim
    angles = positions.to(dtype).unsqueeze(-1) * theta**-exponents  # (..., T, Dh/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((cos, cos), -1).flatten(-2), torch.stack((-sin, sin), -1).flatten(-2)


@torch.library.custom_op("fnlm::rope_tables", mutates_args=())
def _rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _rope_table_values(positions, head_dim, theta, dtype)


@_rope_tables.register_fake
def _(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = (*positions.shape, head_dim)
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


@_rope_tables.register_vmap
def _(info, in_dims, positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    # The op maps each position independently: a vmapped dim is one more leading dim.
    out_dim = None if in_dims[0] is None else 0
    positions = positions if out_dim is None else positions.movedim(in_dims[0], 0)
    return _rope_tables(positions, head_dim, theta, dtype), (out_dim, out_dim)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., T, Dh) with each pair (x[2i], x[2i+1]) rotated by the angle of rope_tables' cos, sin.

    One elementwise expression (no stack of the two halves), so that compiled, it is one pass
    over x forward and one over its gradient backward.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (x * cos + swapped * sin).to(x.dtype)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """exp(x - max) / sum along `dim`, computed in float32 at least, returned in x's dtype.

    A row that is all -inf gives zeros, not NaN.
    """
    return _LastDimSoftmax.apply(x.movedim(dim, -1)).movedim(-1, dim)


class _LastDimSoftmax(torch.autograd.Function):
    """Softmax over the last dim with its closed-form backward, p * (g - <g, p>).

    Autograd through exp, sum and div would take several more passes over the (..., T, S)
    attention scores, the largest tensors of a training step; this takes two. Only the output
    is saved, in the input's dtype (half the bytes under bf16 autocast); the arithmetic is
    float32. Written in the setup_context style so that torch.func.grad, vmap (via the
    generated rule) and torch.compile all apply.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        x32 = _at_least_float32(x)
        # The clamp keeps an all -inf row's shift finite, so its exps are 0 rather than NaN,
        # and the total's clamp makes that row 0 / tiny = 0; any other row's total is >= 1.
        shift = x32.amax(-1, keepdim=True).clamp_min(torch.finfo(x32.dtype).min)
        exps = (x32 - shift).exp_()
        return exps.div_(exps.sum(-1, keepdim=True).clamp_min(torch.finfo(x32.dtype).tiny)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (probs,) = ctx.saved_tensors
        grad32, probs32 = _at_least_float32(grad), _at_least_float32(probs)
        row_dots = (grad32 * probs32).sum(-1, keepdim=True)  # (..., 1)
        return ((grad32 - row_dots) * probs32).to(grad.dtype)


# torch.compile would otherwise rewrite the Function into a plain function without its vmap rule
# and fail under vmap (a compiled sweep step); allowed in the graph, AOTAutograd traces it with
# its own rules. Single-run steps compile the same either way.
torch._dynamo.allow_in_graph(_LastDimSoftmax)


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
        # An additive 0 / -inf bias rather than masked_fill: its backward is the identity.
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + bias.masked_fill_(~mask, float("-inf"))
    return softmax(scores, dim=-1).to(v.dtype) @ v


ATTENTION_KERNELS = ("auto", "triton", "plain")


def causal_attention(q: Tensor, k: Tensor, v: Tensor, kernel: str = "auto") -> Tensor:
    """scaled_dot_product_attention under the causal mask. q, k, v (..., H, T, Dh) -> (..., H, T, Dh).

    kernel "plain" is the PyTorch definition, "triton" the fused kernels of fnlm.flash_attention
    (the same function without the (T, T) scores; CUDA in half precision, or Triton's CPU
    interpreter), "auto" the kernels where they run on CUDA, else the definition.
    """
    if uses_kernels(q, kernel):
        return flash_attention.causal_attention(q, k, v)
    seq_len = q.shape[-2]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()  # (T, T)
    return scaled_dot_product_attention(q, k, v, causal)


def uses_kernels(q: Tensor, kernel: str) -> bool:
    """Whether causal_attention(q, ..., kernel) runs fnlm.flash_attention's kernels; a clear error
    for an unknown kernel, or "triton" where they cannot run."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    if kernel == "triton" and not flash_attention.supports(q):
        raise ValueError(
            f"the Triton attention kernels need Triton, CUDA (or TRITON_INTERPRET=1), float16/bfloat16 and a "
            f"power-of-two head dim in 16..128; got {q.dtype} {tuple(q.shape)} on {q.device}"
        )
    return kernel == "triton" or kernel == "auto" and q.is_cuda and flash_attention.supports(q)


def multihead_self_attention(
    params: PyTree,
    x: Tensor,
    num_heads: int,
    *,
    token_positions: Tensor | None = None,
    rope_theta: float | None = None,
    attention: str = "auto",
) -> Tensor:
    """Causal multi-head self-attention. x (..., T, D) -> (..., T, D).

    params {q_proj, k_proj, v_proj, output_proj: {"weight": (D, D)}}; rows h*Dh:(h+1)*Dh of each
    projection belong to head h. RoPE rotates queries and keys when rope_theta is given, at
    token_positions (..., T) (default 0..T-1); rope_theta=None is NoPE. `attention` picks the
    kernel (causal_attention).
    """
    if token_positions is None:
        token_positions = torch.arange(x.shape[-2], device=x.device)
    qkv = qkv_projection(params, x, num_heads)  # (..., T, 3, H, Dh)
    q, k, v = qkv_heads(qkv)
    if rope_theta is not None and "q_norm" not in params and token_positions.ndim == 1 and uses_kernels(q, attention):
        # One kernel rotates q and k back in the gradient and writes it as the projection's.
        cos, sin = rope_tables(token_positions, q.shape[-1], rope_theta, q.dtype, opaque=False)  # (T, Dh)
        return attention_output(params, flash_attention.rotary_causal_attention(qkv, cos, sin))
    q, k = normalized_rotated(params, q, k, token_positions, rope_theta)
    return attention_output(params, causal_attention(q, k, v, attention))


QK_NORM_EPS = 1e-5  # fixed, so that every caller of attention_heads (the KV caches too) agrees


def attention_heads(
    params: PyTree, x: Tensor, num_heads: int, token_positions: Tensor, rope_theta: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., T, D) -> q, k, v (..., H, T, Dh), queries and keys rotated by RoPE unless rope_theta is None.

    With q_norm and k_norm gains in params ({"weight": (Dh,)}, ModelConfig.qk_norm), each head's
    queries and keys are RMS-normalized first (eps QK_NORM_EPS), which bounds the attention logits.
    """
    q, k, v = qkv_heads(qkv_projection(params, x, num_heads))
    return *normalized_rotated(params, q, k, token_positions, rope_theta), v


def qkv_projection(params: PyTree, x: Tensor, num_heads: int) -> Tensor:
    """x (..., T, D) -> queries, keys and values of every head from one matmul: (..., T, 3, H, Dh)."""
    d_model = x.shape[-1]
    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
    w_qkv = torch.cat([params[name]["weight"] for name in ("q_proj", "k_proj", "v_proj")])  # (3D, D)
    return (x @ w_qkv.T).unflatten(-1, (3, num_heads, d_model // num_heads))


def qkv_heads(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (..., T, 3, H, Dh) -> q, k, v (..., H, T, Dh), views.

    Views of the one projection: a split along D with v copied out saved 0.9 GiB at GPT-2-small
    but cost 4.5% of the step (docs/results/qkv_layout_h200_gpt2-small.json)."""
    return qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)


def normalized_rotated(
    params: PyTree, q: Tensor, k: Tensor, token_positions: Tensor, rope_theta: float | None
) -> tuple[Tensor, Tensor]:
    """q, k (..., H, T, Dh) -> RMS-normalized (with q_norm, k_norm gains) and rotated (with rope_theta)."""
    if "q_norm" in params:
        q, k = rmsnorm(params["q_norm"], q, QK_NORM_EPS), rmsnorm(params["k_norm"], k, QK_NORM_EPS)
    if rope_theta is not None:
        head_positions = token_positions.unsqueeze(-2)  # (..., 1, T): the same angles for every head
        cos, sin = rope_tables(head_positions, q.shape[-1], rope_theta, q.dtype)
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
    return q, k


def attention_output(params: PyTree, heads: Tensor) -> Tensor:
    """Per-head attention outputs (..., H, T, Dh) -> concatenated and projected (..., T, D)."""
    return linear(params["output_proj"], heads.transpose(-3, -2).flatten(-2))


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean of -log softmax(logits)[target], in float32 at least. logits (..., V), targets (...) integer -> 0-d."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    return _CrossEntropy.apply(logits.flatten(0, -2), targets.flatten())[0]


class _CrossEntropy(torch.autograd.Function):
    """Log-sum-exp minus the target logit, averaged; backward (softmax - onehot) / N in one pass.

    forward(logits (N, V), targets (N,)) -> (mean loss, log normaliser (N, 1)); the second
    output only carries the normaliser to the backward. The logits are saved in their own
    dtype (under bf16 autocast, half the bytes of the largest activation) and upcast on use.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits32 = _at_least_float32(logits)
        shift = logits32.amax(-1, keepdim=True)  # (N, 1): exp never overflows
        log_normalizer = shift + (logits32 - shift).exp_().sum(-1, keepdim=True).log_()  # (N, 1)
        target_logits = logits32.gather(-1, targets.unsqueeze(-1))  # (N, 1)
        return (log_normalizer - target_logits).mean(), log_normalizer

    @staticmethod
    def setup_context(ctx, inputs, outputs) -> None:
        logits, targets = inputs
        ctx.mark_non_differentiable(outputs[1])
        ctx.save_for_backward(logits, targets, outputs[1])

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _: Tensor) -> tuple[Tensor, None]:
        logits, targets, log_normalizer = ctx.saved_tensors
        grad = (_at_least_float32(logits) - log_normalizer).exp_()  # softmax (N, V)
        grad.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(log_normalizer, -1.0))
        return (grad * (grad_loss / logits.shape[0])).to(logits.dtype), None


torch._dynamo.allow_in_graph(_CrossEntropy)  # as _LastDimSoftmax, for compiled vmap


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
