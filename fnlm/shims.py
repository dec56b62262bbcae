"""Thin nn.Module shims over the pure functions, for code that expects modules.

A shim registers a parameter tree as nn.Parameters (dicts become submodules, lists become
ModuleLists), so `state_dict()` keys equal `flatten(params)`, and its forward calls the pure
function on `self.params()`. The optimizer shim (AdamW) and `clip_gradients_` likewise run
fnlm.optim's pure transformations and only write their results in place. No math lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .nn import multihead_self_attention
from .config import ModelConfig
from .model import attention_spec, block_spec, lm_spec, materialize, transformer_block, transformer_lm
from .optim import (
    GradientTransformation,
    ScaleByAdamState,
    adamw,
    clip_by_global_norm,
    find_state,
    replace_state,
)
from .tree import PyTree


class TreeModule(nn.Module):
    """Holds a parameter tree as nn.Parameters; `params()` gives the tree back (same tensors)."""

    def __init__(self, params: PyTree) -> None:
        super().__init__()
        for name, sub in params.items():
            if isinstance(sub, Tensor):
                self.register_parameter(name, nn.Parameter(sub))
            elif isinstance(sub, list):
                self.add_module(name, nn.ModuleList(TreeModule(item) for item in sub))
            else:
                self.add_module(name, TreeModule(sub))

    def params(self) -> PyTree:
        tree: dict = dict(self._parameters)
        for name, child in self._modules.items():
            if isinstance(child, nn.ModuleList):
                tree[name] = [item.params() for item in child]
            else:
                tree[name] = child.params()
        return tree


def _sampled(spec: PyTree, seed: int, device, dtype) -> PyTree:
    return materialize(spec, seed=seed, device=device or "cpu", dtype=dtype or torch.float32)


class MultiHeadSelfAttention(TreeModule):
    """Causal; with RoPE when theta is given."""

    def __init__(self, d_model: int, num_heads: int, theta: float | None = None, device=None, dtype=None, *, seed: int = 0):
        super().__init__(_sampled(attention_spec(d_model), seed, device, dtype))
        self.num_heads, self.theta = num_heads, theta

    def forward(self, x: Tensor, token_positions: Tensor | None = None) -> Tensor:
        return multihead_self_attention(
            self.params(), x, self.num_heads, token_positions=token_positions, rope_theta=self.theta
        )


class TransformerBlock(TreeModule):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None, *, seed: int = 0):
        super().__init__(_sampled(block_spec(cfg), seed, device, dtype))
        self.cfg = cfg

    def forward(self, x: Tensor, token_positions: Tensor | None = None) -> Tensor:
        return transformer_block(self.params(), x, self.cfg, token_positions)


class TransformerLM(TreeModule):
    """The whole LM; pass `params` to wrap an existing tree instead of sampling one."""

    def __init__(self, cfg: ModelConfig, params: PyTree | None = None, device=None, dtype=None, *, seed: int = 0):
        super().__init__(params if params is not None else _sampled(lm_spec(cfg), seed, device, dtype))
        self.cfg = cfg

    def forward(self, token_ids: Tensor) -> Tensor:
        return transformer_lm(self.params(), token_ids, self.cfg)


class AdamW(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose step() runs fnlm.optim.adamw's pure update.

    Per-parameter state keeps PyTorch AdamW's format (step, exp_avg, exp_avg_sq), so
    state_dict() / load_state_dict() round-trip, also with torch's own AdamW.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        adamw(lr, *betas, eps, weight_decay)  # validates the hyperparameters, naming the bad one
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            optimizer = adamw(group["lr"], *group["betas"], group["eps"], group["weight_decay"])
            # Parameters that skipped steps (grad None) have smaller counts; update each count's set together.
            by_count: dict[int, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_count.setdefault(int(self.state[p].get("step", 0)), []).append(p)
            for count, params in by_count.items():
                self._update(optimizer, count, params)
        return loss

    def _update(self, optimizer: GradientTransformation, count: int, params: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        adam = ScaleByAdamState(
            torch.tensor(count, dtype=torch.int32, device=params[0].device),
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
        )
        opt_state = replace_state(optimizer.init([]), ScaleByAdamState, adam)
        updates, opt_state = optimizer.update([p.grad for p in params], opt_state, params)
        torch._foreach_add_(params, updates)
        adam = find_state(opt_state, ScaleByAdamState)
        for state, exp_avg, exp_avg_sq in zip(states, adam.mu, adam.nu):
            state.update(step=torch.tensor(float(count + 1)), exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


def clip_gradients_(parameters: Tensor | Iterable[Tensor], max_l2_norm: float) -> Tensor:
    """Clip the .grad of `parameters` in place to a global L2 norm of at most `max_l2_norm`.

    The norm is over all gradients together; parameters whose grad is None are skipped. Returns
    the norm before clipping. The arithmetic is fnlm.optim.clip_by_global_norm's.
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    clip = clip_by_global_norm(max_l2_norm)
    if not grads:
        return torch.zeros(())
    with torch.no_grad():
        clipped, state = clip.update(grads, clip.init(grads))
        torch._foreach_copy_(grads, clipped)
    return state.grad_norm
