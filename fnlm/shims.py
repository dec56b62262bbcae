"""Thin nn.Module shims over the pure functions, for code that expects modules.

A shim registers a parameter tree as nn.Parameters (dicts become submodules, lists become
ModuleLists), so `state_dict()` keys equal `flatten(params)`, and its forward calls the pure
function on `self.params()`. No math lives here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .nn import embedding, linear, multihead_self_attention, rmsnorm, rope, swiglu
from .config import ModelConfig
from .model import (
    attention_spec,
    block_spec,
    embedding_spec,
    ffn_spec,
    linear_spec,
    lm_spec,
    materialize,
    rmsnorm_spec,
    transformer_block,
    transformer_lm,
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


class Linear(TreeModule):
    def __init__(self, in_features: int, out_features: int, device=None, dtype=None, *, seed: int = 0):
        super().__init__(_sampled(linear_spec(in_features, out_features), seed, device, dtype))

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.params(), x)


class Embedding(TreeModule):
    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None, *, seed: int = 0):
        super().__init__(_sampled(embedding_spec(num_embeddings, embedding_dim), seed, device, dtype))

    def forward(self, token_ids: Tensor) -> Tensor:
        return embedding(self.params(), token_ids)


class RMSNorm(TreeModule):
    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(_sampled(rmsnorm_spec(d_model), 0, device, dtype))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rmsnorm(self.params(), x, self.eps)


class SwiGLU(TreeModule):
    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None, *, seed: int = 0):
        super().__init__(_sampled(ffn_spec(d_model, d_ff), seed, device, dtype))

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(self.params(), x)


class RotaryPositionalEmbedding(nn.Module):
    """RoPE has no parameters; positions at or beyond max_seq_len are an error."""

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
        self.theta, self.d_k, self.max_seq_len = theta, d_k, max_seq_len

    def forward(self, x: Tensor, token_positions: Tensor) -> Tensor:
        if token_positions.numel() and int(token_positions.max()) >= self.max_seq_len:
            raise ValueError(f"token position {int(token_positions.max())} >= max_seq_len {self.max_seq_len}")
        return rope(x, token_positions, self.theta)


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
