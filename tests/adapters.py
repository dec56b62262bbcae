"""The CS336 adapter contract (see ADAPTERS.md): glue from state-dict tensors to fnlm's pytrees.

No algorithm lives here: every function converts its arguments and calls fnlm.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import IO, Any, BinaryIO

import numpy.typing as npt
import torch
from torch import Tensor

from fnlm import nn as fnn
from fnlm.config import ModelConfig
from fnlm.model import block_spec, lm_spec, transformer_block, transformer_lm
from fnlm.tree import unflatten


def _lm_config(vocab_size, context_length, d_model, num_layers, num_heads, d_ff, rope_theta) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, context_length=context_length, d_model=d_model,
        num_layers=num_layers, num_heads=num_heads, d_ff=d_ff, rope_theta=rope_theta,
    )


def run_linear(d_in: int, d_out: int, weights: Tensor, in_features: Tensor) -> Tensor:
    return fnn.linear({"weight": weights}, in_features)


def run_embedding(vocab_size: int, d_model: int, weights: Tensor, token_ids: Tensor) -> Tensor:
    return fnn.embedding({"weight": weights}, token_ids)


def run_swiglu(d_model: int, d_ff: int, w1_weight: Tensor, w2_weight: Tensor, w3_weight: Tensor, in_features: Tensor) -> Tensor:
    params = {"w1": {"weight": w1_weight}, "w2": {"weight": w2_weight}, "w3": {"weight": w3_weight}}
    return fnn.swiglu(params, in_features)


def run_scaled_dot_product_attention(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None) -> Tensor:
    return fnn.scaled_dot_product_attention(Q, K, V, mask)


def run_multihead_self_attention(
    d_model: int, num_heads: int, q_proj_weight: Tensor, k_proj_weight: Tensor, v_proj_weight: Tensor,
    o_proj_weight: Tensor, in_features: Tensor,
) -> Tensor:
    params = _attention_params(q_proj_weight, k_proj_weight, v_proj_weight, o_proj_weight)
    return fnn.multihead_self_attention(params, in_features, num_heads)


def run_multihead_self_attention_with_rope(
    d_model: int, num_heads: int, max_seq_len: int, theta: float, q_proj_weight: Tensor,
    k_proj_weight: Tensor, v_proj_weight: Tensor, o_proj_weight: Tensor, in_features: Tensor,
    token_positions: Tensor | None = None,
) -> Tensor:
    params = _attention_params(q_proj_weight, k_proj_weight, v_proj_weight, o_proj_weight)
    return fnn.multihead_self_attention(
        params, in_features, num_heads, token_positions=token_positions, rope_theta=theta
    )


def _attention_params(q: Tensor, k: Tensor, v: Tensor, o: Tensor) -> dict:
    return {"q_proj": {"weight": q}, "k_proj": {"weight": k}, "v_proj": {"weight": v}, "output_proj": {"weight": o}}


def run_rope(d_k: int, theta: float, max_seq_len: int, in_query_or_key: Tensor, token_positions: Tensor) -> Tensor:
    return fnn.rope(in_query_or_key, token_positions, theta)


def run_transformer_block(
    d_model: int, num_heads: int, d_ff: int, max_seq_len: int, theta: float, weights: dict[str, Tensor],
    in_features: Tensor,
) -> Tensor:
    # A block needs no vocabulary: vocab_size=1 only satisfies the config's validation.
    cfg = _lm_config(1, max_seq_len, d_model, 1, num_heads, d_ff, theta)
    return transformer_block(unflatten(weights, like=block_spec(cfg)), in_features, cfg)


def run_transformer_lm(
    vocab_size: int, context_length: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
    rope_theta: float, weights: dict[str, Tensor], in_indices: Tensor,
) -> Tensor:
    cfg = _lm_config(vocab_size, context_length, d_model, num_layers, num_heads, d_ff, rope_theta)
    return transformer_lm(unflatten(weights, like=lm_spec(cfg)), in_indices, cfg)


def run_rmsnorm(d_model: int, eps: float, weights: Tensor, in_features: Tensor) -> Tensor:
    return fnn.rmsnorm({"weight": weights}, in_features, eps)


def run_silu(in_features: Tensor) -> Tensor:
    return fnn.silu(in_features)


def run_get_batch(dataset: npt.NDArray, batch_size: int, context_length: int, device: str) -> tuple[Tensor, Tensor]:
    from fnlm.data import get_batch

    # The contract passes no generator: draw from torch's default one, as conventional code would.
    return get_batch(dataset, batch_size, context_length, device, generator=torch.default_generator)


def run_softmax(in_features: Tensor, dim: int) -> Tensor:
    return fnn.softmax(in_features, dim)


def run_cross_entropy(inputs: Tensor, targets: Tensor) -> Tensor:
    return fnn.cross_entropy(inputs, targets)


def run_gradient_clipping(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float) -> None:
    from fnlm.shims import clip_gradients_

    clip_gradients_(parameters, max_l2_norm)


def get_adamw_cls() -> type[torch.optim.Optimizer]:
    from fnlm.shims import AdamW

    return AdamW


def run_get_lr_cosine_schedule(
    it: int, max_learning_rate: float, min_learning_rate: float, warmup_iters: int, cosine_cycle_iters: int
) -> float:
    from fnlm.optim import schedule_value, warmup_cosine_schedule

    schedule = warmup_cosine_schedule(max_learning_rate, min_learning_rate, warmup_iters, cosine_cycle_iters)
    return schedule_value(schedule, it)


def run_save_checkpoint(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
    out: str | os.PathLike | BinaryIO | IO[bytes],
) -> None:
    from fnlm.checkpoint import save_module_checkpoint

    save_module_checkpoint(model, optimizer, iteration, out)


def run_load_checkpoint(
    src: str | os.PathLike | BinaryIO | IO[bytes], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> int:
    from fnlm.checkpoint import load_module_checkpoint

    return load_module_checkpoint(src, model, optimizer)


def get_tokenizer(
    vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_tokens: list[str] | None = None
) -> Any:
    from fnlm.tokenizer import Tokenizer

    return Tokenizer(vocab, merges, special_tokens)


def run_train_bpe(
    input_path: str | os.PathLike, vocab_size: int, special_tokens: list[str], **kwargs: Any
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    from fnlm.tokenizer import train_bpe

    return train_bpe(input_path, vocab_size, special_tokens, **kwargs)
