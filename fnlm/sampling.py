"""Samplers: the next token from logits, with randomness passed in explicitly.

Shape legend: ... any leading dims (prompts), V vocabulary.

Drawing is inverse-CDF sampling from one uniform per token: `sample_uniform(probs, u)` picks the
token whose slice of the cumulative distribution holds u. Decoding draws each prompt's uniforms
from that prompt's `torch.Generator` before the first step (`draw_uniforms`), so the choice of a
token is a pure tensor function of (logits, u): the same on every path (uncached, dynamic or
static cache, compiled into a CUDA graph), with no generator call and no host sync per token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .nn import softmax


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


def sample_uniform(probs: Tensor, uniforms: Tensor) -> Tensor:
    """probs (..., V) unnormalised, uniforms (...) in (0, 1] -> (...) the first token whose
    cumulative mass reaches u * total.

    Excluding 0 from u is what keeps zero-probability tokens out: a token of mass 0 has the same
    cumulative mass as the one before it, which therefore reaches the target first; and u <= 1
    keeps the target within the total, so the search never runs off the end.
    """
    cdf = probs.cumsum(-1)  # (..., V), non-decreasing in floating point too
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]  # (..., 1)
    return torch.searchsorted(cdf, target).squeeze(-1)


def next_tokens(logits: Tensor, uniforms: Tensor | None, *, temperature: float, top_p: float = 1.0) -> Tensor:
    """logits (..., V), uniforms (...) in (0, 1] -> (...) the next tokens: greedy at temperature
    0 (uniforms unused, may be None), else drawn from next_token_probs by sample_uniform."""
    if temperature == 0:
        return greedy(logits)
    return sample_uniform(next_token_probs(logits, temperature=temperature, top_p=top_p), uniforms)


def draw_uniforms(generators: Sequence[torch.Generator], count: int, device: torch.device | str) -> Tensor:
    """(B, count) float32 on `device`: row b holds `count` uniforms in (0, 1] drawn from
    generators[b] on the generator's own device, so a CPU generator gives the same numbers
    whichever device decodes."""
    return torch.stack([_uniforms(count, g).to(device) for g in generators])


def sample_probs(probs: Tensor, generator: torch.Generator) -> Tensor:
    """probs (..., V) -> (...) one token drawn from each distribution with `generator`.

    The draw runs on the generator's device, so a CPU generator gives the same tokens whichever
    device holds the probabilities.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    uniforms = _uniforms(probs.shape[:-1], generator)
    return sample_uniform(probs.to(generator.device), uniforms).to(probs.device)


def _uniforms(shape: int | Sequence[int], generator: torch.Generator) -> Tensor:
    """`shape` float32 uniforms in (0, 1] (sample_uniform excludes 0) on the generator's device."""
    return 1 - torch.rand(shape, generator=generator, device=generator.device)  # 1 - [0, 1)


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
