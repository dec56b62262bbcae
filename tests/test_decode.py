"""Samplers (properties and oracles), the KV cache against the uncached model, generate()."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fnlm.decode import (
    KVCache,
    cached_lm,
    draw_uniforms,
    empty_cache,
    generate,
    generate_steps,
    greedy,
    next_token_probs,
    prefill,
    sample_logits,
    sample_probs,
    sample_uniform,
    temperature_probs,
    top_p_probs,
    window_start,
)
from fnlm.model import init_params, transformer_lm
from fnlm.tree import tree_leaves, tree_map

from tests.test_model import ABLATIONS, TINY  # the same tiny model and ablations as the model tests

f64 = torch.float64
logit_rows = st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=12).map(
    lambda xs: torch.tensor(xs, dtype=f64)
)
probabilities = st.floats(0, 1, exclude_min=True)


def generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def ids(*values):
    return torch.tensor([values])


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, seed=1, dtype=f64)


# -- samplers ------------------------------------------------------------------------------------


@given(logit_rows, probabilities)
def test_top_p_keeps_the_smallest_set_of_most_likely_tokens_that_reaches_p(logits, top_p):
    probs = F.softmax(logits, -1)
    nucleus = top_p_probs(probs, top_p)
    kept = nucleus > 0
    torch.testing.assert_close(nucleus.sum(), torch.tensor(1.0, dtype=f64))  # renormalised
    torch.testing.assert_close(nucleus[kept], probs[kept] / probs[kept].sum())
    assert probs[kept].sum() >= top_p - 1e-12  # sufficient
    smallest_kept = probs[kept].min()
    assert probs[kept].sum() - smallest_kept < top_p + 1e-12  # and nothing spare
    if (~kept).any():
        assert smallest_kept >= probs[~kept].max()  # the most likely ones


def test_top_p_breaks_ties_by_the_lower_id_and_p_one_keeps_everything():
    uniform = torch.full((6,), 1 / 6, dtype=f64)
    assert top_p_probs(uniform, 0.5).nonzero().flatten().tolist() == [0, 1, 2]
    probs = torch.tensor([0.1, 0.4, 0.1, 0.4], dtype=f64)
    assert top_p_probs(probs, 0.85).nonzero().flatten().tolist() == [0, 1, 3]
    tail = torch.tensor([1 - 1e-9, 1e-9], dtype=torch.float32)
    assert torch.equal(top_p_probs(tail, 1.0), tail)


@given(logit_rows, st.floats(0.05, 20))
def test_temperature_probs_match_softmax_of_scaled_logits(logits, temperature):
    probs = temperature_probs(logits, temperature)
    torch.testing.assert_close(probs, F.softmax(logits / temperature, -1))
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=f64))


@given(st.lists(st.integers(-10_000, 10_000), min_size=1, max_size=12, unique=True), st.integers(0, 2**16))
def test_temperature_to_zero_is_greedy(values, seed):
    logits = torch.tensor(values, dtype=f64) / 1000  # distinct, at least 1e-3 apart
    best = greedy(logits)
    for temperature in (1e-6, 1e-30, 1e-300):
        assert torch.equal(temperature_probs(logits, temperature), F.one_hot(best, len(values)).to(f64))
        assert sample_logits(logits, generators(seed)[0], temperature=temperature) == best
    assert torch.equal(next_token_probs(logits, temperature=0), F.one_hot(best, len(values)).to(f64))
    assert sample_logits(logits, None, temperature=0, top_p=0.3) == best


def test_greedy_takes_the_first_of_equal_maxima_and_works_on_batches():
    assert greedy(torch.tensor([1.0, 3.0, 3.0])) == 1
    assert greedy(torch.tensor([[0.0, 1.0], [2.0, 1.0]])).tolist() == [1, 0]


def test_sample_probs_follows_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    draws = sample_probs(probs.expand(20_000, 5), generators(0)[0])
    assert draws.shape == (20_000,)
    frequencies = torch.bincount(draws, minlength=5) / 20_000
    assert frequencies[1] == frequencies[4] == 0
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)


def test_sampling_is_reproducible_from_the_generator_alone():
    logits = torch.randn(3, 40, generator=generators(5)[0])

    def draw(seed):
        g = generators(seed)[0]
        return [sample_logits(logits, g, temperature=0.8, top_p=0.9) for _ in range(4)]

    assert all(torch.equal(a, b) for a, b in zip(draw(1), draw(1)))
    assert not all(torch.equal(a, b) for a, b in zip(draw(1), draw(2)))


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.01, math.nan])
def test_top_p_outside_zero_one_raises(top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        top_p_probs(torch.ones(3) / 3, top_p)
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(torch.zeros(3), None, temperature=0, top_p=top_p)


@pytest.mark.parametrize("temperature", [-1.0, -1e-9, math.inf, math.nan])
def test_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        sample_logits(torch.zeros(3), generators(0)[0], temperature=temperature)


def test_sampler_argument_types_are_checked():
    with pytest.raises(TypeError, match="temperature must be a number"):
        temperature_probs(torch.zeros(3), "hot")
    with pytest.raises(ValueError, match="temperature 0 is greedy"):
        temperature_probs(torch.zeros(3), 0)
    with pytest.raises(TypeError, match="generator is required"):
        sample_logits(torch.zeros(3), None, temperature=1.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample_probs(torch.ones(3) / 3, 0)


# -- KV cache --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_cached_logits_equal_the_whole_model_token_by_token(ablation):
    cfg = dataclasses.replace(TINY, **ABLATIONS[ablation])
    params = init_params(cfg, seed=2, dtype=f64)
    sequence = torch.randint(0, cfg.vocab_size, (2, cfg.context_length), generator=generators(3)[0])
    expected = transformer_lm(params, sequence, cfg)  # (2, C, V)
    cache = empty_cache(cfg, torch.zeros(2, dtype=torch.long), dtype=f64)
    # a prompt of 4, then one token at a time, with a chunk of 3 in between
    for start, stop in [(0, 4), (4, 5), (5, 8), *((t, t + 1) for t in range(8, cfg.context_length))]:
        logits, cache = cached_lm(params, sequence[:, start:stop], cache, cfg)
        torch.testing.assert_close(logits, expected[:, start:stop])
    assert cache.layers[0]["keys"].shape == (2, cfg.num_heads, cfg.context_length, cfg.head_dim)


def test_ragged_prefill_and_steps_equal_each_row_alone(params):
    rows = [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5, 8]]
    logits, cache = prefill(params, TINY, rows)
    assert cache.pad.tolist() == [0, 4, 2]
    for step in range(3):
        for row, row_logits in zip(rows, logits):
            torch.testing.assert_close(row_logits, transformer_lm(params, torch.tensor([row]), TINY)[0, -1])
        latest = [[(7 * step + i) % TINY.vocab_size] for i in range(len(rows))]
        rows = [row + token for row, token in zip(rows, latest)]
        logits, cache = cached_lm(params, torch.tensor(latest), cache, TINY)
        logits = logits[:, -1]


def test_the_cache_is_a_pytree_whose_rows_select_together(params):
    _, cache = prefill(params, TINY, [[1, 2, 3], [4]])
    assert len(tree_leaves(cache)) == 2 * TINY.num_layers + 1
    second = tree_map(lambda leaf: leaf[torch.tensor([1])], cache)
    assert isinstance(second, KVCache) and second.pad.tolist() == [2]
    logits, _ = cached_lm(params, ids(7), second, TINY)
    torch.testing.assert_close(logits[0, -1], transformer_lm(params, ids(4, 7), TINY)[0, -1])


def test_cached_lm_refuses_to_read_past_the_context(params):
    _, cache = prefill(params, TINY, [list(range(12))])
    with pytest.raises(ValueError, match="exceeds context_length 12"):
        cached_lm(params, ids(1), cache, TINY)


@given(st.integers(1, 2000), st.integers(1, 300))
def test_the_window_keeps_the_latest_tokens_and_hops_only_when_full(length, context):
    start = window_start(length, context)
    assert 0 < length - start <= context
    if length > context:
        assert length - start > context // 2
    previous = window_start(length - 1, context) if length > 1 else 0
    assert start == previous or length - previous > context  # it moves only when it must


# -- generate --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "top_p"), [(0, 1.0), (1.0, 1.0), (0.7, 0.8)])
def test_cached_and_uncached_generate_the_same_tokens_across_context_hops(params, temperature, top_p):
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    kwargs = dict(max_new_tokens=30, temperature=temperature, top_p=top_p)  # past 2C: several hops
    cached = generate(params, TINY, prompts, generator=generators(1, 2, 3), **kwargs)
    uncached = generate(params, TINY, prompts, generator=generators(1, 2, 3), use_cache=False, **kwargs)
    assert cached == uncached
    assert [len(c) for c in cached] == [30, 30, 30]


def test_a_ragged_batch_equals_its_prompts_one_by_one(params):
    prompts = [[3, 1, 4, 1, 5], [9], [2, 6, 5], [3, 5]]
    free = generate(params, TINY, prompts, max_new_tokens=15, generator=generators(10, 11, 12, 13))
    eos_id = free[1][2]  # prompt 1 stops after 3 tokens; others may stop too, or run to the limit
    batch = generate(params, TINY, prompts, max_new_tokens=15, eos_id=eos_id, generator=generators(10, 11, 12, 13))
    alone = [
        generate(params, TINY, prompt, max_new_tokens=15, eos_id=eos_id, generator=generators(seed)[0])
        for prompt, seed in zip(prompts, (10, 11, 12, 13))
    ]
    assert batch == alone
    assert batch[1] == free[1][:3]


def test_generation_stops_at_eos_and_includes_it(params):
    free = generate(params, TINY, [5, 6], max_new_tokens=20, temperature=0)
    eos_id = free[6]
    stopped = generate(params, TINY, [5, 6], max_new_tokens=20, temperature=0, eos_id=eos_id)
    assert stopped == free[: free.index(eos_id) + 1]
    assert generate(params, TINY, [5, 6], max_new_tokens=0, temperature=0) == []
    assert generate(params, TINY, [[5], [6]], max_new_tokens=0, temperature=0) == [[], []]


def test_generate_steps_streams_each_prompt_and_marks_finished_ones(params):
    prompts = [[1, 2], [3]]
    steps = list(generate_steps(params, TINY, prompts, max_new_tokens=6, generator=generators(0, 1)))
    completions = generate(params, TINY, prompts, max_new_tokens=6, generator=generators(0, 1))
    assert [[step[row] for step in steps] for row in range(2)] == completions
    eos_id = completions[0][1]
    steps = list(generate_steps(params, TINY, prompts, max_new_tokens=6, eos_id=eos_id, generator=generators(0, 1)))
    assert [step[0] for step in steps][2:] == [None] * (len(steps) - 2)


def test_trainable_params_decode_and_grad_mode_is_left_alone_between_steps(params):
    trainable = tree_map(lambda leaf: leaf.detach().requires_grad_(), params)
    steps = generate_steps(trainable, TINY, [[1, 2]], max_new_tokens=3, temperature=0)
    assert next(steps) is not None and torch.is_grad_enabled()  # no_grad holds only inside a step
    assert len(list(steps)) == 2 and torch.is_grad_enabled()


def test_tensors_of_prompts_are_accepted(params):
    batch = torch.tensor([[1, 2, 3], [4, 5, 6]])
    expected = generate(params, TINY, batch.tolist(), max_new_tokens=4, temperature=0)
    assert generate(params, TINY, batch, max_new_tokens=4, temperature=0) == expected
    assert generate(params, TINY, batch[1], max_new_tokens=4, temperature=0) == expected[1]


def test_long_prompts_raise_unless_truncation_is_asked_for(params):
    prompt = list(range(20))
    with pytest.raises(ValueError, match="prompt 0 has 20 tokens, more than context_length 12; pass truncate_prompt"):
        generate(params, TINY, prompt, max_new_tokens=3, temperature=0)
    cut = generate(params, TINY, prompt, max_new_tokens=3, temperature=0, truncate_prompt=True)
    assert cut == generate(params, TINY, prompt[-12:], max_new_tokens=3, temperature=0)


@pytest.mark.parametrize(
    ("prompt", "kwargs", "error", "message"),
    [
        ([], {}, ValueError, "prompt 0 must be a non-empty list"),
        ([[1], []], {}, ValueError, "prompt 1 must be a non-empty list"),
        (torch.zeros(0, 3, dtype=torch.long), {}, ValueError, "holds no prompts"),
        ([1, 50], {}, ValueError, r"token id 50 is outside the vocabulary \[0, 50\)"),
        ([[1], [-1]], {}, ValueError, "token id -1"),
        ([1.5, 2.0], {}, TypeError, "integer tensor"),
        ("hello", {}, TypeError, "prompt_ids must be a list of token ids"),
        ([1], {"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
        ([1], {"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
        ([1], {"temperature": -0.5}, ValueError, "temperature must be a finite number >= 0"),
        ([1], {"max_new_tokens": -1}, ValueError, "max_new_tokens must be an int >= 0"),
        ([1], {"eos_id": 50}, ValueError, r"eos_id must be None or a token id in \[0, 50\)"),
        ([1], {"generator": None}, TypeError, "generator is required"),
        ([[1], [2]], {}, TypeError, "pass one torch.Generator per prompt"),
        ([[1], [2]], {"generator": generators(0)}, TypeError, "2 torch.Generator"),
    ],
)
def test_bad_generate_input_raises_before_decoding(params, prompt, kwargs, error, message):
    arguments = {"max_new_tokens": 3, "temperature": 1.0, "generator": generators(0)[0], **kwargs}
    with pytest.raises(error, match=message):
        generate(params, TINY, prompt, **arguments)


def test_the_streaming_entry_point_checks_its_arguments_before_the_first_step(params):
    with pytest.raises(ValueError, match="top_p"):
        generate_steps(params, TINY, [[1]], max_new_tokens=3, top_p=2.0, generator=generators(0))
    with pytest.raises(ValueError, match="prompt 0 must be a non-empty list"):
        generate_steps(params, TINY, [[]], max_new_tokens=3, temperature=0)


# -- inverse-CDF draws -----------------------------------------------------------------------------


def test_sample_uniform_skips_zero_mass_tokens_at_both_ends_of_the_uniforms():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0], dtype=f64)
    tiny, one = torch.tensor(1e-300, dtype=f64), torch.tensor(1.0, dtype=f64)
    assert sample_uniform(probs, tiny) == 1 and sample_uniform(probs, one) == 3
    assert sample_uniform(probs, torch.tensor(0.25, dtype=f64)) == 1  # the boundary belongs to the token below
    assert sample_uniform(probs.expand(3, 5), torch.tensor([0.1, 0.3, 0.9], dtype=f64)).tolist() == [1, 3, 3]


def test_draw_uniforms_are_each_prompts_own_stream_in_zero_one():
    draws = draw_uniforms(generators(1, 2), 1000, "cpu")
    assert draws.shape == (2, 1000) and bool((draws > 0).all() and (draws <= 1).all())
    assert torch.equal(draws[1], draw_uniforms(generators(2), 1000, "cpu")[0])  # the batch does not matter
