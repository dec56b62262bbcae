"""Every primitive against torch.nn.functional (the oracle), the official snapshots, and properties."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fnlm import nn as fnn
from tests import adapters
from tests.conftest import SNAPSHOTS
from tests.reference import rope_reference

f64 = torch.float64


def randn(*shape, seed=0, dtype=f64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def snapshot(name):
    return torch.from_numpy(np.load(SNAPSHOTS / f"{name}.npz")["array"])


# -- parity with torch.nn.functional ------------------------------------------------------------

def test_linear_embedding_silu_match_functional():
    w, x = randn(5, 3), randn(2, 4, 3, seed=1)
    torch.testing.assert_close(fnn.linear({"weight": w}, x), F.linear(x, w))
    table, ids = randn(10, 4), torch.tensor([[0, 9, 3], [3, 3, 1]])
    torch.testing.assert_close(fnn.embedding({"weight": table}, ids), F.embedding(ids, table))
    torch.testing.assert_close(fnn.silu(x), F.silu(x))


def test_rmsnorm_matches_functional_and_keeps_dtype():
    x, g = randn(3, 7, 16), randn(16, seed=1)
    torch.testing.assert_close(fnn.rmsnorm({"weight": g}, x, 1e-5), F.rms_norm(x, (16,), g, 1e-5))
    xb = x.to(torch.bfloat16)
    out = fnn.rmsnorm({"weight": g.float()}, xb, 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), F.rms_norm(x, (16,), g, 1e-5), atol=3e-2, rtol=2e-2)


def test_swiglu_and_silu_ffn_match_functional():
    x, w1, w2, w3 = randn(2, 5, 8), randn(12, 8, seed=1), randn(8, 12, seed=2), randn(12, 8, seed=3)
    params = {"w1": {"weight": w1}, "w2": {"weight": w2}, "w3": {"weight": w3}}
    torch.testing.assert_close(fnn.swiglu(params, x), F.linear(F.silu(x @ w1.T) * (x @ w3.T), w2))
    torch.testing.assert_close(fnn.silu_ffn(params, x), F.linear(F.silu(x @ w1.T), w2))


def test_swiglu_gradient_matches_autograd_of_the_definition_under_grad_vmap_and_compile():
    """swiglu's gated product has a hand-written backward (one expression over gate and up)."""
    x, w1, w2, w3 = randn(3, 5, 8), randn(12, 8, seed=1), randn(8, 12, seed=2), randn(12, 8, seed=3)
    params = {"w1": {"weight": w1}, "w2": {"weight": w2}, "w3": {"weight": w3}}

    def definition(params, x):
        return F.linear(F.silu(x @ params["w1"]["weight"].T) * (x @ params["w3"]["weight"].T), params["w2"]["weight"])

    def gradient(ffn):
        return torch.func.grad(lambda params, x: ffn(params, x).square().sum(), argnums=(0, 1))

    want = gradient(definition)(params, x)
    torch.testing.assert_close(gradient(fnn.swiglu)(params, x), want)
    torch.testing.assert_close(torch.compile(gradient(fnn.swiglu))(params, x), want)
    stacked = torch.stack([x, 2 * x])
    torch.testing.assert_close(torch.func.vmap(gradient(fnn.swiglu), in_dims=(None, 0))(params, stacked)[1],
                               torch.func.vmap(gradient(definition), in_dims=(None, 0))(params, stacked)[1])
    assert torch.autograd.gradcheck(fnn._GatedSilu.apply, randn(2, 2, 3).requires_grad_())


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_matches_functional(dim):
    x = randn(4, 6, 5) * 30
    torch.testing.assert_close(fnn.softmax(x, dim), F.softmax(x, dim))


def test_softmax_and_cross_entropy_stay_finite_on_huge_inputs():
    x = torch.tensor([[1e30, -1e30, 0.0], [3e38, 3e38, 3e38]])
    assert torch.isfinite(fnn.softmax(x)).all()
    logits, targets = randn(8, 11) * 1e4, torch.arange(8)
    torch.testing.assert_close(fnn.cross_entropy(logits, targets), F.cross_entropy(logits, targets))


def test_cross_entropy_any_batch_dims_and_bf16():
    logits, targets = randn(2, 3, 50), torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(0))
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(fnn.cross_entropy(logits, targets), expected)
    loss = fnn.cross_entropy(logits.to(torch.bfloat16), targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2)


@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_matches_functional(with_mask):
    q, k, v = randn(2, 3, 6, 8), randn(2, 3, 9, 8, seed=1), randn(2, 3, 9, 5, seed=2)
    mask = (randn(2, 3, 6, 9, seed=3) > 0) if with_mask else None
    mask = None if mask is None else mask | torch.eye(6, 9, dtype=torch.bool)  # no empty rows for F's sake
    torch.testing.assert_close(
        fnn.scaled_dot_product_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )


def test_fully_masked_query_gives_zeros_and_finite_grads():
    q, k, v = (randn(1, 4, 8, seed=s).requires_grad_() for s in range(3))
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 2] = False
    out = fnn.scaled_dot_product_attention(q, k, v, mask)
    assert torch.equal(out[0, 2], torch.zeros(8, dtype=f64))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_multihead_attention_matches_functional_per_head():
    d, h, t = 16, 4, 7
    x = randn(2, t, d)
    ws = [randn(d, d, seed=s) for s in range(1, 5)]
    params = {n: {"weight": w} for n, w in zip(("q_proj", "k_proj", "v_proj", "output_proj"), ws)}
    split = lambda y: y.view(2, t, h, d // h).transpose(1, 2)
    for theta in (None, 10_000.0):
        q, k, v = (split(x @ w.T) for w in ws[:3])
        if theta is not None:
            q, k = rope_reference(q, torch.arange(t), theta), rope_reference(k, torch.arange(t), theta)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, t, d) @ ws[3].T
        torch.testing.assert_close(fnn.multihead_self_attention(params, x, h, rope_theta=theta), y)


def test_rope_matches_complex_formulation_with_positions_and_batch_dims():
    x, positions = randn(2, 3, 5, 8), torch.tensor([[4, 0, 1, 7, 2]] * 3)
    torch.testing.assert_close(fnn.rope(x, positions, 500.0), rope_reference(x, positions, 500.0))


def test_rope_under_vmap_over_positions_matches_batch_dims():
    x, positions = randn(3, 5, 8), torch.stack([torch.arange(5) + 2 * i for i in range(3)])  # (3, 5)
    got = torch.func.vmap(lambda x, p: fnn.rope(x, p, 500.0))(x, positions)
    torch.testing.assert_close(got, fnn.rope(x, positions, 500.0))


def test_a_traced_block_computes_one_rope_table_and_no_trig_elsewhere():
    """RoPE's cos and sin come from one opaque op per block, shared by q and k: a compiled step
    then reads a (T, Dh) table instead of evaluating cos and sin at every element of q and k,
    which cost a tenth of a GPT-2-small step on an H200 (docs/experiments.md)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fnlm.config import ModelConfig
    from fnlm.model import init_params, transformer_block

    cfg = ModelConfig(vocab_size=32, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24)
    block = lambda p, x: transformer_block(p, x, cfg).square().sum()  # noqa: E731
    graph = make_fx(torch.func.grad(block))(init_params(cfg)["layers"][0], torch.randn(2, 8, 16)).graph
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.fnlm.rope_tables.default) == 1
    assert not {torch.ops.aten.cos.default, torch.ops.aten.sin.default} & set(targets)


# -- the official snapshots (inputs as the CS336 conftest builds them) --------------------------

def _seeded(seed, *shape):
    torch.manual_seed(seed)
    return torch.randn(*shape)


def test_rope_snapshot():
    out = adapters.run_rope(64, 10000.0, 12, _seeded(4, 4, 12, 64), torch.arange(12))
    np.testing.assert_allclose(out.numpy(), snapshot("test_rope").numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["test_scaled_dot_product_attention", "test_4d_scaled_dot_product_attention"])
def test_attention_snapshots(name):
    q, k, v = _seeded(1, 4, 12, 64), _seeded(2, 4, 16, 64), _seeded(3, 4, 16, 64)
    mask = _seeded(5, 4, 12, 16) > 0.5
    if name.startswith("test_4d"):
        q, k, v, mask = (t.reshape(2, 2, *t.shape[1:]) for t in (q, k, v, mask))
    out = adapters.run_scaled_dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(out.numpy(), snapshot(name).numpy(), rtol=1e-4, atol=1e-2)


# -- properties ---------------------------------------------------------------------------------

@given(st.integers(1, 6), st.integers(1, 8), st.floats(-50, 50), st.integers(0, 2**16))
def test_softmax_is_shift_invariant_and_normalised(rows, cols, shift, seed):
    x = randn(rows, cols, seed=seed) * 10
    p = fnn.softmax(x)
    torch.testing.assert_close(fnn.softmax(x + shift), p)
    torch.testing.assert_close(p.sum(-1), torch.ones(rows, dtype=f64))


@given(st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_rmsnorm_is_scale_invariant(scale, seed):
    x, g = randn(3, 16, seed=seed), randn(16, seed=seed + 1)
    torch.testing.assert_close(fnn.rmsnorm({"weight": g}, x * scale, 0.0), fnn.rmsnorm({"weight": g}, x, 0.0))


@given(st.integers(0, 500), st.integers(0, 500), st.integers(0, 2**16))
def test_rope_keeps_norms_and_scores_depend_on_offset_only(m, n, seed):
    q, k = randn(16, seed=seed), randn(16, seed=seed + 1)
    rot = lambda x, p: fnn.rope(x[None], torch.tensor([p]), 10_000.0)[0]
    torch.testing.assert_close(rot(q, m).norm(), q.norm())
    shift = 37
    torch.testing.assert_close(rot(q, m) @ rot(k, n), rot(q, m + shift) @ rot(k, n + shift))


@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**16))
def test_attention_ignores_masked_keys(t, s, seed):
    q, k, v = randn(t, 4, seed=seed), randn(s, 4, seed=seed + 1), randn(s, 3, seed=seed + 2)
    mask = randn(t, s, seed=seed + 3) > 0
    out = fnn.scaled_dot_product_attention(q, k, v, mask)
    noise = torch.where(mask.any(0)[:, None], 0.0, randn(s, 3, seed=seed + 4) * 100)
    torch.testing.assert_close(fnn.scaled_dot_product_attention(q, k, v + noise, mask), out)
    assert torch.equal(out[~mask.any(1)], torch.zeros_like(out[~mask.any(1)]))


# -- bad input ----------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="targets shape"):
        fnn.cross_entropy(randn(4, 5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="boolean"):
        fnn.scaled_dot_product_attention(randn(2, 4), randn(2, 4), randn(2, 4), torch.ones(2, 2))
    with pytest.raises(ValueError, match="even"):
        fnn.rope(randn(3, 5), torch.arange(3), 10_000.0)
    with pytest.raises(ValueError, match="divisible"):
        fnn.multihead_self_attention({}, randn(2, 3, 10), 4)
