"""Text generation (handout section 6): `generate` and its streaming form `generate_steps`.

Shape legend: B batch (prompts), V vocabulary, C context_length.

Three paths choose the same tokens, given the same uniforms: the whole model on each window at
every step (the reference), the dynamic KV cache (fnlm.kv_cache, the CPU default), and the static
KV cache (fnlm.static_cache: fixed shapes, torch.compile and CUDA graphs). Randomness comes from
one torch.Generator per prompt, which draws that prompt's uniforms before the first step
(fnlm.sampling), so a batch of prompts yields exactly what decoding each prompt alone would.
The model reads at most C tokens of a sequence: see `window_start`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .config import ModelConfig
from .kv_cache import KVCache, cached_lm, empty_cache, prefill, window_start
from .model import check_token_ids, transformer_lm
from .sampling import (
    check_temperature,
    check_top_p,
    draw_uniforms,
    greedy,
    next_token_probs,
    next_tokens,
    sample_logits,
    sample_probs,
    sample_uniform,
    temperature_probs,
    top_p_probs,
)
from .static_cache import StaticCache, static_lm_step, static_prefill, static_step, static_steps
from .tree import PyTree, tree_map

__all__ = [
    "KVCache", "StaticCache", "cached_lm", "check_temperature", "check_top_p", "draw_uniforms", "empty_cache",
    "generate", "generate_steps", "greedy", "next_token_probs", "next_tokens", "prefill", "sample_logits",
    "sample_probs", "sample_uniform", "static_lm_step", "static_prefill", "static_step", "temperature_probs",
    "top_p_probs", "window_start",
]

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
    static_cache: bool = False,
    compile: bool = False,
    truncate_prompt: bool = False,
) -> Iterator[list[int | None]]:
    """Decode a batch of prompts step by step: yields, per step, each prompt's new token, or None
    for a prompt that has already finished. Arguments as for `generate`, with a batch of prompts
    and one generator per prompt. Arguments are checked here, before the first step."""
    prompts = _check_prompts(prompt_ids, cfg, truncate_prompt)
    generators = _check_generators(generator, len(prompts), temperature)
    _check_decoding(cfg, max_new_tokens, temperature, top_p, eos_id)
    if (static_cache or compile) and not use_cache:
        raise ValueError("static_cache and compile decode with a KV cache; they need use_cache=True")
    device = params["token_embeddings"]["weight"].device
    uniforms = draw_uniforms(generators, max_new_tokens, device) if temperature else None  # (B, max_new_tokens)
    if static_cache or compile:
        return static_steps(
            params, cfg, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            eos_id=eos_id, uniforms=uniforms, compile=compile,
        )
    read = (_read_cached if use_cache else _read_uncached)(params, cfg)
    return _steps(read, prompts, uniforms, max_new_tokens, temperature, top_p, eos_id)


@torch.no_grad()  # on a generator function torch sets no-grad around each step, not between them
def _steps(
    read: Reader,
    sequences: list[list[int]],
    uniforms: Tensor | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int | None,
) -> Iterator[list[int | None]]:
    running, state = list(range(len(sequences))), None
    for done in range(max_new_tokens):
        logits, state = read(sequences, running, state)  # (len(running), V)
        drawn = None if uniforms is None else uniforms[running, done]  # each prompt's own draw
        tokens = next_tokens(logits, drawn, temperature=temperature, top_p=top_p).tolist()
        step: list[int | None] = [None] * len(sequences)
        for row, token in zip(running, tokens):
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
    static_cache: bool = False,
    compile: bool = False,
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
                 draws max_new_tokens uniforms from its own before the first step, so a batch
                 gives exactly the completions that its prompts give alone. May be None at
                 temperature 0.
    use_cache    decode with a KV cache; False re-reads the window at every step (the same
                 tokens, slower: the reference and the benchmark's peer)
    static_cache decode over a preallocated cache of fixed shapes (fnlm.static_cache), replayed
                 as a CUDA graph on a GPU; tokens come back to the host every 16 steps
    compile      static_cache with its per-token program compiled by torch.compile (the fast
                 path on a GPU; the first call per batch size and setting compiles)
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
        eos_id=eos_id, generator=generator, use_cache=use_cache, static_cache=static_cache, compile=compile,
        truncate_prompt=truncate_prompt,
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
