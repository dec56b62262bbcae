"""Muon, partition and the warmup-stable-decay schedule: Newton-Schulz properties, float64 parity
with straightforward references written here, vmap against a loop, state structure and dtype."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnlm.config import ModelConfig
from fnlm.model import init_params
from fnlm.optim import (
    ClipByGlobalNormState,
    adamw,
    apply_updates,
    find_state,
    muon,
    muon_adamw,
    muon_labels,
    newton_schulz,
    partition,
    schedule_value,
    scale_by_muon,
    warmup_stable_decay_schedule,
)
from fnlm.tree import flatten, tree_leaves, tree_map

A, B, C = 3.4445, -4.7750, 2.0315


def matrix_with_singular_values(generator, m, n, singular_values, dtype=torch.float64):
    """U diag(s) V^T with random orthonormal U (m, k), V (n, k), k = len(s)."""
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=dtype))
    return u @ torch.diag(torch.as_tensor(singular_values, dtype=dtype)) @ v.T, u, v


def reference_newton_schulz(g, steps=5):
    """The same map through the SVD: U p^steps(S / |G|_F) V^T with p(s) = a s + b s^3 + c s^5."""
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    s = s / (torch.linalg.matrix_norm(g) + 1e-7)
    for _ in range(steps):
        s = A * s + B * s**3 + C * s**5
    return u @ torch.diag(s) @ vh


shapes = st.sampled_from([(16, 16), (24, 8), (8, 24), (32, 20), (5, 40)])


@given(shape=shapes, seed=st.integers(0, 2**16), condition=st.floats(1.0, 30.0), scale=st.floats(1e-3, 1e3))
def test_newton_schulz_keeps_singular_vectors_and_pulls_singular_values_into_a_band(shape, seed, condition, scale):
    m, n = shape
    k = min(m, n)
    generator = torch.Generator().manual_seed(seed)
    singular = scale * torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    g, u, v = matrix_with_singular_values(generator, m, n, singular)
    out = newton_schulz(g)
    # An odd polynomial X p(X^T X): U^T out V is diagonal, and nothing leaks outside span(U), span(V).
    core = u.T @ out @ v
    off_diagonal = core - torch.diag(torch.diagonal(core))
    assert off_diagonal.abs().max() < 1e-9
    torch.testing.assert_close(u @ core @ v.T, out, rtol=0, atol=1e-9)
    new_singular = torch.diagonal(core)
    assert new_singular.min() > 0.6 and new_singular.max() < 1.25, new_singular
    assert out.dtype == g.dtype


def test_tiny_singular_values_stay_small_after_five_steps():
    generator = torch.Generator().manual_seed(0)
    g, u, v = matrix_with_singular_values(generator, 32, 16, [1.0] * 15 + [1e-6])
    core = u.T @ newton_schulz(g) @ v
    # p'(0) = a: five steps multiply a tiny s / |G|_F by a^5 ~ 484, far from 1.
    tiny = core[-1, -1].item()
    assert tiny == pytest.approx(A**5 * 1e-6 / math.sqrt(15), rel=1e-3) and tiny < 1e-3


@given(shape=shapes, seed=st.integers(0, 2**16), steps=st.integers(0, 6))
def test_newton_schulz_matches_the_svd_reference_in_float64(shape, seed, steps):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(newton_schulz(g, steps), reference_newton_schulz(g, steps), rtol=1e-9, atol=1e-10)


def test_newton_schulz_in_bfloat16_stays_near_the_float64_result():
    """The CUDA default computes in bf16; the same arithmetic on the CPU, against float64."""
    generator = torch.Generator().manual_seed(0)
    g, u, v = matrix_with_singular_values(generator, 96, 64, torch.logspace(0, -1, 64).tolist())
    low = newton_schulz(g.float(), dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    exact = newton_schulz(g)
    assert (low.double() - exact).norm() / exact.norm() < 0.06  # ~0.03 measured: bf16 has 8 mantissa bits
    core = u.T @ low.double() @ v  # still (nearly) diagonal: bf16 rounding, not a different map
    off_diagonal = core - torch.diag(torch.diagonal(core))
    assert off_diagonal.norm() / core.norm() < 0.06


def test_newton_schulz_of_a_stack_is_each_matrix_alone():
    stack = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.stack([newton_schulz(matrix) for matrix in stack])
    torch.testing.assert_close(newton_schulz(stack), expected, rtol=1e-12, atol=1e-14)


def test_newton_schulz_of_zero_is_zero_and_rejects_non_matrices():
    assert newton_schulz(torch.zeros(4, 6)).abs().max() == 0
    with pytest.raises(ValueError, match="matrices"):
        newton_schulz(torch.zeros(5))


def reference_muon(params, grads_per_step, *, lr, momentum, nesterov, weight_decay, ns_steps=5):
    """Muon written out leaf by leaf: EMA momentum, Nesterov, NS via SVD, RMS match, decay."""
    params = dict(params)
    buffers = {key: torch.zeros_like(p) for key, p in params.items()}
    for grads in grads_per_step:
        for key, p in params.items():
            g = grads[key]
            buffers[key] = momentum * buffers[key] + (1 - momentum) * g
            direction = (1 - momentum) * g + momentum * buffers[key] if nesterov else buffers[key]
            step = reference_newton_schulz(direction, ns_steps) * 0.2 * math.sqrt(max(p.shape))
            params[key] = p - lr * (step + weight_decay * p)
    return params


@given(lr=st.floats(1e-4, 0.1), momentum=st.floats(0.0, 0.99), nesterov=st.booleans(),
       weight_decay=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
def test_muon_matches_the_reference_in_float64(lr, momentum, nesterov, weight_decay, seed):
    generator = torch.Generator().manual_seed(seed)
    params = {"a": torch.randn(6, 4, generator=generator, dtype=torch.float64),
              "b": torch.randn(3, 7, generator=generator, dtype=torch.float64),
              "c": torch.randn(6, 4, generator=generator, dtype=torch.float64)}
    grads_per_step = [tree_map(lambda p: torch.randn(p.shape, generator=generator, dtype=p.dtype), params)
                      for _ in range(3)]
    optimizer = muon(lr, momentum, nesterov, weight_decay=weight_decay)
    state = optimizer.init(params)
    ours = params
    for grads in grads_per_step:
        updates, state = optimizer.update(grads, state, ours)
        ours = apply_updates(ours, updates)
    expected = reference_muon(params, grads_per_step, lr=lr, momentum=momentum, nesterov=nesterov,
                              weight_decay=weight_decay)
    for key in params:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-9, atol=1e-11)


def test_muon_update_rms_is_about_adamws():
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    updates, _ = muon(1.0, momentum=0.0).update({"w": g}, muon(1.0).init({"w": g}), {"w": g})
    rms = updates["w"].square().mean().sqrt().item()
    assert 0.12 < rms < 0.24  # 0.2 times NS's singular values, which land in ~[0.7, 1.2]


def tiny_model():
    return ModelConfig(vocab_size=40, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=24)


def test_muon_labels_give_hidden_matrices_to_muon_and_the_rest_to_adamw():
    labels = flatten(muon_labels(init_params(tiny_model())))
    assert labels["token_embeddings.weight"] == labels["lm_head.weight"] == "adamw"
    assert labels["ln_final.weight"] == labels["layers.0.ln1.weight"] == "adamw"
    assert labels["layers.1.attn.q_proj.weight"] == labels["layers.0.ffn.w2.weight"] == "muon"


def test_muon_adamw_is_muon_and_adamw_on_their_leaves():
    params = tree_map(lambda p: p.double(), init_params(tiny_model(), seed=3))
    generator = torch.Generator().manual_seed(1)
    grads = [tree_map(lambda p: torch.randn(p.shape, generator=generator, dtype=p.dtype), params) for _ in range(3)]
    combined = muon_adamw(0.02, 3e-3, weight_decay=0.1)
    groups = {label: {k for k, v in flatten(muon_labels(params)).items() if v == label} for label in ("muon", "adamw")}
    alone = {"muon": muon(0.02, weight_decay=0.1), "adamw": adamw(3e-3, 0.9, 0.95, 1e-8, 0.1)}

    def run(optimizer, tree, grads_per_step):
        state = optimizer.init(tree)
        for g in grads_per_step:
            updates, state = optimizer.update(g, state, tree)
            tree = apply_updates(tree, updates)
        return flatten(tree)

    together = run(combined, params, grads)
    flat_params, flat_grads = flatten(params), [flatten(g) for g in grads]
    for label, keys in groups.items():
        separate = run(alone[label], {k: flat_params[k] for k in keys}, [{k: g[k] for k in keys} for g in flat_grads])
        for key in keys:
            torch.testing.assert_close(together[key], separate[key], rtol=0, atol=0)


def test_muon_adamw_clips_all_gradients_together_and_reports_the_norm():
    params = init_params(tiny_model())
    grads = tree_map(lambda p: torch.full_like(p, 10.0), params)
    optimizer = muon_adamw(0.02, 1e-3, max_grad_norm=1.0)
    _, state = optimizer.update(grads, optimizer.init(params), params)
    expected = math.sqrt(sum(100.0 * leaf.numel() for leaf in tree_leaves(params)))
    assert find_state(state, ClipByGlobalNormState).grad_norm.item() == pytest.approx(expected, rel=1e-5)


@given(dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 1000))
def test_muon_adamw_state_keeps_structure_and_dtype(dtype, seed):
    params = tree_map(lambda p: p.to(dtype), init_params(tiny_model(), seed=seed))
    optimizer = muon_adamw(0.02, 1e-3, weight_decay=0.1, max_grad_norm=1.0)
    state = optimizer.init(params)
    grads = tree_map(torch.ones_like, params)
    updates, new_state = optimizer.update(grads, state, params)
    before, after = flatten(state), flatten(new_state)
    assert before.keys() == after.keys()
    assert any(".muon." in key and key.endswith("layers.0.attn.q_proj.weight") for key in after)
    for key in before:
        assert (before[key].dtype, before[key].shape) == (after[key].dtype, after[key].shape), key
    assert all(leaf.dtype == dtype for leaf in tree_leaves(updates))


def test_muon_under_vmap_equals_a_loop_over_runs():
    """Per-run learning rates and weight decays as (K,) tensors, stacked params: fnlm.sweep's use."""
    runs = 3
    per_run = [tree_map(lambda p: p.double(), init_params(tiny_model(), seed=s)) for s in range(runs)]
    generator = torch.Generator().manual_seed(0)
    grads = [tree_map(lambda p: torch.randn(p.shape, generator=generator, dtype=p.dtype), p) for p in per_run]
    lrs, decays = torch.tensor([0.01, 0.02, 0.04], dtype=torch.float64), torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64)

    def make(lr, wd):
        return muon_adamw(lr, lr / 10, weight_decay=wd, max_grad_norm=1.0)

    def one_step(params, grads, lr, wd):
        optimizer = make(lr, wd)
        updates, state = optimizer.update(grads, optimizer.init(params), params)
        return apply_updates(params, updates), state

    def stack(trees):
        return tree_map(lambda *leaves: torch.stack(leaves), *trees)

    batched = torch.func.vmap(one_step)(stack(per_run), stack(grads), lrs, decays)
    looped = stack([one_step(per_run[k], grads[k], lrs[k], decays[k]) for k in range(runs)])
    for (key, got), want in zip(flatten(batched).items(), flatten(looped).values()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=key)


def test_scale_by_muon_rejects_non_matrices_and_bad_hyperparameters():
    with pytest.raises(ValueError, match="norm.weight"):
        scale_by_muon().init({"norm": {"weight": torch.ones(4)}})
    with pytest.raises(ValueError, match="momentum"):
        muon(0.02, momentum=1.0)
    with pytest.raises(ValueError, match="ns_steps"):
        muon(0.02, ns_steps=-1)


def test_partition_errors_name_the_leaf_and_a_group_may_be_empty():
    tree = {"a": torch.ones(2, 2), "b": torch.ones(3)}
    sgd = adamw(0.1)
    with pytest.raises(ValueError, match="b is labelled 'other'"):
        partition({"x": sgd}, {"a": "x", "b": "other"}).init(tree)
    split = partition({"x": sgd, "unused": muon(0.1)}, lambda params: tree_map(lambda _: "x", params))
    updates, _ = split.update(tree, split.init(tree), tree)
    expected, _ = sgd.update(tree, sgd.init(tree), tree)
    for got, want in zip(tree_leaves(updates), tree_leaves(expected)):
        torch.testing.assert_close(got, want)


def test_warmup_stable_decay_values():
    schedule = warmup_stable_decay_schedule(1.0, 0.1, 10, 100, decay_fraction=0.2)
    values = [schedule_value(schedule, t) for t in (0, 5, 10, 50, 80, 90, 100, 150)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1])


@given(max_lr=st.floats(1e-5, 1.0), min_frac=st.floats(0.0, 1.0), warmup=st.integers(0, 50),
       extra=st.integers(0, 300), fraction=st.floats(0.0, 1.0))
def test_warmup_stable_decay_is_continuous_bounded_and_non_increasing_after_warmup(max_lr, min_frac, warmup, extra,
                                                                                   fraction):
    total = warmup + extra
    schedule = warmup_stable_decay_schedule(max_lr, max_lr * min_frac, warmup, total, fraction)
    values = [schedule_value(schedule, t) for t in range(total + 3)]
    assert all(max_lr * min_frac - 1e-12 <= v <= max_lr + 1e-12 for v in values[warmup:])
    assert all(later <= earlier + 1e-12 for earlier, later in zip(values[warmup:], values[warmup + 1:]))
    # no jump larger than one step of the warm-up or of the cool-down slope (at least one step long)
    cool_down = max(1.0, total - max(warmup, total - fraction * total))
    largest_step = max_lr / max(warmup, 1) + max_lr / cool_down + 1e-9
    assert all(abs(b - a) <= largest_step for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("sweep", [False, True], ids=["single run", "vmapped sweep"])
def test_muon_steps_trace_under_torch_compile_and_equal_eager(sweep):
    """The partition flattens params by path inside the compiled step: under dynamo it must use
    the traced flattener (fnlm.tree), as every other tree op does. (On an H200 the vmapped Muon
    sweep once failed to trace with optree's 'length mismatch'.) The eager backend traces
    exactly what inductor would get, without its compile time."""
    from fnlm.config import TrainConfig
    from fnlm.sweep import make_sweep_step, stack
    from fnlm.train import make_optimizer, make_train_step

    cfg, train_cfg = tiny_model(), TrainConfig(optimizer="muon", steps=10, warmup_steps=2)
    x, y = torch.randint(0, cfg.vocab_size, (2, 4, cfg.context_length), generator=torch.Generator().manual_seed(0))
    params = init_params(cfg, seed=0)
    opt_state = make_optimizer(train_cfg).init(params)
    if sweep:
        step = make_sweep_step(cfg, train_cfg)
        hparams = {"muon_lr": torch.tensor([0.01, 0.02])}
        args = (stack([params, params]), stack([opt_state, opt_state]), hparams, torch.ones(2, dtype=torch.bool), x, y)
    else:
        step = make_train_step(cfg, make_optimizer(train_cfg))
        args = (params, opt_state, x, y)
    torch._dynamo.reset()
    traced = torch.compile(step, backend="eager", fullgraph=True)(*args)
    for (key, got), want in zip(flatten(traced[:2]).items(), flatten(step(*args)[:2]).values()):
        torch.testing.assert_close(got, want, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compiled_muon_step_on_cuda_tracks_eager():
    """Inductor's code for the whole Muon step on a GPU (bf16 autocast, Newton-Schulz beside the
    fused AdamW): the losses and parameters of eager steps, to bf16 rounding."""
    from fnlm.config import TrainConfig
    from fnlm.train import make_optimizer, make_train_step

    cfg, optimizer = tiny_model(), make_optimizer(TrainConfig(optimizer="muon", steps=10, warmup_steps=2))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (2, 4, cfg.context_length), generator=generator).cuda()
               for _ in range(3)]
    runs = []
    for compile in (False, True):
        params = init_params(cfg, seed=0, device="cuda")
        opt_state, losses = optimizer.init(params), []
        step = make_train_step(cfg, optimizer, autocast_dtype=torch.bfloat16, device_type="cuda", compile=compile)
        for x, y in batches:
            params, opt_state, metrics = step(params, opt_state, x, y)
            losses.append(float(metrics.loss))
        runs.append((losses, params))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = runs
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-2, atol=0)
    torch.testing.assert_close(flatten(compiled_params), flatten(eager_params), rtol=2e-2, atol=2e-2)
