"""Causal attention as fused Triton kernels (FlashAttention-2's algorithm), for CUDA.

The definition of attention is fnlm.nn.scaled_dot_product_attention; this is the same function
computed without materialising the (T, T) scores: each program keeps a block of queries in
registers, streams the keys and values up to the diagonal, and keeps a running max and sum
(the online softmax). The forward also writes the log-sum-exp of every row, which the
backward uses to recompute the probabilities block by block.

Shape legend: B batch, H heads, T sequence, D head dim (16..128, a power of two).
q, k, v may be strided views (the last dim must be contiguous). The output is laid out as
(B, T, H, D), which makes the concatenation of heads that follows a view. With RoPE,
`rotary_causal_attention` takes the q/k/v projection (B, T, 3, H, D) and RoPE's tables: one
kernel rotates q and k, and the backward kernel returns that projection's gradient, dQ and dK
rotated back.

The kernels are registered as torch.library ops (`fnlm::causal_attention`, its backward, the
rotation and the rotary backward) with vmap rules, and tied together by autograd.Functions, so
torch.func.grad, torch.func.vmap and torch.compile treat them like any aten op. Without Triton or
a GPU, `supports` is False and fnlm uses the plain PyTorch path. Setting TRITON_INTERPRET=1 runs
the kernels on the CPU (slowly), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with CUDA builds of torch on Linux only
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _launcher(kernel):
    """How the attention's triton_ops launch a kernel: through wrap_triton, which lets
    torch.compile trace the launch; interpreted kernels are launched as they are."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def _fold_vmap_rule(op, unbatched: int = 0):
    """A vmap rule for the attention's ops: fold the vmapped dim of every tensor argument but the
    last `unbatched` (RoPE's tables, which must not be batched) into its batch dim B, run `op`
    once, unfold its outputs."""

    def rule(info, in_dims, *args):
        def fold(arg, dim):
            if not isinstance(arg, Tensor):
                return arg
            batched = arg.movedim(dim, 0) if dim is not None else arg.expand(info.batch_size, *arg.shape)
            return batched.flatten(0, 1)

        tensors = [i for i, arg in enumerate(args) if isinstance(arg, Tensor)]
        kept = set(tensors[len(tensors) - unbatched:])
        if any(in_dims[i] is not None for i in kept):
            raise ValueError("the rotary attention's cos and sin tables cannot be batched by vmap")
        outputs = op(*(arg if i in kept else fold(arg, dim) for i, (arg, dim) in enumerate(zip(args, in_dims))))
        if isinstance(outputs, Tensor):  # the backward ops' gradients
            return outputs.unflatten(0, (info.batch_size, -1)), 0
        return tuple(out.unflatten(0, (info.batch_size, -1)) for out in outputs), (0,) * len(outputs)

    return rule


# Tilings by head dim (up to 32, 64, 128). forward: (BLOCK_M queries, BLOCK_N keys, num_warps,
# num_stages), BLOCK_M % BLOCK_N == 0. backward: (SMALL, BIG, num_warps, num_stages), BIG % SMALL
# == 0: each program holds BIG keys (then BIG queries) and steps SMALL queries (keys) at a time.
# Chosen on an H200 (torch 2.11, Triton 3.6) at the issue-12 shapes (B H T D = 32 12 1024 64,
# 128 16 256 32, 64 12 512 64): scripts/bench_kernels.py.
TUNING = {
    "forward": {32: (64, 32, 4, 4), 64: (64, 64, 4, 3), 128: (128, 64, 8, 3)},
    "backward": {32: (32, 64, 4, 3), 64: (64, 64, 4, 3), 128: (32, 64, 4, 3)},
}


ROTATE_ROWS = 32  # rows of q or k that a program of the rotation kernel rotates


def tuning_key(head_dim: int) -> int:
    """The TUNING entry that serves head_dim: the smallest of 32, 64, 128 that holds it."""
    return next(size for size in (32, 64, 128) if head_dim <= size)


def tuning(kernel: str, head_dim: int) -> tuple[int, int, int, int]:
    """The tiling of `kernel` ("forward" or "backward") for head_dim (see TUNING)."""
    return TUNING[kernel][tuning_key(head_dim)]


def supports(q: Tensor) -> bool:
    """Whether causal attention over q (B, H, T, D) can run on these kernels."""
    head_dim = q.shape[-1]
    return (
        triton is not None
        and (q.is_cuda or INTERPRET)
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.ndim == 4
        and 16 <= head_dim <= 128
        and head_dim & (head_dim - 1) == 0
    )


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for q, k, v (B, H, T, D) -> (B, H, T, D)."""
    return _CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5)[0]


def rotary_causal_attention(qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """causal_attention of q and k rotated by fnlm.nn.rotate_pairs(., cos, sin), and v, where
    q, k, v are the heads of one projection qkv (B, T, 3, H, D); cos, sin (T, D) -> (B, H, T, D).

    The same function as rotating, then attending; but its gradient is the projection's, written
    by the backward kernel with dQ and dK rotated back. Through autograd, the rotation's backward
    and the concatenation of the three gradients were two more passes over them (4.1 of 56 GPU
    ms a step at the leaderboard shape on an H200, docs/experiments.md).
    """
    return _RotaryCausalAttention.apply(qkv, cos, sin, qkv.shape[-1] ** -0.5)[0]


if triton is not None:

    @triton.jit
    def _load_rows(ptr, b, h, stride_b, stride_h, stride_t, rows, dims, seq_len, EVEN: tl.constexpr):
        """The (len(rows), D) tile of head (b, h) of a (B, H, T, D) tensor; rows past T read as 0.
        EVEN: T is a multiple of the kernel's blocks, so every row is inside and the load is unmasked."""
        pointers = ptr + b * stride_b + h * stride_h + rows[:, None] * stride_t + dims[None, :]
        if EVEN:
            tile = tl.load(pointers)
        else:
            tile = tl.load(pointers, mask=(rows < seq_len)[:, None], other=0.0)
        return tile

    @triton.jit
    def _visible(rows, cols, seq_len, EVEN: tl.constexpr):
        """Where query `rows` may attend key `cols` (broadcastable index tiles): causal, and (unless
        EVEN) both inside the sequence."""
        visible = rows >= cols
        if not EVEN:
            visible = visible & (rows < seq_len) & (cols < seq_len)
        return visible

    @triton.jit
    def _forward_block(q, K, V, b, h, k_stride_b, k_stride_h, k_stride_t, v_stride_b, v_stride_h, v_stride_t,
                       rows, dims, seq_len, start_n, row_max, row_sum, acc, log2_scale,
                       BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN: tl.constexpr):
        """One online-softmax step over keys start_n .. start_n + BLOCK_N: (row_max, row_sum, acc)."""
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, b, h, k_stride_b, k_stride_h, k_stride_t, cols, dims, seq_len, EVEN)  # (N, D)
        v = _load_rows(V, b, h, v_stride_b, v_stride_h, v_stride_t, cols, dims, seq_len, EVEN)
        scores = tl.dot(q, tl.trans(k)) * log2_scale  # (M, N), base-2 units
        if MASKED:
            visible = rows[:, None] >= cols[None, :]
            if not EVEN:  # keys past T are masked; rows past T are never stored
                visible = visible & (cols < seq_len)[None, :]
            scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        probs = tl.math.exp2(scores - new_max[:, None])
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
        return new_max, row_sum, acc

    @triton.jit
    def _forward_kernel(
        Q, K, V, O, LSE,
        q_stride_b, q_stride_h, q_stride_t,
        k_stride_b, k_stride_h, k_stride_t,
        v_stride_b, v_stride_h, v_stride_t,
        num_heads, seq_len,
        SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        EVEN: tl.constexpr,
    ):
        """O and the log-sum-exp for one block of queries: keys up to the diagonal, online softmax.

        EVEN (T a multiple of BLOCK_M): the key blocks left of the diagonal block need
        no mask, only the diagonal's BLOCK_M keys are masked, and no load checks the sequence's
        end. Otherwise every block is masked."""
        block_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // num_heads, bh % num_heads
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        q = _load_rows(Q, b, h, q_stride_b, q_stride_h, q_stride_t, rows, dims, seq_len, EVEN)  # (M, D)
        log2_scale = SCALE * 1.4426950408889634  # exp(x) = exp2(x log2 e): exp2 is the fast instruction
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        unmasked_end = 0  # key blocks left of the diagonal block see every key: no mask there
        if EVEN:
            unmasked_end = block_m * BLOCK_M
        for start_n in range(0, unmasked_end, BLOCK_N):
            row_max, row_sum, acc = _forward_block(
                q, K, V, b, h, k_stride_b, k_stride_h, k_stride_t, v_stride_b, v_stride_h, v_stride_t,
                rows, dims, seq_len, start_n, row_max, row_sum, acc, log2_scale, BLOCK_N, False, EVEN)
        for start_n in range(unmasked_end, tl.minimum((block_m + 1) * BLOCK_M, seq_len), BLOCK_N):
            row_max, row_sum, acc = _forward_block(
                q, K, V, b, h, k_stride_b, k_stride_h, k_stride_t, v_stride_b, v_stride_h, v_stride_t,
                rows, dims, seq_len, start_n, row_max, row_sum, acc, log2_scale, BLOCK_N, True, EVEN)
        row_ok = rows < seq_len
        # O is (B, H, T, D) laid out as (B, T, H, D), so that the heads' concatenation is a view
        o_offsets = (b * seq_len + rows[:, None]) * num_heads * HEAD_DIM + h * HEAD_DIM + dims[None, :]
        tl.store(O + o_offsets, (acc / row_sum[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
        # Natural-log log-sum-exp of the scaled scores: (max + log2 sum) / log2 e.
        tl.store(LSE + bh * seq_len + rows, (row_max + tl.math.log2(row_sum)) * 0.6931471805599453, mask=row_ok)

    @triton.jit
    def _row_stats(LSE, DELTA, bh, rows, seq_len, EVEN: tl.constexpr):
        """The rows' log-sum-exp in base 2 (the backward's exp2 units) and their rowsum(dO * O)."""
        offsets = bh * seq_len + rows
        if EVEN:
            lse, delta = tl.load(LSE + offsets), tl.load(DELTA + offsets)
        else:
            lse = tl.load(LSE + offsets, mask=rows < seq_len, other=0.0)
            delta = tl.load(DELTA + offsets, mask=rows < seq_len, other=0.0)
        return lse * 1.4426950408889634, delta

    @triton.jit
    def _backward_kv_step(Q, DO, LSE, DELTA, b, h, bh, q_stride_b, q_stride_h, q_stride_t,
                          do_stride_b, do_stride_h, do_stride_t, k, v, cols, dims, seq_len, start_m, dk, dv,
                          log2_scale, SMALL: tl.constexpr, MASKED: tl.constexpr, EVEN: tl.constexpr):
        """dK, dV of a key block accumulated over the queries start_m .. start_m + SMALL, in the
        transposed layout (keys down, queries across) so that no product needs a transpose of P."""
        rows = start_m + tl.arange(0, SMALL)
        q = _load_rows(Q, b, h, q_stride_b, q_stride_h, q_stride_t, rows, dims, seq_len, EVEN)  # (S, D)
        grad_out = _load_rows(DO, b, h, do_stride_b, do_stride_h, do_stride_t, rows, dims, seq_len, EVEN)
        lse, delta = _row_stats(LSE, DELTA, bh, rows, seq_len, EVEN)
        probs_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * log2_scale - lse[None, :])  # (BIG, S) = P^T
        if MASKED:
            probs_t = tl.where(_visible(rows[None, :], cols[:, None], seq_len, EVEN), probs_t, 0.0)
        dv += tl.dot(probs_t.to(grad_out.dtype), grad_out)
        dscores_t = probs_t * (tl.dot(v, tl.trans(grad_out)) - delta[None, :])  # dS^T
        dk += tl.dot(dscores_t.to(q.dtype), q)
        return dk, dv

    @triton.jit
    def _backward_q_step(K, V, b, h, k_stride_b, k_stride_h, k_stride_t, v_stride_b, v_stride_h, v_stride_t,
                         q, grad_out, lse, delta, rows, dims, seq_len, start_n, dq,
                         log2_scale, SMALL: tl.constexpr, MASKED: tl.constexpr, EVEN: tl.constexpr):
        """dQ of a query block accumulated over the keys start_n .. start_n + SMALL."""
        cols = start_n + tl.arange(0, SMALL)
        k = _load_rows(K, b, h, k_stride_b, k_stride_h, k_stride_t, cols, dims, seq_len, EVEN)  # (S, D)
        v = _load_rows(V, b, h, v_stride_b, v_stride_h, v_stride_t, cols, dims, seq_len, EVEN)
        probs = tl.math.exp2(tl.dot(q, tl.trans(k)) * log2_scale - lse[:, None])  # (BIG, S)
        if MASKED:
            probs = tl.where(_visible(rows[:, None], cols[None, :], seq_len, EVEN), probs, 0.0)
        dscores = probs * (tl.dot(grad_out, tl.trans(v)) - delta[:, None])
        return dq + tl.dot(dscores.to(k.dtype), k)

    @triton.jit
    def _swap_pairs(x, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
        """x (ROWS, D) with each pair (x[2i], x[2i+1]) exchanged, in registers."""
        even, odd = tl.split(tl.reshape(x, (ROWS, HEAD_DIM // 2, 2)))
        return tl.reshape(tl.join(odd, even), (ROWS, HEAD_DIM))

    @triton.jit
    def _unrotate(grad, cos, sin, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The gradient (ROWS, D) of fnlm.nn.rotate_pairs' output -> that of its input: the
        transpose of x cos + swap(x) sin is g cos + swap(g sin), swap exchanging each pair."""
        return grad * cos + _swap_pairs(grad * sin, ROWS, HEAD_DIM)

    @triton.jit
    def _rotate_kernel(QKV, COS, SIN, OUT, qkv_stride_b, qkv_stride_t, qkv_stride_part, qkv_stride_h,
                       num_heads, seq_len, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
        """ROWS rows of head (b, h) of q (part 0) or k (part 1) of QKV (B, T, 3, H, D), rotated
        as fnlm.nn.rotate_pairs by COS, SIN (T, D) float32, into OUT (B, 2, H, T, D) contiguous."""
        block, bh, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // num_heads, bh % num_heads
        rows = block * ROWS + tl.arange(0, ROWS)
        dims = tl.arange(0, HEAD_DIM)
        in_sequence = (rows < seq_len)[:, None]
        x = tl.load(QKV + b * qkv_stride_b + part * qkv_stride_part + h * qkv_stride_h
                    + rows[:, None] * qkv_stride_t + dims[None, :], mask=in_sequence, other=0.0).to(tl.float32)
        table = rows[:, None] * HEAD_DIM + dims[None, :]
        cos = tl.load(COS + table, mask=in_sequence, other=0.0)
        sin = tl.load(SIN + table, mask=in_sequence, other=0.0)
        rotated = x * cos + _swap_pairs(x, ROWS, HEAD_DIM) * sin
        head = (b * 2 + part) * num_heads + h
        tl.store(OUT + head * seq_len * HEAD_DIM + table, rotated.to(OUT.dtype.element_ty), mask=in_sequence)

    @triton.jit
    def _backward_kernel(
        Q, K, V, DO, LSE, DELTA, GRADS, COS, SIN,
        q_stride_b, q_stride_h, q_stride_t,
        k_stride_b, k_stride_h, k_stride_t,
        v_stride_b, v_stride_h, v_stride_t,
        do_stride_b, do_stride_h, do_stride_t,
        grad_stride_b, grad_stride_part, grad_stride_h, grad_stride_t,
        num_heads, seq_len,
        SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, SMALL: tl.constexpr, BIG: tl.constexpr, EVEN: tl.constexpr,
        ROTARY: tl.constexpr,
    ):
        """Program i of a head computes dK, dV of key block i and dQ of query block i (BIG rows
        each), stepping SMALL rows at a time and recomputing P from the log-sum-exp.

        Key block i meets the queries from block i on, query block i the keys up to block i: the
        two halves together cost every program the same, whatever i, which balances the causal
        triangle. EVEN (T a multiple of BIG): only the diagonal's steps are masked, and no load
        checks the sequence's end. ROTARY: Q and K were rotated by RoPE's tables COS, SIN (T, D);
        dQ and dK are rotated back before they are stored. dQ, dK, dV are parts 0, 1, 2 of GRADS,
        strided as (B, 3, H, T, D) by grad_stride_*."""
        block, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // num_heads, bh % num_heads
        dims = tl.arange(0, HEAD_DIM)
        log2_scale = SCALE * 1.4426950408889634
        start = block * BIG
        diagonal_end = seq_len  # without EVEN every step is masked
        if EVEN:
            diagonal_end = start + BIG

        # dK, dV of key block i
        cols = start + tl.arange(0, BIG)
        k = _load_rows(K, b, h, k_stride_b, k_stride_h, k_stride_t, cols, dims, seq_len, EVEN)  # (BIG, D)
        v = _load_rows(V, b, h, v_stride_b, v_stride_h, v_stride_t, cols, dims, seq_len, EVEN)
        dk = tl.zeros([BIG, HEAD_DIM], tl.float32)
        dv = tl.zeros([BIG, HEAD_DIM], tl.float32)
        for start_m in range(start, tl.minimum(diagonal_end, seq_len), SMALL):
            dk, dv = _backward_kv_step(Q, DO, LSE, DELTA, b, h, bh, q_stride_b, q_stride_h, q_stride_t,
                                       do_stride_b, do_stride_h, do_stride_t, k, v, cols, dims, seq_len,
                                       start_m, dk, dv, log2_scale, SMALL, True, EVEN)
        for start_m in range(diagonal_end, seq_len, SMALL):
            dk, dv = _backward_kv_step(Q, DO, LSE, DELTA, b, h, bh, q_stride_b, q_stride_h, q_stride_t,
                                       do_stride_b, do_stride_h, do_stride_t, k, v, cols, dims, seq_len,
                                       start_m, dk, dv, log2_scale, SMALL, False, EVEN)
        offsets = b * grad_stride_b + h * grad_stride_h + cols[:, None] * grad_stride_t + dims[None, :]  # of dQ
        in_sequence = (cols < seq_len)[:, None]
        if ROTARY:
            table = cols[:, None] * HEAD_DIM + dims[None, :]
            cos = tl.load(COS + table, mask=in_sequence, other=0.0)
            sin = tl.load(SIN + table, mask=in_sequence, other=0.0)
            dk = _unrotate(dk, cos, sin, BIG, HEAD_DIM)
        tl.store(GRADS + grad_stride_part + offsets, (dk * SCALE).to(GRADS.dtype.element_ty), mask=in_sequence)
        tl.store(GRADS + 2 * grad_stride_part + offsets, dv.to(GRADS.dtype.element_ty), mask=in_sequence)

        # dQ of query block i: the same indices, as queries
        rows = cols
        q = _load_rows(Q, b, h, q_stride_b, q_stride_h, q_stride_t, rows, dims, seq_len, EVEN)
        grad_out = _load_rows(DO, b, h, do_stride_b, do_stride_h, do_stride_t, rows, dims, seq_len, EVEN)
        lse, delta = _row_stats(LSE, DELTA, bh, rows, seq_len, EVEN)
        dq = tl.zeros([BIG, HEAD_DIM], tl.float32)
        unmasked_end = 0
        if EVEN:
            unmasked_end = start
        for start_n in range(0, unmasked_end, SMALL):
            dq = _backward_q_step(K, V, b, h, k_stride_b, k_stride_h, k_stride_t, v_stride_b, v_stride_h,
                                  v_stride_t, q, grad_out, lse, delta, rows, dims, seq_len, start_n, dq,
                                  log2_scale, SMALL, False, EVEN)
        for start_n in range(unmasked_end, tl.minimum(start + BIG, seq_len), SMALL):
            dq = _backward_q_step(K, V, b, h, k_stride_b, k_stride_h, k_stride_t, v_stride_b, v_stride_h,
                                  v_stride_t, q, grad_out, lse, delta, rows, dims, seq_len, start_n, dq,
                                  log2_scale, SMALL, True, EVEN)
        if ROTARY:
            dq = _unrotate(dq, cos, sin, BIG, HEAD_DIM)
        tl.store(GRADS + offsets, (dq * SCALE).to(GRADS.dtype.element_ty), mask=in_sequence)

    def _strides(*tensors: Tensor) -> list[int]:
        """(batch, head, time) strides of each (B, H, T, D) tensor, whose last dim must be contiguous."""
        for t in tensors:
            if t.stride(-1) != 1:
                raise ValueError(f"attention kernels need a contiguous last dim, got strides {t.stride()}")
        return [s for t in tensors for s in t.stride()[:3]]

    def _launch_forward(launch, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        batch, heads, seq_len, head_dim = q.shape
        out = torch.empty((batch, seq_len, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)
        block_m, block_n, warps, stages = tuning("forward", head_dim)
        launch(_forward_kernel)[(triton.cdiv(seq_len, block_m), batch * heads)](
            q, k, v, out, lse, *_strides(q, k, v), heads, seq_len,
            SCALE=scale, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, EVEN=seq_len % block_m == 0,
            num_warps=warps, num_stages=stages,
        )
        return out, lse

    def _launch_backward(launch, q, k, v, out, lse, grad_out, scale, grads, grad_strides, tables=None) -> None:
        """Write dq, dk, dv into `grads`, which grad_strides (of its (B, 3, H, T, D) view) lay out;
        with tables (cos, sin (T, D) float32), q and k are RoPE-rotated and dq, dk are rotated back.

        `grads` goes to the kernel whole, with strides, rather than as three views of it: views
        of one buffer written by a kernel are a case of inductor's functional form of kernel
        writes that this code does not rely on."""
        batch, heads, seq_len, head_dim = q.shape
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # (B, H, T): rowsum(dO * O)
        cos, sin = (t.contiguous() for t in tables) if tables is not None else (lse, lse)  # unread without tables
        small, big, warps, stages = tuning("backward", head_dim)
        launch(_backward_kernel)[(triton.cdiv(seq_len, big), batch * heads)](
            q, k, v, grad_out, lse, delta, grads, cos, sin, *_strides(q, k, v, grad_out), *grad_strides[:4],
            heads, seq_len, SCALE=scale, HEAD_DIM=head_dim, SMALL=small, BIG=big, EVEN=seq_len % big == 0,
            ROTARY=tables is not None, num_warps=warps, num_stages=stages,
        )


    @torch.library.triton_op("fnlm::rotate_qk", mutates_args=())
    def _rotate_qk_op(qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """q and k of the projection qkv (B, T, 3, H, D), rotated by cos, sin (T, D) float32:
        (B, 2, H, T, D). One read and one write of each, the swap of each pair in registers
        (inductor lowered it to a gather, and recomputed the rotation in the backward)."""
        batch, seq_len, _, heads, head_dim = qkv.shape
        if qkv.stride(-1) != 1:
            raise ValueError(f"rotate_qk needs a contiguous last dim, got strides {qkv.stride()}")
        out = torch.empty((batch, 2, heads, seq_len, head_dim), dtype=qkv.dtype, device=qkv.device)
        _launcher(_rotate_kernel)[(triton.cdiv(seq_len, ROTATE_ROWS), batch * heads, 2)](
            qkv, cos.contiguous(), sin.contiguous(), out, *qkv.stride()[:4], heads, seq_len,  # the tables as (T, D)
            HEAD_DIM=head_dim, ROWS=ROTATE_ROWS,
        )
        return out

    @torch.library.triton_op("fnlm::causal_attention", mutates_args=())
    def _causal_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """(out (B, H, T, D), log-sum-exp (B, H, T) float32)."""
        return _launch_forward(_launcher, q, k, v, scale)

    @torch.library.triton_op("fnlm::causal_attention_backward", mutates_args=())
    def _causal_attention_backward_op(
        q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, scale: float
    ) -> Tensor:
        """dq, dk, dv stacked: (B, 3, H, T, D)."""
        batch, heads, seq_len, head_dim = q.shape
        grads = torch.empty((batch, 3, heads, seq_len, head_dim), dtype=q.dtype, device=q.device)
        _launch_backward(_launcher, q, k, v, out, lse, grad_out, scale, grads, grads.stride())
        return grads

    @torch.library.triton_op("fnlm::rotary_attention_backward", mutates_args=())
    def _rotary_attention_backward_op(
        q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, cos: Tensor, sin: Tensor,
        scale: float,
    ) -> Tensor:
        """The gradient of the unrotated projection (B, T, 3, H, D) that q, k (rotated) and v came from."""
        batch, heads, seq_len, head_dim = q.shape
        qkv_grad = torch.empty((batch, seq_len, 3, heads, head_dim), dtype=q.dtype, device=q.device)
        strides = qkv_grad.permute(0, 2, 3, 1, 4).stride()  # of its (B, 3, H, T, D) view
        _launch_backward(_launcher, q, k, v, out, lse, grad_out, scale, qkv_grad, strides, (cos, sin))
        return qkv_grad

    class _CausalAttention(torch.autograd.Function):
        """The ops' autograd, in the setup_context style that torch.func transforms require; the
        vmap rule is generated from the ops' own rules (registered below)."""

        generate_vmap_rule = True

        @staticmethod
        def forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
            with torch.no_grad():  # the ops carry no autograd of their own: this class is it
                return torch.ops.fnlm.causal_attention(q, k, v, scale)

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            q, k, v, scale = inputs
            out, lse = output
            ctx.mark_non_differentiable(lse)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.scale = scale

        @staticmethod
        def backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
            q, k, v, out, lse = ctx.saved_tensors
            with torch.no_grad():
                grads = torch.ops.fnlm.causal_attention_backward(q, k, v, out, lse, grad_out, ctx.scale)
            return *grads.unbind(1), None

    def _value_heads(qkv: Tensor) -> Tensor:
        """The values of the projection qkv (B, T, 3, H, D): a (B, H, T, D) view, as fnlm.nn.qkv_heads."""
        return qkv[:, :, 2].transpose(1, 2)

    class _RotaryCausalAttention(torch.autograd.Function):
        """rotary_causal_attention's autograd: the rotation, the attention and the backward by
        their ops. Rotated q and k are saved (the backward reads them block after block) and so
        is the projection, whose v it reads; the two ways of saving less that were measured were
        slower (docs/experiments.md)."""

        generate_vmap_rule = True

        @staticmethod
        def forward(qkv: Tensor, cos: Tensor, sin: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            with torch.no_grad():
                q, k = torch.ops.fnlm.rotate_qk(qkv, cos, sin).unbind(1)
                return *torch.ops.fnlm.causal_attention(q, k, _value_heads(qkv), scale), q, k

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            qkv, cos, sin, scale = inputs
            out, lse, q, k = output
            ctx.mark_non_differentiable(lse, q, k)
            ctx.save_for_backward(qkv, cos, sin, out, lse, q, k)
            ctx.scale = scale

        @staticmethod
        def backward(ctx, grad_out: Tensor, *_grads_of_saved):
            qkv, cos, sin, out, lse, q, k = ctx.saved_tensors
            with torch.no_grad():
                qkv_grad = torch.ops.fnlm.rotary_attention_backward(
                    q, k, _value_heads(qkv), out, lse, grad_out, cos, sin, ctx.scale)
            return qkv_grad, None, None, None

    torch._dynamo.allow_in_graph(_CausalAttention)  # as fnlm.nn's Functions: compiled vmap needs it
    torch._dynamo.allow_in_graph(_RotaryCausalAttention)

    torch.library.register_vmap("fnlm::rotate_qk", _fold_vmap_rule(torch.ops.fnlm.rotate_qk, unbatched=2))
    for _name in ("causal_attention", "causal_attention_backward"):
        torch.library.register_vmap(f"fnlm::{_name}", _fold_vmap_rule(getattr(torch.ops.fnlm, _name)))
    torch.library.register_vmap(
        "fnlm::rotary_attention_backward", _fold_vmap_rule(torch.ops.fnlm.rotary_attention_backward, unbatched=2)
    )
