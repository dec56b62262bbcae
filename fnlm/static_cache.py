"""Decoding over a preallocated static KV cache: one fixed-shape step per token, compiled by
torch.compile and replayed as a CUDA graph on a GPU.

Shape legend: B batch (prompts), N layers, H heads, C context_length (the cache's slots),
Dh head dim, D d_model, V vocabulary.

The dynamic cache (fnlm.kv_cache) grows by a slot per token, so every step has new shapes and
runs at Python speed. The static cache holds C slots from the start. A step reads one token per
row at slot `slot`, attends over all C slots under a mask computed from tensors (`pad`, `slot`)
plus the new token itself, and returns the new keys and values instead of writing them: a pure
function of fixed shapes, which torch.compile makes one program and a CUDA graph replays with no
Python in between. `append_to_cache` is the pure write; the decoding loop writes in place into
buffers it owns (the buffers a JAX program would donate), beside the step, inside the same graph.

Rows are left-padded as in fnlm.kv_cache: row b's slot j holds its token at position
j - pad[b], and every row writes the same slot at each step. When the cache is full, each row's
window hops as in `window_start` and a prefill, outside the graph, refills the cache; this is
also when the dynamic path re-reads, so both paths see the same windows and choose the same
tokens. Tokens come back to the host once per `TOKENS_PER_SYNC` steps (or at a refill), the only
host syncs of the loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .config import ModelConfig
from .kv_cache import prefill, window_start
from .model import output_logits, residual_block
from .nn import attention_heads, attention_output, embedding, softmax
from .sampling import next_tokens
from .tree import PyTree

TOKENS_PER_SYNC = 16  # steps replayed between reads of the chosen tokens (the stream's granularity)


class StaticCache(NamedTuple):
    """Keys (already rotated by RoPE) and values of C slots per layer, and where rows begin.

    keys, values  (N, B, H, C, Dh)
    pad           (B,) integer: row b's first pad[b] slots are padding
    slot          () integer: slots [0, slot) are filled; the next token is read at `slot`
    """

    keys: Tensor
    values: Tensor
    pad: Tensor
    slot: Tensor


def static_prefill(params: PyTree, cfg: ModelConfig, windows: list[list[int]]) -> tuple[Tensor, StaticCache]:
    """Read B windows of different lengths (at most C), left-padded -> the logits after each (B, V)
    and a static cache whose first max(len) slots hold them."""
    logits, kv = prefill(params, cfg, windows)
    filled = kv.layers[0]["keys"].shape[-2]

    def slots(name: str) -> Tensor:
        read = torch.stack([layer[name] for layer in kv.layers])  # (N, B, H, filled, Dh)
        free = read.new_zeros(*read.shape[:3], cfg.context_length - filled, read.shape[-1])
        return torch.cat([read, free], dim=3)  # (N, B, H, C, Dh)

    slot = torch.tensor(filled, device=kv.pad.device)
    return logits, StaticCache(slots("keys"), slots("values"), kv.pad, slot)


def static_step(params: PyTree, cache: StaticCache, token_ids: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Read one token per row, token_ids (B,), at the cache's slot -> logits (B, V) and the
    token's keys and values (N, B, H, Dh) each, for append_to_cache to write at that slot.

    Every shape is fixed by (B, C): the slot and the padding are tensors, so one compiled
    program (one CUDA graph) serves every step. The caller keeps slot < C.
    """
    slots = torch.arange(cfg.context_length, device=token_ids.device)  # (C,)
    visible = (slots >= cache.pad.unsqueeze(-1)) & (slots < cache.slot)  # (B, C): filled, not padding
    positions = (cache.slot - cache.pad).unsqueeze(-1)  # (B, 1)
    x = embedding(params["token_embeddings"], token_ids.unsqueeze(-1))  # (B, 1, D)
    bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, float("-inf"))
    bias = bias[:, None, None, :]  # (B, 1, 1, C): the same for every head
    new_keys, new_values = [], []
    for layer, keys, values in zip(params["layers"], cache.keys, cache.values):
        attention = _attention_over_slots(layer["attn"], keys, values, positions, bias, cfg)
        x, (k, v) = residual_block(layer, x, cfg, attention)
        new_keys.append(k[:, :, 0])  # (B, H, Dh)
        new_values.append(v[:, :, 0])
    logits = output_logits(params, x, cfg)[:, 0]  # (B, V)
    return logits, torch.stack(new_keys), torch.stack(new_values)


def _attention_over_slots(
    params: PyTree, keys: Tensor, values: Tensor, positions: Tensor, bias: Tensor, cfg: ModelConfig
) -> Callable[[Tensor], tuple[Tensor, tuple[Tensor, Tensor]]]:
    """The attention sublayer for residual_block: h (B, 1, D) -> (out (B, 1, D), (k, v) (B, H, 1, Dh)).

    The new token attends to the visible slots and to itself; its own key and value join the
    softmax as one more column instead of being written into the cache first, which would copy
    the whole cache in a pure function.
    """
    rope_theta = None if cfg.remove_rope else cfg.rope_theta

    def attention(h: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = attention_heads(params, h, cfg.num_heads, positions, rope_theta)  # (B, H, 1, Dh)
        q = q * q.shape[-1] ** -0.5
        scores = torch.cat([q @ keys.transpose(-2, -1) + bias, q @ k.transpose(-2, -1)], dim=-1)  # (B, H, 1, C+1)
        probs = softmax(scores).to(v.dtype)
        heads = probs[..., :-1] @ values + probs[..., -1:] * v  # (B, H, 1, Dh)
        return attention_output(params, heads), (k, v)

    return attention


def append_to_cache(cache: StaticCache, new_keys: Tensor, new_values: Tensor) -> StaticCache:
    """Write a step's keys and values (N, B, H, Dh) at the cache's slot; the slot moves on one."""
    index = cache.slot.view(1)
    keys = cache.keys.index_copy(3, index, new_keys.unsqueeze(3))
    values = cache.values.index_copy(3, index, new_values.unsqueeze(3))
    return StaticCache(keys, values, cache.pad, cache.slot + 1)


def static_lm_step(params: PyTree, cache: StaticCache, token_ids: Tensor, cfg: ModelConfig) -> tuple[Tensor, StaticCache]:
    """token_ids (B,) -> logits (B, V) and the cache holding them: static_step, then append_to_cache."""
    logits, new_keys, new_values = static_step(params, cache, token_ids, cfg)
    return logits, append_to_cache(cache, new_keys, new_values)


# -- the decoding loop -----------------------------------------------------------------------------


def decode_token_fn(cfg: ModelConfig, temperature: float, top_p: float) -> Callable:
    """The pure per-token program: (params, cache, tokens (B,), uniforms (B, S) or None, step ())
    -> (next tokens (B,), new keys, new values (N, B, H, Dh)), drawing with uniforms[:, step]."""

    def decode_token(params: PyTree, cache: StaticCache, tokens: Tensor, uniforms: Tensor | None, step: Tensor):
        logits, new_keys, new_values = static_step(params, cache, tokens, cfg)
        drawn = None if uniforms is None else uniforms.index_select(1, step.view(1)).squeeze(1)  # (B,)
        return next_tokens(logits, drawn, temperature=temperature, top_p=top_p), new_keys, new_values

    return decode_token


@functools.lru_cache(maxsize=16)
def compiled_decode_token(cfg: ModelConfig, temperature: float, top_p: float) -> Callable:
    """decode_token_fn compiled once per process and setting (torch.compile caches by function
    object, so a fresh closure per call would compile again)."""
    return torch.compile(decode_token_fn(cfg, temperature, top_p), fullgraph=True, dynamic=False)


class _Buffers(NamedTuple):
    """The loop's own tensors, written in place: the cache, the latest token of each row (B,),
    the step counter (), the uniforms (B, S) or None, and every chosen token (B, S)."""

    cache: StaticCache
    tokens: Tensor
    step: Tensor
    uniforms: Tensor | None
    chosen: Tensor


def _decode_in_place(decode_token: Callable, params: PyTree, buffers: _Buffers) -> None:
    """One token for every row: the pure program, then its results written into the buffers."""
    cache, tokens, step = buffers.cache, buffers.tokens, buffers.step
    chosen, new_keys, new_values = decode_token(params, cache, tokens, buffers.uniforms, step)
    cache.keys.index_copy_(3, cache.slot.view(1), new_keys.unsqueeze(3))
    cache.values.index_copy_(3, cache.slot.view(1), new_values.unsqueeze(3))
    buffers.chosen.index_copy_(1, step.view(1), chosen.unsqueeze(1))
    tokens.copy_(chosen)
    cache.slot.add_(1)
    step.add_(1)


def _run_and_capture(body: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Run body once, then return what runs it again: on a GPU the replay of a CUDA graph captured
    after that run (made on a side stream, so that compiling and allocating happen outside the
    capture); elsewhere body itself."""
    if device.type != "cuda":
        body()
        return body
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


@torch.no_grad()
def static_steps(
    params: PyTree,
    cfg: ModelConfig,
    sequences: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int | None,
    uniforms: Tensor | None,
    compile: bool,
) -> Iterator[list[int | None]]:
    """Decode checked prompts (extended in place) with the static cache; yields per step each
    prompt's new token or None once it has finished, like fnlm.decode.generate_steps.

    uniforms (B, max_new_tokens) on the model's device: token i of row b is drawn with
    uniforms[b, i] (None at temperature 0).
    """
    if max_new_tokens == 0:
        return
    table = params["token_embeddings"]["weight"]
    device, batch, context = table.device, len(sequences), cfg.context_length
    shape = (cfg.num_layers, batch, cfg.num_heads, context, cfg.head_dim)
    cache = StaticCache(
        table.new_zeros(shape), table.new_zeros(shape), torch.zeros(batch, dtype=torch.long, device=device),
        torch.zeros((), dtype=torch.long, device=device),
    )
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    buffers = _Buffers(cache, zeros, zeros[0].clone(), uniforms, zeros.new_zeros(batch, max_new_tokens))
    decode_token = (compiled_decode_token if compile else decode_token_fn)(cfg, temperature, top_p)
    body = functools.partial(_decode_in_place, decode_token, params, buffers)
    replay = None  # captured at the first decode step, after the first token is out

    running = set(range(batch))
    done, filled = 0, context  # tokens chosen so far; slots filled (the host's copy of cache.slot)
    while done < max_new_tokens and running:
        if filled == context:  # the first token, or a full cache: (re)read every row's window
            windows = [seq[window_start(len(seq), context):] if row in running else seq[-1:]
                       for row, seq in enumerate(sequences)]
            logits, fresh = static_prefill(params, cfg, windows)
            for buffer, value in zip(cache, fresh):
                buffer.copy_(value)
            drawn = None if uniforms is None else uniforms[:, done]
            chosen = next_tokens(logits, drawn, temperature=temperature, top_p=top_p)
            buffers.chosen[:, done] = chosen
            buffers.tokens.copy_(chosen)
            buffers.step.fill_(done + 1)
            count, filled = 1, len(max(windows, key=len))
        else:
            count = min(TOKENS_PER_SYNC, context - filled, max_new_tokens - done)
            for _ in range(count):
                if replay is None:
                    replay = _run_and_capture(body, device)  # its run is this step
                else:
                    replay()
            filled += count
        for column in buffers.chosen[:, done:done + count].T.tolist():  # the one host sync
            step: list[int | None] = [None] * batch
            for row in sorted(running):
                step[row] = column[row]
                sequences[row].append(column[row])
                if column[row] == eos_id:
                    running.discard(row)
            yield step
            if not running:
                return
        done += count
