"""The dynamic KV cache: keys and values that grow by one slot per token read.

Shape legend: B batch (prompts), T tokens read in one call, L cache slots, V vocabulary,
H heads, Dh head dim, C context_length.

Context policy. The model reads at most C tokens. Once a sequence outgrows that, its window
jumps forward by half a context (`window_start`), keeping the most recent tokens, and the cache
is rebuilt from the new window. Every decoding path (uncached, this cache, the static cache of
fnlm.static_cache) follows the same policy, so they give the same logits and the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .config import ModelConfig
from .model import check_token_ids, output_logits, residual_block
from .nn import attention_heads, attention_output, embedding, scaled_dot_product_attention
from .tree import PyTree


class KVCache(NamedTuple):
    """What the model has read so far: per layer the keys (already rotated by RoPE) and values of
    every slot, left-padded so that each row's latest token sits in the last slot.

    layers  per layer {"keys": (B, H, L, Dh), "values": (B, H, L, Dh)}
    pad     (B,) integer: row b's first pad[b] slots are padding, and its slot j holds the token
            at position j - pad[b]
    Every leaf leads with B, so `tree_map(lambda leaf: leaf[rows], cache)` selects rows.
    """

    layers: list[dict[str, Tensor]]
    pad: Tensor


def empty_cache(cfg: ModelConfig, pad: Tensor, *, dtype: torch.dtype) -> KVCache:
    """A cache with no slots yet for B = len(pad) rows, on pad's device."""
    empty = torch.zeros(len(pad), cfg.num_heads, 0, cfg.head_dim, dtype=dtype, device=pad.device)
    return KVCache([{"keys": empty, "values": empty} for _ in range(cfg.num_layers)], pad)


def cached_lm(params: PyTree, token_ids: Tensor, cache: KVCache, cfg: ModelConfig) -> tuple[Tensor, KVCache]:
    """Read token_ids (B, T) after the cache's L slots -> logits (B, T, V) and the cache with L + T.

    Row b's new tokens sit at positions L - pad[b] ... and attend to its non-padding slots up to
    their own, so the logits equal transformer_lm's on each row's unpadded sequence.
    The cache grows by concatenation rather than by an out-of-place index_copy into a
    preallocated (B, H, C, Dh) buffer, which copies the whole buffer at every step: at the
    TinyStories shapes over 256 steps, growth plus attention took 0.5-1.0 ms a step against
    0.7-1.4 ms for the buffer on 2 CPU threads (even at 16), and it needs no fill counter.
    """
    check_token_ids(token_ids, cfg)
    num_read, num_new = cache.layers[0]["keys"].shape[-2], token_ids.shape[-1]
    slots = torch.arange(num_read + num_new, device=token_ids.device)  # (L+T,)
    positions = slots[num_read:] - cache.pad.unsqueeze(-1)  # (B, T); negative on padding
    if num_read + num_new - int(cache.pad.min()) > cfg.context_length:
        raise ValueError(
            f"the cache holds {num_read - int(cache.pad.min())} tokens; reading {num_new} more exceeds "
            f"context_length {cfg.context_length}"
        )
    not_padding = slots >= cache.pad.view(-1, 1, 1)  # (B, 1, L+T)
    not_future = slots <= slots[num_read:].unsqueeze(-1)  # (T, L+T)
    mask = (not_padding & not_future).unsqueeze(1)  # (B, 1, T, L+T): the same for every head
    x = embedding(params["token_embeddings"], token_ids)  # (B, T, D)
    layers = []
    for layer, kv in zip(params["layers"], cache.layers):
        attention = _cached_attention(layer["attn"], kv, positions, mask, cfg)
        x, kv = residual_block(layer, x, cfg, attention)
        layers.append(kv)
    return output_logits(params, x, cfg), KVCache(layers, cache.pad)


def _cached_attention(
    params: PyTree, kv: dict[str, Tensor], positions: Tensor, mask: Tensor, cfg: ModelConfig
) -> Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]:
    """The attention sublayer for residual_block: h (B, T, D) -> (out (B, T, D), the grown kv)."""
    rope_theta = None if cfg.remove_rope else cfg.rope_theta

    def attention(h: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        q, k, v = attention_heads(params, h, cfg.num_heads, positions, rope_theta)  # (B, H, T, Dh)
        keys = torch.cat([kv["keys"], k], dim=-2)  # (B, H, L+T, Dh)
        values = torch.cat([kv["values"], v], dim=-2)
        heads = scaled_dot_product_attention(q, keys, values, mask)  # (B, H, T, Dh)
        return attention_output(params, heads), {"keys": keys, "values": values}

    return attention


def prefill(params: PyTree, cfg: ModelConfig, windows: Sequence[Sequence[int]]) -> tuple[Tensor, KVCache]:
    """Read B windows of different lengths, left-padded -> the logits after each (B, V) and the cache."""
    table = params["token_embeddings"]["weight"]
    longest = max(len(window) for window in windows)
    pad = torch.tensor([longest - len(window) for window in windows], device=table.device)
    # Padding reads token 0; the mask hides it from every real token.
    token_ids = torch.tensor([[0] * (longest - len(w)) + list(w) for w in windows], device=table.device)
    logits, cache = cached_lm(params, token_ids, empty_cache(cfg, pad, dtype=table.dtype), cfg)
    return logits[:, -1], cache


def window_start(length: int, context_length: int) -> int:
    """Where the model's view of a `length`-token sequence begins: 0 while it fits the context,
    then forward in hops of half a context, so the window always holds the latest tokens and
    more than half a context of them.

    Hopping by half rather than sliding by one keeps the cache useful: a one-token slide would
    re-read the whole window at every step, as uncached decoding does.
    """
    if length <= context_length:
        return 0
    hop = max(1, context_length // 2)
    return hop * -(-(length - context_length) // hop)  # ceil((length - C) / hop) hops
