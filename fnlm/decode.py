"""Text generation: samplers over logits, a KV cache, and `generate` (handout section 6).

Shape legend: B batch (prompts), T tokens read in one call, L cache slots, V vocabulary,
H heads, Dh head dim, C context_length.

Samplers are pure functions of logits or probabilities; the ones that draw take a
`torch.Generator` explicitly. `generate` gives each prompt its own generator, so a batch of
prompts yields exactly what decoding each prompt alone would.

Context policy. The model reads at most C tokens. Once a sequence outgrows that, its window
jumps forward by half a context (`window_start`), keeping the most recent tokens, and the cache
is rebuilt from the new window. Cached and uncached decoding follow the same policy, so they
give the same logits and, with the same generators, the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .config import ModelConfig
from .model import check_token_ids, output_logits, residual_block, transformer_lm
from .nn import attention_heads, attention_output, embedding, scaled_dot_product_attention, softmax
from .tree import PyTree, tree_map

# -- samplers --------------------------------------------------------------------------------------


def greedy(logits: Tensor) -> Tensor:
    """logits (..., V) -> (...) the most likely token; ties go to the lowest id."""
    return logits.argmax(-1)


def temperature_probs(logits: Tensor, temperature: float) -> Tensor:
    """logits (..., V) -> probs (..., V) = softmax(logits / temperature), temperature > 0.

    Computed in float32 at least. Shifting by the max first keeps logits / temperature finite
    however small the temperature: the max goes to 0 and the rest towards -inf, so the limit is
    greedy's one-hot rather than NaN.
    """
    check_temperature(temperature)
    if temperature == 0:
        raise ValueError("temperature_probs needs temperature > 0; temperature 0 is greedy()")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return softmax((logits - logits.amax(-1, keepdim=True)) / temperature)


def top_p_probs(probs: Tensor, top_p: float) -> Tensor:
    """probs (..., V) -> the nucleus: the smallest set of most likely tokens whose mass reaches
    top_p, renormalised; every other token gets 0. top_p = 1 keeps every token.

    A stable sort breaks ties between equal probabilities by the lower id, so the set is
    deterministic.
    """
    check_top_p(top_p)
    if top_p == 1:  # keep all, even tail tokens a rounded cumulative sum would call surplus
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (..., V) each
    # Mass strictly before each rank: a token is needed while what precedes it is still short of p.
    mass_before = sorted_probs.cumsum(-1).roll(1, dims=-1)
    mass_before[..., 0] = 0
    keep = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
    kept = probs.masked_fill(~keep, 0)
    return kept / kept.sum(-1, keepdim=True)


def sample_probs(probs: Tensor, generator: torch.Generator) -> Tensor:
    """probs (..., V) -> (...) one token drawn from each distribution with `generator`.

    The draw runs on the generator's device, so a CPU generator gives the same tokens whichever
    device holds the probabilities.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    rows = probs.reshape(-1, probs.shape[-1]).to(generator.device)  # (N, V)
    tokens = torch.multinomial(rows, 1, generator=generator)  # (N, 1)
    return tokens.reshape(probs.shape[:-1]).to(probs.device)


def next_token_probs(logits: Tensor, *, temperature: float, top_p: float = 1.0) -> Tensor:
    """logits (..., V) -> the distribution the next token is drawn from: temperature, then top-p.

    Temperature 0 is greedy: the one-hot of the argmax.
    """
    check_top_p(top_p)
    if temperature == 0:
        check_temperature(temperature)
        probs = torch.zeros_like(logits, dtype=torch.promote_types(logits.dtype, torch.float32))
        return probs.scatter(-1, greedy(logits).unsqueeze(-1), 1.0)
    return top_p_probs(temperature_probs(logits, temperature), top_p)


def sample_logits(
    logits: Tensor, generator: torch.Generator | None, *, temperature: float = 1.0, top_p: float = 1.0
) -> Tensor:
    """logits (..., V) -> (...) the next token: greedy at temperature 0 (no draw, the generator
    may be None), else drawn from next_token_probs."""
    if temperature == 0:
        check_temperature(temperature)
        check_top_p(top_p)
        return greedy(logits)
    if generator is None:
        raise TypeError("generator is required to sample at temperature > 0 (there is no global RNG)")
    return sample_probs(next_token_probs(logits, temperature=temperature, top_p=top_p), generator)


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")


def check_top_p(top_p: float) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a number, got {type(top_p).__name__}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# -- KV cache --------------------------------------------------------------------------------------


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


# -- generation ------------------------------------------------------------------------------------

# Reads the model on the running prompts' sequences (given by row) and returns the next-token
# logits (len(rows), V) with whatever state it keeps between steps.
Reader = Callable[[list[list[int]], list[int], object], tuple[Tensor, object]]


class _CachedView(NamedTuple):
    cache: KVCache
    rows: list[int]  # the prompt each batch row of the cache belongs to
    starts: list[int]  # each row's window start


def _read_cached(params: PyTree, cfg: ModelConfig) -> Reader:
    def read(sequences: list[list[int]], rows: list[int], view: _CachedView | None) -> tuple[Tensor, _CachedView]:
        starts = [window_start(len(sequences[row]), cfg.context_length) for row in rows]
        if view is None or starts != [view.starts[view.rows.index(row)] for row in rows]:
            # First step, or a window hopped: read every row's window afresh.
            logits, cache = prefill(params, cfg, [sequences[row][start:] for row, start in zip(rows, starts)])
            return logits, _CachedView(cache, rows, starts)
        cache = view.cache
        if rows != view.rows:  # finished prompts leave the batch
            keep = torch.tensor([view.rows.index(row) for row in rows], device=cache.pad.device)
            cache = tree_map(lambda leaf: leaf[keep], cache)
        latest = torch.tensor([[sequences[row][-1]] for row in rows], device=cache.pad.device)  # (B, 1)
        logits, cache = cached_lm(params, latest, cache, cfg)
        return logits[:, -1], _CachedView(cache, rows, starts)

    return read


def _read_uncached(params: PyTree, cfg: ModelConfig) -> Reader:
    """The definition: the whole model on each row's window, every step."""
    device = params["token_embeddings"]["weight"].device

    def read(sequences: list[list[int]], rows: list[int], state: None) -> tuple[Tensor, None]:
        logits = []
        for row in rows:
            window = sequences[row][window_start(len(sequences[row]), cfg.context_length):]
            logits.append(transformer_lm(params, torch.tensor([window], device=device), cfg)[0, -1])
        return torch.stack(logits), None

    return read


def generate_steps(
    params: PyTree,
    cfg: ModelConfig,
    prompt_ids: Sequence[Sequence[int]] | Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: Sequence[torch.Generator] | None = None,
    use_cache: bool = True,
    truncate_prompt: bool = False,
) -> Iterator[list[int | None]]:
    """Decode a batch of prompts step by step: yields, per step, each prompt's new token, or None
    for a prompt that has already finished. Arguments as for `generate`, with a batch of prompts
    and one generator per prompt. Arguments are checked here, before the first step."""
    prompts = _check_prompts(prompt_ids, cfg, truncate_prompt)
    generators = _check_generators(generator, len(prompts), temperature)
    _check_decoding(cfg, max_new_tokens, temperature, top_p, eos_id)
    read = (_read_cached if use_cache else _read_uncached)(params, cfg)
    return _steps(read, prompts, generators, max_new_tokens, temperature, top_p, eos_id)


@torch.no_grad()  # on a generator function torch sets no-grad around each step, not between them
def _steps(
    read: Reader,
    sequences: list[list[int]],
    generators: list[torch.Generator | None],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int | None,
) -> Iterator[list[int | None]]:
    running, state = list(range(len(sequences))), None
    for _ in range(max_new_tokens):
        logits, state = read(sequences, running, state)  # (len(running), V)
        step: list[int | None] = [None] * len(sequences)
        for row, row_logits in zip(running, logits):
            # One draw per prompt from its own generator: the batch does not change a prompt's tokens.
            token = int(sample_logits(row_logits, generators[row], temperature=temperature, top_p=top_p))
            sequences[row].append(token)
            step[row] = token
        yield step
        running = [row for row in running if step[row] != eos_id]
        if not running:
            return


def generate(
    params: PyTree,
    cfg: ModelConfig,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]] | Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    use_cache: bool = True,
    truncate_prompt: bool = False,
) -> list[int] | list[list[int]]:
    """Complete one prompt or a batch of prompts of different lengths.

    prompt_ids   one prompt (a list of ids or a (T,) tensor) -> one completion (a list of ids);
                 a batch (a list of lists or a (B, T) tensor) -> a list of completions
    max_new_tokens  the most tokens each completion gets
    temperature  0 is greedy; otherwise logits are divided by it before the softmax
    top_p        nucleus sampling: draw from the smallest set of tokens whose mass reaches top_p
    eos_id       a completion stops after this token (and includes it); None: only the limit
    generator    one torch.Generator per prompt (a single one for a single prompt): each prompt
                 draws only from its own, so a batch gives exactly the completions that its
                 prompts give alone. May be None at temperature 0.
    use_cache    decode with the KV cache; False re-reads the window at every step (the same
                 tokens, slower: the reference and the benchmark's peer)
    truncate_prompt  a prompt longer than context_length keeps its last context_length tokens;
                 without it such a prompt is a ValueError
    Completions hold new tokens only. The model reads at most context_length tokens: see
    `window_start` for what it sees of longer sequences.
    """
    single = _is_single_prompt(prompt_ids)
    if single:
        prompt_ids = [prompt_ids]
        if isinstance(generator, torch.Generator):
            generator = [generator]
    completions: list[list[int]] = []
    for step in generate_steps(
        params, cfg, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        eos_id=eos_id, generator=generator, use_cache=use_cache, truncate_prompt=truncate_prompt,
    ):
        completions = completions or [[] for _ in step]
        for completion, token in zip(completions, step):
            if token is not None:
                completion.append(token)
    completions = completions or [[] for _ in range(1 if single else len(prompt_ids))]
    return completions[0] if single else completions


# -- argument checks -------------------------------------------------------------------------------


def _is_single_prompt(prompt_ids: object) -> bool:
    if isinstance(prompt_ids, Tensor):
        return prompt_ids.ndim == 1
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise TypeError(f"prompt_ids must be a list of token ids, a list of such lists or a tensor, "
                        f"got {type(prompt_ids).__name__}")
    return len(prompt_ids) == 0 or not isinstance(prompt_ids[0], (Sequence, Tensor))


def _check_prompts(prompt_ids: Sequence[Sequence[int]] | Tensor, cfg: ModelConfig, truncate: bool) -> list[list[int]]:
    """A batch of prompts -> lists of ints, each non-empty, in the vocabulary and (cut to) the context."""
    if isinstance(prompt_ids, Tensor) and prompt_ids.ndim != 2:
        raise ValueError(f"a batch of prompt_ids must be a (B, T) tensor, got shape {tuple(prompt_ids.shape)}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids holds no prompts")
    prompts = []
    for index, prompt in enumerate(prompt_ids):
        ids = torch.as_tensor(prompt if isinstance(prompt, Tensor) else list(prompt))
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"prompt {index} must be a non-empty list of token ids, got shape {tuple(ids.shape)}")
        if len(ids) > cfg.context_length:
            if not truncate:
                raise ValueError(
                    f"prompt {index} has {len(ids)} tokens, more than context_length {cfg.context_length}; "
                    f"pass truncate_prompt=True to keep its last {cfg.context_length}"
                )
            ids = ids[-cfg.context_length:]
        check_token_ids(ids, cfg)
        prompts.append(ids.tolist())
    return prompts


def _check_generators(generator: object, num_prompts: int, temperature: float) -> list[torch.Generator | None]:
    if generator is None:
        if temperature != 0:
            raise TypeError("generator is required to sample at temperature > 0 (there is no global RNG)")
        return [None] * num_prompts
    if isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: pass one torch.Generator per prompt ({num_prompts}), so that a prompt's tokens "
            "do not depend on the rest of the batch"
        )
    generators = list(generator)
    if len(generators) != num_prompts or not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError(f"generator must be {num_prompts} torch.Generator(s), one per prompt, got {generator!r}")
    return generators


def _check_decoding(cfg: ModelConfig, max_new_tokens: int, temperature: float, top_p: float, eos_id: int | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_temperature(temperature)
    check_top_p(top_p)
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                               or not 0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"eos_id must be None or a token id in [0, {cfg.vocab_size}), got {eos_id!r}")
