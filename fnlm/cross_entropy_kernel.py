"""A chunk of logits' cross-entropy and its gradient as one Triton kernel, for CUDA.

    losses = softmax_cross_entropy_(logits, targets, vocab_size, scale)

for logits (C, Vp) in the LM head's compute dtype, of which the first vocab_size columns are
the vocabulary (the rest padding), and targets (C,): row by row

    losses[r] = logsumexp(logits[r, :V]) - logits[r, targets[r]]             float32
    logits[r] <- (softmax(logits[r, :V]) - onehot(targets[r])) * scale,  0 on the padding

the gradient overwriting the logits, in their dtype: what fnlm.fused_ce's plain path computes in
float32 and then rounds. In place because the chunk is the largest buffer of the LM head, and
its logits are not needed once their gradient exists. A target outside 0..V-1 gets a NaN loss
(and no -1 in its gradient row), never another row's logit.

Why a kernel: inductor's fused form read each chunk three times (for the max, for the sum of
exponentials, to write the gradient) at about 0.55 ms a 4096 x 50304 chunk on an H200, 4.4 ms
of a GPT-2-small step, and its online-softmax form was slower still (docs/experiments.md).
Here a program takes one row and reads it twice: once for a running max and sum per lane
(merged at the end), once to write the gradient: 0.34 ms for that chunk. `supports` says
where it runs; elsewhere fnlm.fused_ce runs the plain path, which TRITON_INTERPRET=1 checks the
kernel against. It is called eagerly, inside fnlm.fused_ce's op, which torch.compile does not
trace into: so it needs no op or vmap rule of its own.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .flash_attention import INTERPRET, triton

if triton is not None:
    import triton.language as tl

BLOCK, WARPS = 4096, 16  # columns a step, warps a program (a row)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether softmax_cross_entropy_ runs on logits of this device and dtype."""
    return (
        triton is not None
        and (device.type == "cuda" or INTERPRET)
        and dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def softmax_cross_entropy_(logits: Tensor, targets: Tensor, vocab_size: int, scale: float) -> Tensor:
    """losses (C,) float32, and logits (C, Vp), row-contiguous, overwritten with their gradient,
    as the module docstring defines them."""
    if not 0 < vocab_size <= logits.shape[-1]:
        raise ValueError(f"vocab_size must be in 1..{logits.shape[-1]} (the logits' width), got {vocab_size}")
    if logits.ndim != 2 or logits.stride(-1) != 1 or not supports(logits.device, logits.dtype):
        raise ValueError(f"logits must be a row-contiguous (C, Vp) matrix that `supports`, got {tuple(logits.shape)} "
                         f"{logits.dtype} on {logits.device}")
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    # Triton launches on the current device, which need not be the logits' (cuda:1 while cuda:0 is current)
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        if logits.shape[0]:
            _cross_entropy_kernel[(logits.shape[0],)](
                logits, targets.contiguous(), losses, logits.stride(0), vocab_size, logits.shape[1], scale,
                BLOCK=BLOCK, num_warps=WARPS,
            )
    return losses


if triton is not None:

    @triton.jit
    def _scaled_logits(logits, columns, vocab_size):
        """The row's logits at `columns` times log2 e, float32; -inf past the vocabulary."""
        x = tl.load(logits + columns, mask=columns < vocab_size, other=float("-inf"))
        return x.to(tl.float32) * 1.4426950408889634

    @triton.jit
    def _cross_entropy_kernel(LOGITS, TARGETS, LOSSES, stride, vocab_size, padded_vocab, scale, BLOCK: tl.constexpr):
        """Row r = program_id(0): its loss, and its gradient over its logits. Base-2 units inside
        (exp2 is the fast instruction): x2 = x log2 e, so softmax = exp2(x2 - lse2). Pass 2 reads
        each block of the row before it writes it, and the target's logit is read before pass 2."""
        row = tl.program_id(0).to(tl.int64)
        logits, cols = LOGITS + row * stride, tl.arange(0, BLOCK)
        # Pass 1: each lane's running max and sum of exp2(x2 - max). Lanes start at a finite
        # floor, not -inf, so that a lane that sees only padding (-inf) never makes exp2(nan).
        lane_max = tl.full([BLOCK], -1e30, tl.float32)
        lane_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab_size, BLOCK):
            x2 = _scaled_logits(logits, start + cols, vocab_size)
            new_max = tl.maximum(lane_max, x2)
            lane_sum = lane_sum * tl.math.exp2(lane_max - new_max) + tl.math.exp2(x2 - new_max)
            lane_max = new_max
        row_max = tl.max(lane_max, 0)
        lse2 = row_max + tl.math.log2(tl.sum(lane_sum * tl.math.exp2(lane_max - row_max), 0))
        target = tl.load(TARGETS + row)
        target_x2 = tl.load(logits + target, mask=(target >= 0) & (target < vocab_size), other=float("nan"))
        target_x2 = target_x2.to(tl.float32) * 1.4426950408889634
        tl.store(LOSSES + row, (lse2 - target_x2) * 0.6931471805599453)  # back to natural log
        # Pass 2: (softmax - onehot) * scale, and zeros on the padding (its logits read as -inf)
        for start in range(0, padded_vocab, BLOCK):
            columns = start + cols
            probs = tl.math.exp2(_scaled_logits(logits, columns, vocab_size) - lse2)
            probs = tl.where((columns == target) & (columns < vocab_size), probs - 1.0, probs) * scale
            tl.store(logits + columns, probs.to(LOGITS.dtype.element_ty), mask=columns < padded_vocab)

