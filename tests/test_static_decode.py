"""The static KV cache (fnlm.static_cache) against the whole model and the dynamic cache: logits
step by step, and generate's tokens for ragged batches, EOS, prompts near the context and the
window hops past it. On CPU the static path runs uncompiled; the CUDA tests run where a GPU is."""

import dataclasses

import pytest
import torch

from fnlm.decode import generate, generate_steps
from fnlm.model import init_params, transformer_lm
from fnlm.static_cache import append_to_cache, decode_token_fn, static_lm_step, static_prefill, static_step
from tests.test_model import ABLATIONS, TINY

f64 = torch.float64
SWITCHES = {"tied": {"tie_embeddings": True}, "qk_norm": {"qk_norm": True}, "relu2": {"ffn_type": "relu2"},
            "soft_cap": {"logit_soft_cap": 5.0}}
RAGGED = [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [19, 20]]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, seed=1, dtype=f64)


@pytest.mark.parametrize("variant", [*ABLATIONS, *SWITCHES])
def test_static_steps_give_the_whole_models_logits_for_each_ragged_row(variant):
    cfg = dataclasses.replace(TINY, **(ABLATIONS | SWITCHES)[variant])
    params = init_params(cfg, seed=2, dtype=f64)
    rows = [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5, 8]]
    logits, cache = static_prefill(params, cfg, rows)
    assert cache.keys.shape == (cfg.num_layers, 3, cfg.num_heads, cfg.context_length, cfg.head_dim)
    assert cache.pad.tolist() == [0, 4, 2] and cache.slot.item() == 6
    for step in range(cfg.context_length - 6 + 1):  # up to a full cache
        for row, row_logits in zip(rows, logits):
            torch.testing.assert_close(row_logits, transformer_lm(params, torch.tensor([row]), cfg)[0, -1])
        if step == cfg.context_length - 6:
            break
        latest = [(7 * step + i) % cfg.vocab_size for i in range(len(rows))]
        rows = [row + [token] for row, token in zip(rows, latest)]
        logits, cache = static_lm_step(params, cache, torch.tensor(latest), cfg)
    assert cache.slot.item() == cfg.context_length


def test_a_step_is_pure_and_append_writes_only_its_slot(params):
    _, cache = static_prefill(params, TINY, [[1, 2, 3], [4]])
    before = [t.clone() for t in cache]
    logits, new_keys, new_values = static_step(params, cache, torch.tensor([5, 6]), TINY)
    assert all(torch.equal(a, b) for a, b in zip(before, cache))  # nothing written in place
    assert logits.shape == (2, TINY.vocab_size) and new_keys.shape == (TINY.num_layers, 2, TINY.num_heads, TINY.head_dim)
    grown = append_to_cache(cache, new_keys, new_values)
    assert grown.slot.item() == 4
    torch.testing.assert_close(grown.keys[:, :, :, 3], new_keys)
    torch.testing.assert_close(grown.values[:, :, :, :3], cache.values[:, :, :, :3])


@pytest.mark.parametrize(("temperature", "top_p"), [(0, 1.0), (1.0, 1.0), (0.7, 0.8)])
def test_static_and_dynamic_caches_generate_the_same_tokens_across_window_hops(params, temperature, top_p):
    kwargs = dict(max_new_tokens=30, temperature=temperature, top_p=top_p)  # 30 > 2C: several hops
    dynamic = generate(params, TINY, RAGGED, generator=generators(1, 2, 3, 4), **kwargs)
    static = generate(params, TINY, RAGGED, generator=generators(1, 2, 3, 4), static_cache=True, **kwargs)
    assert static == dynamic
    assert [len(c) for c in static] == [30] * 4


def test_eos_mid_batch_stops_rows_alone_and_the_rest_run_on(params):
    free = generate(params, TINY, RAGGED, max_new_tokens=25, generator=generators(5, 6, 7, 8))
    eos_id = free[1][4]  # row 1 stops after 5 tokens, in the middle of a chunk of replays
    kwargs = dict(max_new_tokens=25, eos_id=eos_id)
    dynamic = generate(params, TINY, RAGGED, generator=generators(5, 6, 7, 8), **kwargs)
    static = generate(params, TINY, RAGGED, generator=generators(5, 6, 7, 8), static_cache=True, **kwargs)
    assert static == dynamic and static[1] == free[1][:5]
    assert max(len(c) for c in static) > 5  # others ran on past row 1's end (and through refills)
    steps = list(generate_steps(params, TINY, RAGGED, generator=generators(5, 6, 7, 8), static_cache=True, **kwargs))
    assert [step[1] for step in steps][5:] == [None] * (len(steps) - 5)


@pytest.mark.parametrize("lengths", [(12,), (12, 1), (11, 12, 3), (10,)])
def test_prompts_at_or_near_the_context_length(params, lengths):
    prompts = [[(5 * i + j) % TINY.vocab_size for j in range(n)] for i, n in enumerate(lengths)]
    kwargs = dict(max_new_tokens=8, temperature=0.9)
    seeds = range(len(prompts))
    dynamic = generate(params, TINY, prompts, generator=generators(*seeds), **kwargs)
    assert generate(params, TINY, prompts, generator=generators(*seeds), static_cache=True, **kwargs) == dynamic


def test_a_static_batch_equals_its_prompts_one_by_one(params):
    batch = generate(params, TINY, RAGGED, max_new_tokens=14, temperature=1.0, generator=generators(1, 2, 3, 4),
                     static_cache=True)
    alone = [generate(params, TINY, p, max_new_tokens=14, temperature=1.0, generator=generators(s)[0], static_cache=True)
             for p, s in zip(RAGGED, (1, 2, 3, 4))]
    assert batch == alone


def test_static_cache_needs_a_cache_and_zero_tokens_is_empty(params):
    with pytest.raises(ValueError, match="need use_cache=True"):
        generate(params, TINY, [1], max_new_tokens=3, temperature=0, use_cache=False, static_cache=True)
    assert generate(params, TINY, [[1], [2]], max_new_tokens=0, temperature=0, static_cache=True) == [[], []]


@pytest.mark.parametrize(("temperature", "top_p"), [(0, 1.0), (0.8, 0.9)])
def test_the_per_token_program_traces_as_one_graph(params, temperature, top_p):
    """No graph breaks: torch.compile gets the step and the sampler as one program."""
    _, cache = static_prefill(params, TINY, RAGGED)
    uniforms = None if temperature == 0 else torch.rand(len(RAGGED), 5)
    decode_token = decode_token_fn(TINY, temperature, top_p)
    explanation = torch._dynamo.explain(decode_token)(params, cache, torch.tensor([1, 2, 3, 4]), uniforms,
                                                      torch.tensor(2))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


@pytest.mark.slow
def test_the_compiled_step_generates_the_dynamic_tokens_on_cpu(params):
    """torch.compile on CPU builds C++ (minutes on a 2-core machine)."""
    params32 = init_params(TINY, seed=1)
    kwargs = dict(max_new_tokens=20, temperature=0.8, top_p=0.9)
    dynamic = generate(params32, TINY, RAGGED, generator=generators(1, 2, 3, 4), **kwargs)
    assert generate(params32, TINY, RAGGED, generator=generators(1, 2, 3, 4), compile=True, **kwargs) == dynamic


@cuda
@pytest.mark.parametrize("compile", [False, True])
def test_the_cuda_graph_generates_the_cpu_tokens(compile):
    """float32 on the GPU (the graph replays; compiled or not) against the dynamic cache on CPU."""
    params = init_params(TINY, seed=1)
    kwargs = dict(max_new_tokens=30, temperature=0.8, top_p=0.9)  # several hops and refills
    on_cpu = generate(params, TINY, RAGGED, generator=generators(1, 2, 3, 4), **kwargs)
    gpu_params = init_params(TINY, seed=1, device="cuda")
    on_gpu = generate(gpu_params, TINY, RAGGED, generator=generators(1, 2, 3, 4), static_cache=True, compile=compile,
                      **kwargs)
    assert on_gpu == on_cpu
    eos_id = on_cpu[1][4]
    stopped = generate(gpu_params, TINY, RAGGED, generator=generators(1, 2, 3, 4), eos_id=eos_id, static_cache=True,
                       compile=compile, **kwargs)
    assert stopped[1] == on_cpu[1][:5]
