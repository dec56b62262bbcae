"""fnlm.optim against torch.optim.AdamW, clip_grad_norm_ and the CS336 snapshots; properties and errors."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnlm.optim import (
    ClipByGlobalNormState,
    ScaleByAdamState,
    add_decayed_weights,
    adamw,
    apply_updates,
    chain,
    clip_by_global_norm,
    find_state,
    schedule_value,
    warmup_cosine_schedule,
)
from fnlm.shims import AdamW
from fnlm.tree import flatten, tree_map
from tests import adapters
from tests.conftest import SNAPSHOTS

SHAPES = [(3, 4), (5,), (2, 3, 2), (1,)]


def random_tree(generator, dtype=torch.float64, scale=1.0):
    """A small params-like tree: a dict holding a list and nested dicts."""
    leaves = [scale * torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]
    return {"emb": {"weight": leaves[0]}, "layers": [{"w": leaves[1]}, {"w": leaves[2]}], "norm": leaves[3]}


def torch_adamw_run(params, grads_per_step, *, lr, betas, eps, weight_decay, max_grad_norm=None):
    """The oracle: torch.optim.AdamW (single-tensor path) on the same tree, by path."""
    flat = {key: torch.nn.Parameter(leaf.clone()) for key, leaf in flatten(params).items()}
    opt = torch.optim.AdamW(flat.values(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    for grads in grads_per_step:
        for key, grad in flatten(grads).items():
            flat[key].grad = grad.clone()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(flat.values(), max_grad_norm)
        opt.step()
    return {key: p.detach() for key, p in flat.items()}


def fnlm_run(optimizer, params, grads_per_step):
    state = optimizer.init(params)
    for grads in grads_per_step:
        updates, state = optimizer.update(grads, state, params)
        params = apply_updates(params, updates)
    return params, state


@given(
    lr=st.floats(1e-4, 1.0),
    b1=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    b2=st.sampled_from([0.0, 0.9, 0.95, 0.999, 0.9999]),
    eps=st.sampled_from([1e-12, 1e-8, 1e-3, 0.1]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1, 1.0]),
    clip=st.sampled_from([None, 0.1, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_adamw_matches_torch_adamw_in_float64(lr, b1, b2, eps, weight_decay, clip, seed):
    generator = torch.Generator().manual_seed(seed)
    params = random_tree(generator)
    grads_per_step = [random_tree(generator, scale=10 ** (i % 3 - 1)) for i in range(12)]
    expected = torch_adamw_run(
        params, grads_per_step, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, max_grad_norm=clip
    )
    got, _ = fnlm_run(adamw(lr, b1, b2, eps, weight_decay, max_grad_norm=clip), params, grads_per_step)
    for key, leaf in flatten(got).items():
        torch.testing.assert_close(leaf, expected[key], rtol=1e-10, atol=1e-12, msg=key)


@given(
    st.sampled_from([None, 0.5]),
    st.sampled_from([0.0, 0.1]),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_fused_adamw_equals_the_chain_bit_for_bit(clip, weight_decay, scheduled, tensor_hparams, seed):
    """adamw's fused update (leaves flattened once) runs the chain's arithmetic: same state, same bits."""
    generator = torch.Generator().manual_seed(seed)
    params = random_tree(generator, dtype=torch.float32)
    lr = warmup_cosine_schedule(1e-2, 1e-3, 2, 5) if scheduled else 1e-2
    if tensor_hparams:  # a sweep's per-run values (fnlm.sweep)
        clip = None if clip is None else torch.tensor(clip)
        weight_decay, lr = torch.tensor(weight_decay), lr if scheduled else torch.tensor(lr)
    runs = [
        fnlm_run(adamw(lr, 0.9, 0.95, 1e-8, weight_decay, max_grad_norm=clip, fused=fused), params,
                 [random_tree(torch.Generator().manual_seed(seed + i), dtype=torch.float32, scale=3.0) for i in range(4)])
        for fused in (True, False)
    ]
    (fused_params, fused_state), (chain_params, chain_state) = runs
    assert flatten(fused_state).keys() == flatten(chain_state).keys()
    for got, want in ((fused_params, chain_params), (fused_state, chain_state)):
        for key, leaf in flatten(got).items():
            assert torch.equal(leaf, flatten(want)[key]), key


def test_optimizer_zips_leaves_by_key_whatever_the_dict_order(monkeypatch):
    """Under torch.compile the trees flatten in dict insertion order (fnlm.tree): a state whose dicts
    were built in another order (a checkpoint's, a partition's groups) must still pair by key."""
    params = {"b": torch.ones(3), "a": torch.full((3,), 2.0)}
    grads = {"b": torch.tensor([1.0, -2.0, 3.0]), "a": torch.tensor([0.5, 0.25, -4.0])}
    for fused in (True, False):
        optimizer = adamw(0.1, weight_decay=0.1, max_grad_norm=1.0, fused=fused)
        reordered = {key: grads[key] * -2 for key in ("a", "b")}
        _, state = optimizer.update(reordered, optimizer.init(reordered), reordered)  # moments in a, b order
        want = apply_updates(params, optimizer.update(grads, state, params)[0])  # optree: sorted keys
        with monkeypatch.context() as patch:
            patch.setattr(torch.compiler, "is_compiling", lambda: True)  # fnlm.tree's flattener under dynamo
            got = apply_updates(params, optimizer.update(grads, state, params)[0])
        torch.testing.assert_close(got, want)


def _cs336_optimize(opt_class) -> torch.Tensor:
    """CS336's tests/test_optimizer.py::_optimize."""
    torch.manual_seed(42)
    model = torch.nn.Linear(3, 2, bias=False)
    opt = opt_class(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(1000):
        opt.zero_grad()
        x = torch.rand(model.in_features)
        y_hat = model(x)
        y = torch.tensor([x[0] + x[1], -x[2]])
        loss = ((y - y_hat) ** 2).sum()
        loss.backward()
        opt.step()
    return model.weight.detach()


def test_adamw_shim_matches_the_snapshot_and_torch():
    ours = _cs336_optimize(adapters.get_adamw_cls())
    np.testing.assert_allclose(ours.numpy(), np.load(SNAPSHOTS / "test_adamw.npz")["array"], atol=1e-4)
    torch.testing.assert_close(ours, _cs336_optimize(torch.optim.AdamW), rtol=0, atol=1e-5)


def test_adamw_shim_state_dict_is_torchs_format_and_round_trips():
    torch.manual_seed(0)

    def model_and_steps(opt_class, steps, model=None, opt=None):
        model = model or torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = opt or opt_class(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        for step in range(steps):
            opt.zero_grad()
            model(torch.full((4,), float(step + 1))).square().sum().backward()
            opt.step()
        return model, opt

    model, opt = model_and_steps(AdamW, 3)
    state = _copy(opt.state_dict())  # load_state_dict aliases tensors, and torch's step mutates them
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["state"][0]["step"].dtype == torch.float32 and float(state["state"][0]["step"]) == 3
    # torch's AdamW continues from our state, and ours from torch's, identically.
    torch_model, torch_opt = model_and_steps(torch.optim.AdamW, 0, model=_copy(model))
    torch_opt.load_state_dict(state)
    ours_model, ours_opt = model_and_steps(AdamW, 0, model=_copy(model))
    ours_opt.load_state_dict(_copy(torch_opt.state_dict()))
    model_and_steps(None, 2, torch_model, torch_opt)
    model_and_steps(None, 2, ours_model, ours_opt)
    for a, b in zip(torch_model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(a, b)


def test_adamw_shim_skips_params_without_grad_and_keeps_per_param_steps():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    ours, reference = AdamW([a, b], lr=0.1), torch.optim.AdamW([a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()], lr=0.1)
    for step in range(4):
        for opt in (ours, reference):
            p, q = opt.param_groups[0]["params"]
            p.grad = torch.full((2,), step + 1.0)
            q.grad = torch.full((2,), -1.0) if step % 2 else None
            opt.step()
    for p, q in zip(ours.param_groups[0]["params"], reference.param_groups[0]["params"]):
        torch.testing.assert_close(p, q)
        assert float(ours.state[p]["step"]) == float(reference.state[q]["step"])


def _copy(obj):
    return copy.deepcopy(obj)


def test_gradient_clipping_matches_clip_grad_norm_cs336_setup():
    tensors = [torch.randn((5, 5)) for _ in range(6)]
    for max_norm in (1e-2, 1e4):
        results = []
        for clip in (torch.nn.utils.clip_grad_norm_, adapters.run_gradient_clipping):
            params = tuple(torch.nn.Parameter(torch.clone(t)) for t in tensors)
            params[-1].requires_grad_(False)  # its grad stays None and is skipped
            torch.cat(params).sum().backward()
            clip(params, max_norm)
            results.append([p.grad for p in params if p.grad is not None])
        assert len(results[0]) == len(results[1]) == 5
        for expected, got in zip(*results):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@given(st.floats(1e-3, 1e3), st.integers(0, 2**16), st.floats(1e-4, 1e4))
def test_clipped_global_norm_is_at_most_max_and_small_gradients_pass_unchanged(max_norm, seed, scale):
    grads = random_tree(torch.Generator().manual_seed(seed), dtype=torch.float32, scale=scale)
    clip = clip_by_global_norm(max_norm)
    clipped, state = clip.update(grads, clip.init(grads))
    norm = torch.linalg.vector_norm(torch.cat([leaf.flatten() for leaf in flatten(grads).values()]).double())
    torch.testing.assert_close(state.grad_norm.double(), norm, rtol=1e-5, atol=0)
    clipped_norm = torch.linalg.vector_norm(torch.cat([leaf.flatten() for leaf in flatten(clipped).values()]).double())
    assert clipped_norm <= max_norm * (1 + 1e-6)
    if norm <= max_norm:
        assert all(torch.equal(a, b) for a, b in zip(flatten(clipped).values(), flatten(grads).values()))


CS336_COSINE = [
    0, 0.14285714285714285, 0.2857142857142857, 0.42857142857142855, 0.5714285714285714,
    0.7142857142857143, 0.8571428571428571, 1.0, 0.9887175604818206, 0.9554359905560885,
    0.9018241671106134, 0.8305704108364301, 0.7452476826029011, 0.6501344202803414, 0.55,
    0.44986557971965857, 0.3547523173970989, 0.26942958916356996, 0.19817583288938662,
    0.14456400944391146, 0.11128243951817937, 0.1, 0.1, 0.1, 0.1,
]


def test_cosine_schedule_matches_cs336_values():
    got = [adapters.run_get_lr_cosine_schedule(it, 1, 0.1, 7, 21) for it in range(25)]
    np.testing.assert_allclose(got, CS336_COSINE)


@given(
    max_lr=st.floats(1e-5, 10.0),
    min_frac=st.floats(0.0, 1.0),
    warmup=st.integers(0, 50),
    decay=st.integers(0, 200),
)
def test_schedule_is_continuous_bounded_and_shaped(max_lr, min_frac, warmup, decay):
    min_lr, cosine_steps = max_lr * min_frac, warmup + decay
    schedule = warmup_cosine_schedule(max_lr, min_lr, warmup, cosine_steps)
    steps = torch.arange(cosine_steps + 20, dtype=torch.float64)
    lrs = schedule(steps)
    assert bool(((lrs >= 0) & (lrs <= max_lr * (1 + 1e-12))).all())
    # Each step moves the lr by at most the steepest slope of either piece: no jumps at the joins.
    slope = max_lr / max(warmup, 1) + math.pi / 2 * (max_lr - min_lr) / max(decay, 1)
    assert float(lrs.diff().abs().max()) <= slope * (1 + 1e-9)
    assert bool((lrs[:warmup].diff() >= 0).all()) and bool((lrs[warmup:].diff() <= 1e-12).all())
    assert float(lrs[-1]) == pytest.approx(min_lr, rel=1e-9, abs=1e-15)
    # The float view and the int32 count used in training agree with the float64 tensor form.
    assert schedule_value(schedule, warmup) == pytest.approx(float(lrs[warmup]), rel=1e-12)
    counts = torch.arange(cosine_steps + 20, dtype=torch.int32)
    torch.testing.assert_close(schedule(counts), lrs.float(), rtol=1e-5, atol=1e-7 * max_lr)


@given(
    st.sampled_from([torch.float32, torch.float64]),
    st.sampled_from([None, 1.0]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_optimizer_state_keeps_structure_dtype_and_device(dtype, clip, scheduled, seed):
    generator = torch.Generator().manual_seed(seed)
    lr = warmup_cosine_schedule(1e-2, 1e-3, 2, 5) if scheduled else 1e-2
    optimizer = adamw(lr, weight_decay=0.1, max_grad_norm=clip)
    params = random_tree(generator, dtype=dtype)
    state = optimizer.init(params)
    before = {key: (leaf.dtype, leaf.shape, leaf.device) for key, leaf in flatten(state).items()}
    for _ in range(3):
        updates, state = optimizer.update(random_tree(generator, dtype=dtype), state, params)
        params = apply_updates(params, updates)
        assert {key: (leaf.dtype, leaf.shape, leaf.device) for key, leaf in flatten(state).items()} == before
        assert {leaf.dtype for leaf in flatten(params).values()} == {dtype}
    assert int(find_state(state, ScaleByAdamState).count) == 3
    assert (find_state(state, ClipByGlobalNormState) is None) == (clip is None)


def test_update_is_pure():
    generator = torch.Generator().manual_seed(0)
    params, grads = random_tree(generator), random_tree(generator)
    optimizer = adamw(warmup_cosine_schedule(1e-2, 1e-3, 1, 5), weight_decay=0.1, max_grad_norm=0.5)
    state = optimizer.init(params)
    _, state = optimizer.update(grads, state, params)
    snapshot = [tree_map(torch.clone, tree) for tree in (params, grads, state)]
    updates, _ = optimizer.update(grads, state, params)
    new_params = apply_updates(params, updates)
    for original, before in zip((params, grads, state), snapshot):
        assert all(torch.equal(a, b) for a, b in zip(flatten(original).values(), flatten(before).values()))
    assert not torch.equal(new_params["norm"], params["norm"])


def test_weight_decay_mask_spares_masked_leaves():
    params = {"w": torch.ones(3), "gain": torch.ones(3)}
    zeros = tree_map(torch.zeros_like, params)
    decay = add_decayed_weights(0.5, mask=lambda p: {"w": True, "gain": False})
    updates, _ = decay.update(zeros, decay.init(params), params)
    assert torch.equal(updates["w"], torch.full((3,), 0.5)) and torch.equal(updates["gain"], torch.zeros(3))
    with pytest.raises(ValueError, match="mask must be a tree of 2 bools"):
        add_decayed_weights(0.5, mask={"w": True}).update(zeros, (), params)
    with pytest.raises(ValueError, match="needs params"):
        decay.update(zeros, ())


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: adamw(-1e-3), ValueError, "learning_rate must be >= 0"),
        (lambda: adamw(1e-3, b1=1.0), ValueError, r"b1 must be in \[0, 1\)"),
        (lambda: adamw(1e-3, b2=-0.1), ValueError, "b2 must be in"),
        (lambda: adamw(1e-3, eps=float("nan")), ValueError, "eps must be >= 0"),
        (lambda: adamw(1e-3, weight_decay=-1), ValueError, "weight_decay must be >= 0"),
        (lambda: adamw(1e-3, max_grad_norm=0.0), ValueError, "max_norm must be > 0"),
        (lambda: adamw("1e-3"), TypeError, "learning_rate must be a real number"),
        (lambda: adamw(1e-3, b1=True), TypeError, "b1 must be a real number"),
        (lambda: warmup_cosine_schedule(1.0, 2.0, 0, 10), ValueError, r"min_lr must be in \[0, max_lr"),
        (lambda: warmup_cosine_schedule(1.0, 0.1, 10, 5), ValueError, "cosine_steps must be >= 10"),
        (lambda: warmup_cosine_schedule(1.0, 0.1, 1.5, 5), TypeError, "warmup_steps must be an int"),
        (lambda: AdamW([torch.nn.Parameter(torch.ones(1))], lr=1e-3, betas=(0.9, 1.5)), ValueError, "b2"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_chain_rejects_a_foreign_state():
    optimizer = chain(clip_by_global_norm(1.0))
    params = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="chain of 1 transformations got a state of 2"):
        optimizer.update(params, ((), ()), params)
