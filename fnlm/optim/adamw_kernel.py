"""AdamW's step over all leaves as one Triton launch, for CUDA: read p, g, m, v once, write the
step (or the new parameters), m and v.

    out, m, v = adamw_leaves(params, grads, mu, nu, coefficients, b1, b2, eps, weight_decay, apply)

is, elementwise on every leaf (the foreach chain of fnlm.optim.alias.adamw):

    g <- g * clip_scale
    m <- m + (1 - b1) (g - m)                            (m.lerp(g, 1 - b1))
    v <- v b2 + (1 - b2) g^2
    u <- -lr * (m / ((sqrt(v) / sqrt(c2) + eps) c1) + weight_decay * p)
    out <- p + u if apply else u

with coefficients = [clip_scale, c1, 1 / sqrt(c2), -lr], a float32 (4,) tensor on the device: the
step's values (global-norm clip, bias corrections 1 - b^t, scheduled rate), computed once for
all leaves and read by the kernel without a host sync.

Why a kernel: compiled, the update over GPT-2-small's 111 leaves took inductor 22-30 s (a third
of the step's warm-up) to arrive at the same passes over memory. One launch for all leaves, each
program finding its leaf in a table of addresses, takes 0.95x the compiled update's GPU time with
the add to the parameters folded in, and no compile at all (docs/experiments.md). Under
torch.compile the op is opaque (a custom op). `supports` says where it runs; elsewhere (CPU,
float64, vmap) fnlm runs the foreach chain, which TRITON_INTERPRET=1 checks the kernel against.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from ..flash_attention import INTERPRET, triton
from ..tree import is_batched

if triton is not None:
    import triton.language as tl

BLOCK = 2048  # elements a program


def supports(*leaves: Tensor) -> bool:
    """Whether adamw_leaves runs on these tensors (parameters, their gradients and moments)."""
    return (
        triton is not None
        and len(leaves) > 0
        and all((leaf.is_cuda or INTERPRET) and leaf.dtype == torch.float32 and leaf.device == leaves[0].device
                for leaf in leaves)  # one table, one launch
        and not any(map(is_batched, leaves))
    )


def adamw_leaves(
    params: list[Tensor], grads: list[Tensor], mu: list[Tensor], nu: list[Tensor], coefficients: Tensor,
    b1: float, b2: float, eps: float, weight_decay: float, apply: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(steps, or new parameters with apply; new mu; new nu), lists shaped like params."""
    return torch.ops.fnlm.adamw_leaves(params, grads, mu, nu, coefficients, 1 - b1, b2, 1 - b2, eps, weight_decay, apply)


@functools.lru_cache(maxsize=8)
def _block_table(numels: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(numel of each leaf, its first block, the leaf of each block) on device, for leaves of these sizes."""
    blocks = [triton.cdiv(numel, BLOCK) for numel in numels]
    first = torch.tensor([0, *blocks[:-1]]).cumsum(0)
    leaf_of_block = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(blocks))
    return tuple(t.to(device=device, dtype=torch.int64) for t in (torch.tensor(numels), first, leaf_of_block))


if triton is not None:

    @triton.jit
    def _adamw_kernel(ADDRESSES, NUMELS, FIRST_BLOCK, LEAF_OF_BLOCK, COEFFICIENTS,
                      lerp_weight, b2, one_minus_b2, eps, weight_decay, APPLY: tl.constexpr, BLOCK: tl.constexpr):
        block = tl.program_id(0)
        leaf = tl.load(LEAF_OF_BLOCK + block)
        offsets = (block - tl.load(FIRST_BLOCK + leaf)) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < tl.load(NUMELS + leaf)
        row = ADDRESSES + leaf * 7  # p, g, m, v, out, m_out, v_out
        P = tl.load(row).to(tl.pointer_type(tl.float32))
        G = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        M = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        V = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        OUT = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        M_OUT = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        V_OUT = tl.load(row + 6).to(tl.pointer_type(tl.float32))
        clip_scale, correction1 = tl.load(COEFFICIENTS), tl.load(COEFFICIENTS + 1)
        rsqrt_correction2, neg_lr = tl.load(COEFFICIENTS + 2), tl.load(COEFFICIENTS + 3)
        g = tl.load(G + offsets, mask=inside) * clip_scale
        m = tl.load(M + offsets, mask=inside)
        v = tl.load(V + offsets, mask=inside)
        p = tl.load(P + offsets, mask=inside)
        m = m + lerp_weight * (g - m)
        v = v * b2 + one_minus_b2 * g * g
        # IEEE sqrt and division (tl.sqrt and / are approximate), as the foreach ops compute them
        direction = tl.div_rn(m, (tl.sqrt_rn(v) * rsqrt_correction2 + eps) * correction1)
        u = (direction + weight_decay * p) * neg_lr
        tl.store(OUT + offsets, p + u if APPLY else u, mask=inside)
        tl.store(M_OUT + offsets, m, mask=inside)
        tl.store(V_OUT + offsets, v, mask=inside)

    # A custom op: torch.compile keeps it opaque (it could not trace the table of addresses).
    @torch.library.custom_op("fnlm::adamw_leaves", mutates_args=())
    def _adamw_leaves_op(
        params: list[Tensor], grads: list[Tensor], mu: list[Tensor], nu: list[Tensor], coefficients: Tensor,
        lerp_weight: float, b2: float, one_minus_b2: float, eps: float, weight_decay: float, apply: bool,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        inputs = [[t.contiguous() for t in leaves] for leaves in (params, grads, mu, nu)]
        outputs = [[torch.empty_like(t) for t in leaves] for leaves in (params, mu, nu)]
        device = params[0].device
        numels, first_block, leaf_of_block = _block_table(tuple(p.numel() for p in params), device)
        addresses = torch.tensor([[t.data_ptr() for t in leaf] for leaf in zip(*inputs, *outputs)], dtype=torch.int64)
        # pinned, so the copy is asynchronous: the caching host allocator keeps it until the copy ran
        addresses = addresses.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else addresses
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _adamw_kernel[(len(leaf_of_block),)](
                addresses, numels, first_block, leaf_of_block, coefficients.float().contiguous(),
                lerp_weight, b2, one_minus_b2, eps, weight_decay, APPLY=apply, BLOCK=BLOCK,
            )
        return tuple(outputs)

    @_adamw_leaves_op.register_fake
    def _(params, grads, mu, nu, *scalars) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        return tuple([torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in leaves] for leaves in (params, mu, nu))
