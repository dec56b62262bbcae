"""The LM head and its cross-entropy as one function, over chunks of rows: no (N, V) logits.

    loss = linear_cross_entropy(weight, x, targets, soft_cap=None)
         == cross_entropy(soft_cap(x @ weight.T), targets)          (fnlm.nn, to rounding)

At GPT-2 shapes the logits are the largest tensors of a training step (32 x 1024 x 50257: 3.3 GB
in bfloat16, 6.6 GB as the float32 that the loss needs). Here rows are taken a chunk at a time:
the chunk's logits, their log-sum-exp, and, when gradients are wanted, the gradient of the mean
loss with respect to the chunk's logits (softmax - onehot) / N, turned at once into the chunk's
share of dL/dx (N, D) and dL/dW (V, D); the logits chunk is then dropped. The gradient is thus
computed in the forward pass (the loss is a scalar, so the backward only scales it by the
incoming gradient): first-order only, which is all a training step needs.

On CUDA, without a soft cap, the chunk loop is one op (`fnlm::linear_cross_entropy`) that
torch.compile does not trace into: a chunk's loss and gradient come from one Triton kernel
(fnlm.cross_entropy_kernel) that overwrites the chunk's logits with their gradient, and the
chunk's dL/dx and dL/dW are taken before the next chunk's logits, in one reused buffer. Traced,
inductor scheduled every chunk's gradient before any of the matmuls that consume it, so all of
them were alive at once at the step's peak (628 MiB at the TinyStories shape).

The arithmetic follows the plain path: the matmuls in the compute dtype (autocast's when
autocast is on, else the inputs'), the softmax and log-sum-exp in float32 at least; dL/dW is
accumulated over chunks in float32 (each chunk's share rounded to the compute dtype first; in
the CUDA op cuBLAS adds it in float32 unrounded) and both gradients are returned in the inputs'
own dtype (float32 master weights get float32 gradients). The plain path runs on every device;
under torch.compile inductor fuses each chunk's elementwise work into the matmuls' neighbours.

Shape legend: N rows (batch x sequence, flattened), D model dim, V vocabulary, C rows per chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cross_entropy_kernel

CHUNK_ELEMENTS = 2**28  # logits per chunk: 1 GiB as float32, whatever the vocabulary
# The vocabulary is padded to a multiple of this with zero rows of the weight, so that every
# matmul is aligned: at V = 50257 inductor would otherwise pad each chunk's gradient for its
# dL/dW matmul by copying it (1.7 ms of a 71 ms step at GPT-2-small on an H200).
VOCAB_MULTIPLE = 64


def linear_cross_entropy(
    weight: Tensor, x: Tensor, targets: Tensor, *, soft_cap: float | None = None, chunk_rows: int | None = None
) -> Tensor:
    """Mean cross-entropy of the logits x @ weight.T (soft-capped: c tanh(logits / c)) at targets.

    weight (V, D), x (..., D), targets (...) integer -> 0-d, float32 at least. chunk_rows C
    defaults to the largest power of two with C x V <= CHUNK_ELEMENTS.
    """
    if x.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal x's shape without its last dim "
                         f"{tuple(x.shape[:-1])}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (V, {x.shape[-1]}), got {tuple(weight.shape)}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be positive or None, got {soft_cap!r}")
    vocab_size = weight.shape[0]
    if chunk_rows is None:
        chunk_rows = 1 << max(0, (CHUNK_ELEMENTS // vocab_size).bit_length() - 1)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    device_type = x.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
        else torch.promote_types(x.dtype, weight.dtype)
    )
    rows, labels = x.flatten(0, -2), targets.flatten()
    # Traced, requires_grad is not to be trusted: torch 2.11's dynamo reads it as False on the inputs
    # of a torch.func.grad it compiles, which sent them down the plain path (autograd through the
    # chunks), so a compiled call with gradients enabled takes the Function whatever it reads.
    if torch.is_grad_enabled() and (torch.compiler.is_compiling() or x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(weight, rows, labels, soft_cap, chunk_rows, compute_dtype)[0]
    return _chunked_loss(weight, rows, labels, soft_cap, chunk_rows, compute_dtype, with_grads=False)[0]


def _padded_weight(weight: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """weight (V, D) -> (Vp, D) in the compute dtype, zero rows appended up to VOCAB_MULTIPLE."""
    w = weight.to(compute_dtype)
    padded_vocab = -(-weight.shape[0] // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if padded_vocab == weight.shape[0]:
        return w
    return torch.cat([w, w.new_zeros(padded_vocab - weight.shape[0], weight.shape[1])])


def _float_logits(logits: Tensor, soft_cap: float | None) -> tuple[Tensor, Tensor | None]:
    """A chunk's logits (C, Vp) -> (float32 at least, soft-capped; tanh of the capped logits or None)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if soft_cap is None:
        return logits, None
    squashed = torch.tanh(logits / soft_cap)
    return soft_cap * squashed, squashed


def _chunked_loss(
    weight: Tensor, x: Tensor, targets: Tensor, soft_cap: float | None, chunk_rows: int,
    compute_dtype: torch.dtype, *, with_grads: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(mean loss, dL/dx (N, D) or None, dL/dW (V, D) or None), a chunk of C rows at a time.

    In place only on tensors it made, so that torch.func.vmap can batch it (a sweep's stacked runs).
    """
    if with_grads and soft_cap is None and cross_entropy_kernel.supports(x.device, compute_dtype):
        return torch.ops.fnlm.linear_cross_entropy(weight, x, targets, chunk_rows, compute_dtype)
    num_rows, vocab_size = x.shape[0], weight.shape[0]
    w = _padded_weight(weight, compute_dtype)
    padding = None
    if w.shape[0] != vocab_size:  # zero rows, whose logits are masked to -inf below
        padding = torch.arange(w.shape[0], device=w.device) >= vocab_size  # (Vp,)
    total = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
    grad_rows, grad_w = [], None
    for start in range(0, num_rows, chunk_rows):
        xc, yc = x[start:start + chunk_rows].to(compute_dtype), targets[start:start + chunk_rows]
        logits, squashed = _float_logits(xc @ w.T, soft_cap)  # (C, Vp), a new tensor
        chunk_loss, grad = _loss_and_grad(logits, yc, padding, num_rows, with_grad=with_grads)
        total = total + chunk_loss
        if not with_grads:
            continue
        if squashed is not None:  # d(c tanh(z / c))/dz = 1 - tanh^2
            grad = grad * (1 - squashed.square())
        grad = grad.to(compute_dtype)
        grad_rows.append((grad @ w).to(x.dtype))  # (C, D)
        chunk_grad_w = (grad.T @ xc).to(torch.promote_types(weight.dtype, torch.float32))  # (Vp, D)
        grad_w = chunk_grad_w if grad_w is None else grad_w + chunk_grad_w
    loss = total / num_rows
    if not with_grads:
        return loss, None, None
    return loss, torch.cat(grad_rows), grad_w[:vocab_size].to(weight.dtype)


@torch.library.custom_op("fnlm::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    weight: Tensor, x: Tensor, targets: Tensor, chunk_rows: int, compute_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """_chunked_loss with gradients and no soft cap, through the cross-entropy kernel: (mean loss,
    dL/dx (N, D), dL/dW (V, D)). An op, so that torch.compile runs its chunks in this order: each
    chunk's gradient is consumed before the next chunk's logits exist."""
    num_rows, vocab_size = x.shape[0], weight.shape[0]
    w = _padded_weight(weight, compute_dtype)  # (Vp, D)
    buffer = x.new_empty(min(chunk_rows, num_rows), w.shape[0], dtype=compute_dtype)  # logits, then their gradient
    losses = x.new_empty(num_rows, dtype=torch.float32)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_w = torch.zeros(w.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=w.device)
    for start in range(0, num_rows, chunk_rows):
        xc = x[start:start + chunk_rows].to(compute_dtype)  # (C, D)
        grad = torch.mm(xc, w.T, out=buffer[:xc.shape[0]])  # (C, Vp): the logits, then (below) their gradient
        losses[start:start + chunk_rows] = cross_entropy_kernel.softmax_cross_entropy_(
            grad, targets[start:start + chunk_rows], vocab_size, 1 / num_rows)
        _matmul_into(grad_x[start:start + chunk_rows], grad, w)
        _matmul_into(grad_w, grad.T, xc, accumulate=True)
    loss = losses.sum(dtype=torch.promote_types(x.dtype, torch.float32)) / num_rows
    return loss, grad_x, grad_w[:vocab_size].to(weight.dtype)


def _matmul_into(out: Tensor, a: Tensor, b: Tensor, *, accumulate: bool = False) -> None:
    """out = a @ b, or out += a @ b, with no product tensor where cuBLAS can write out itself:
    in its own dtype, or half inputs into a float32 out on CUDA (out_dtype, torch >= 2.8)."""
    if a.dtype == out.dtype or (a.is_cuda and out.dtype == torch.float32):
        dtype = {} if a.dtype == out.dtype else {"out_dtype": out.dtype}
        if accumulate:
            torch.addmm(out, a, b, out=out, **dtype)
        else:
            torch.mm(a, b, out=out, **dtype)
    elif accumulate:
        out += a @ b
    else:
        out.copy_(a @ b)


@_linear_cross_entropy_op.register_fake
def _(weight, x, targets, chunk_rows, compute_dtype):
    loss = x.new_empty((), dtype=torch.promote_types(x.dtype, torch.float32))
    return loss, x.new_empty(x.shape), weight.new_empty(weight.shape)


@_linear_cross_entropy_op.register_vmap
def _(info, in_dims, weight, x, targets, chunk_rows, compute_dtype):
    """Stacked runs (a sweep's) each have their own weight: one op call per run."""
    def run(i):
        tensors = (t if d is None else t.select(d, i) for t, d in zip((weight, x, targets), in_dims))
        return _linear_cross_entropy_op(*tensors, chunk_rows, compute_dtype)

    return tuple(map(torch.stack, zip(*map(run, range(info.batch_size))))), (0, 0, 0)


def _loss_and_grad(
    logits: Tensor, targets: Tensor, padding: Tensor | None, num_rows: int, *, with_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """A chunk's logits (C, Vp) float32, which it may overwrite, and targets (C,) -> (the sum of
    its rows' losses, the gradient of the mean loss over N = num_rows rows, (softmax - onehot) / N,
    or None). Padding columns (Vp,) take no probability.

    Traced by torch.compile, one elementwise expression, which inductor fuses into one pass (a
    scatter for the one-hot cost it an extra pass over the chunk, 2.4 ms of a GPT-2-small step
    on an H200). Eager, the chunk is worked on in place, with exp taken once: every new (C, Vp)
    tensor costs an allocation, and on the CPU its page faults took as long as the arithmetic.
    """
    target = targets.unsqueeze(-1)  # (C, 1)
    if torch.compiler.is_compiling():
        if padding is not None:
            logits = logits.masked_fill(padding, -torch.inf)
        log_normalizer = logits.logsumexp(-1, keepdim=True)  # (C, 1)
        loss = (log_normalizer - logits.gather(-1, target)).sum()
        if not with_grad:
            return loss, None
        is_target = torch.arange(logits.shape[-1], device=logits.device) == target  # (C, Vp)
        return loss, ((logits - log_normalizer).exp() - is_target.to(logits.dtype)) / num_rows
    if padding is not None:
        logits.masked_fill_(padding, -torch.inf)
    target_logits = logits.gather(-1, target)  # (C, 1), before the chunk is overwritten
    shift = logits.amax(-1, keepdim=True)  # (C, 1): exp never overflows
    exps = logits.sub_(shift).exp_()
    sums = exps.sum(-1, keepdim=True)
    loss = (shift + sums.log() - target_logits).sum()
    if not with_grad:
        return loss, None
    grad = exps.div_(sums * num_rows)
    return loss, grad.scatter_add_(-1, target, torch.full_like(target_logits, -1 / num_rows))


class _LinearCrossEntropy(torch.autograd.Function):
    """forward(weight (V, D), x (N, D), targets (N,), soft_cap, chunk_rows, compute_dtype) ->
    (mean loss, dL/dx, dL/dW): the gradients come out of the forward, non-differentiable, and the
    backward scales them by the loss's incoming gradient. setup_context style with a generated
    vmap rule, so torch.func.grad, vmap and torch.compile all apply."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, x, targets, soft_cap, chunk_rows, compute_dtype):
        return _chunked_loss(weight, x, targets, soft_cap, chunk_rows, compute_dtype, with_grads=True)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, grad_x, grad_w = output
        ctx.mark_non_differentiable(grad_x, grad_w)
        ctx.save_for_backward(grad_x, grad_w)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_x: Tensor, _grad_w: Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return grad_w * grad_loss.to(grad_w.dtype), grad_x * grad_loss.to(grad_x.dtype), None, None, None, None


torch._dynamo.allow_in_graph(_LinearCrossEntropy)  # as fnlm.nn's Functions: compiled vmap needs it
