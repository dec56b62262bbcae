"""The fused LM head + cross-entropy (fnlm.fused_ce) against the plain path: cross_entropy of
linear's logits, in float64 on the CPU, values and both gradients, with and without a soft cap."""

import pytest
import torch

from fnlm import nn as fnn
from fnlm.config import ModelConfig
from fnlm.fused_ce import linear_cross_entropy
from fnlm.model import init_params, lm_loss, transformer_lm
from fnlm.train import make_loss_fn


def plain(weight, x, targets, soft_cap=None):
    logits = fnn.linear({"weight": weight}, x)
    if soft_cap is not None:
        logits = soft_cap * torch.tanh(logits / soft_cap)
    return fnn.cross_entropy(logits, targets)


def problem(rows=(3, 7), vocab=11, dim=5, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=generator, dtype=dtype)
    x = 2 * torch.randn(*rows, dim, generator=generator, dtype=dtype)
    targets = torch.randint(0, vocab, rows, generator=generator)
    return weight, x, targets


@pytest.mark.parametrize("vocab", [11, 64])  # padded to a multiple of 64 inside, or already one
@pytest.mark.parametrize("soft_cap", [None, 3.0])
@pytest.mark.parametrize("chunk_rows", [1, 4, 21, 64])  # one row, uneven chunks, exactly all rows, one chunk
def test_loss_and_gradients_match_the_plain_path(soft_cap, chunk_rows, vocab):
    weight, x, targets = problem(vocab=vocab)
    fused = lambda w, h: linear_cross_entropy(w, h, targets, soft_cap=soft_cap, chunk_rows=chunk_rows)  # noqa: E731
    want_grads, want = torch.func.grad_and_value(lambda w, h: plain(w, h, targets, soft_cap), argnums=(0, 1))(weight, x)
    got_grads, got = torch.func.grad_and_value(fused, argnums=(0, 1))(weight, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # the same through autograd's backward, scaled by an outer factor (the backward scales the saved grads)
    w_leaf, x_leaf = weight.clone().requires_grad_(), x.clone().requires_grad_()
    (3 * fused(w_leaf, x_leaf)).backward()
    torch.testing.assert_close(w_leaf.grad, 3 * want_grads[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x_leaf.grad, 3 * want_grads[1], rtol=1e-10, atol=1e-12)


def test_the_compiled_form_matches_the_plain_path_too():
    """torch.compile traces the chunk's one-expression form (eager works in place): both are checked."""
    weight, x, targets = problem(vocab=11)
    fused = lambda w, h: linear_cross_entropy(w, h, targets, chunk_rows=4)  # noqa: E731
    want_grads, want = torch.func.grad_and_value(lambda w, h: plain(w, h, targets), argnums=(0, 1))(weight, x)
    got_grads, got = torch.compile(torch.func.grad_and_value(fused, argnums=(0, 1)), fullgraph=True)(weight, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_without_gradients_it_only_computes_the_loss():
    weight, x, targets = problem()
    with torch.no_grad():
        got = linear_cross_entropy(weight, x, targets, chunk_rows=4)
    torch.testing.assert_close(got, plain(weight, x, targets), rtol=1e-12, atol=1e-12)


def test_float32_master_weights_get_float32_gradients_under_bfloat16_autocast():
    weight, x, targets = problem(rows=(4, 16), vocab=97, dim=32, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_grads, got = torch.func.grad_and_value(
            lambda w, h: linear_cross_entropy(w, h, targets, chunk_rows=16), argnums=(0, 1))(weight, x)
    want_grads, want = torch.func.grad_and_value(lambda w, h: plain(w.double(), h.double(), targets),
                                                 argnums=(0, 1))(weight, x)
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_grads)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)  # bfloat16 matmuls
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w.double(), rtol=5e-2, atol=2e-3)


def test_vmapped_over_stacked_runs_as_a_sweep_does():
    weight, x, targets = problem()
    weights = torch.stack([weight, 0.5 * weight])
    grad = torch.func.grad(lambda w: linear_cross_entropy(w, x, targets, chunk_rows=4))
    got = torch.func.vmap(grad)(weights)
    for run in range(2):
        torch.testing.assert_close(got[run], torch.func.grad(lambda w: plain(w, x, targets))(weights[run]))


def test_bad_arguments_are_value_errors():
    weight, x, targets = problem()
    with pytest.raises(ValueError, match="targets shape"):
        linear_cross_entropy(weight, x, targets[:, :3])
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(weight.T, x, targets)
    with pytest.raises(ValueError, match="soft_cap"):
        linear_cross_entropy(weight, x, targets, soft_cap=0.0)


@pytest.mark.parametrize("switches", [{}, {"tie_embeddings": True, "logit_soft_cap": 5.0}])
def test_the_training_loss_is_cross_entropy_of_the_models_logits(switches):
    cfg = ModelConfig(vocab_size=37, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=24, **switches)
    params = init_params(cfg, seed=1, dtype=torch.float64)
    ids = torch.randint(0, 37, (3, 8), generator=torch.Generator().manual_seed(0))
    targets = ids.roll(-1, dims=1)
    plain_loss = lambda p: fnn.cross_entropy(transformer_lm(p, ids, cfg), targets)  # noqa: E731
    want_grads, want = torch.func.grad_and_value(plain_loss)(params)
    got_grads, got = torch.func.grad_and_value(make_loss_fn(cfg))(params, ids, targets)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grads, want_grads, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lm_loss(params, ids, targets, cfg), want, rtol=1e-12, atol=1e-12)


def test_gpt2_vocabulary_under_bfloat16_autocast_matches_float64():
    """Issue 12's candidate for the GPT-2-shape loss gap: the loss and its gradients at V = 50257
    with bfloat16 matmuls stay within bfloat16 rounding of the float64 definition."""
    weight, x, targets = problem(rows=(2, 32), vocab=50_257, dim=16, dtype=torch.float32, seed=3)
    weight = weight * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_grads, got = torch.func.grad_and_value(
            lambda w, h: linear_cross_entropy(w, h, targets), argnums=(0, 1))(weight, x)
    want_grads, want = torch.func.grad_and_value(
        lambda w, h: plain(w, h, targets), argnums=(0, 1))(weight.double(), x.double())
    assert abs(got.item() - want.item()) < 2e-3 * want.item()
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2 * w.abs().max().item())
