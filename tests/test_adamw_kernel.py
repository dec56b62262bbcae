"""The AdamW kernel (one launch over all leaves) against the foreach chain: under Triton's CPU
interpreter, and on CUDA.

TRITON_INTERPRET must be set before the kernel is defined, so the interpreted check runs in a
fresh process.
"""

import functools

import pytest
import torch

from tests.conftest import run_interpreted

triton = pytest.importorskip("triton")


def run_adamw(device: str) -> None:
    """Four steps of adamw as its fused step, as its update (on CUDA or interpreted: the kernel's
    two modes) and as its chain agree on params and state, with and without clipping, over
    leaves longer and shorter than a block."""
    from fnlm.optim import adamw, apply_step, apply_updates, warmup_cosine_schedule
    from fnlm.tree import tree_leaves, tree_map

    generator = torch.Generator().manual_seed(0)
    params = {"long": torch.randn(5000, generator=generator),
              "blocks": {"w": torch.randn(33, 17, generator=generator), "b": torch.randn(3, generator=generator)}}
    params = tree_map(lambda leaf: leaf.to(device), params)
    for max_grad_norm in (None, 0.5):
        schedule = warmup_cosine_schedule(1e-2, 1e-3, 2, 10)
        fused, chain = (adamw(schedule, weight_decay=0.1, max_grad_norm=max_grad_norm, fused=f) for f in (True, False))
        assert chain.fused_step is None

        def update_then_apply(grads, state, params):
            updates, state = fused.update(grads, state, params)
            return apply_updates(params, updates), state

        steps = [functools.partial(apply_step, fused), update_then_apply, functools.partial(apply_step, chain)]
        sides = [(params, fused.init(params)) for _ in steps]
        for _ in range(4):
            grads = tree_map(lambda leaf: torch.randn(leaf.shape, generator=generator).to(device), params)
            sides = [step(grads, state, tree) for step, (tree, state) in zip(steps, sides)]
        for side in sides[:2]:
            for got, want in zip(tree_leaves(side), tree_leaves(sides[2])):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def check_kernel(device: str = "cpu") -> None:
    from fnlm.optim import adamw, adamw_kernel, apply_step
    from fnlm.tree import tree_leaves

    leaf = torch.zeros(3, device=device)
    assert adamw_kernel.supports(leaf) and not adamw_kernel.supports(leaf.double()) and not adamw_kernel.supports()
    run_adamw(device)
    # inside a compiled function (as in muon_adamw's compiled update) the op stays opaque
    optimizer = adamw(1e-2, weight_decay=0.1, max_grad_norm=1.0)
    params = {"w": torch.randn(40, 3, device=device), "b": torch.randn(3, device=device)}
    grads = {"w": torch.ones(40, 3, device=device), "b": -torch.ones(3, device=device)}

    def step(grads, state, params):
        return apply_step(optimizer, grads, state, params)

    want = step(grads, optimizer.init(params), params)
    got = torch.compile(step, fullgraph=True)(grads, optimizer.init(params), params)
    for g, w in zip(tree_leaves(got), tree_leaves(want)):
        torch.testing.assert_close(g, w)
    print("adamw kernel ok")


def test_the_kernel_matches_the_chain_under_the_interpreter():
    run_interpreted("test_adamw_kernel", "check_kernel", "adamw kernel ok")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_kernel_matches_the_chain_on_cuda():
    check_kernel("cuda")


def test_the_fused_step_is_the_update_applied_on_the_cpu():
    run_adamw("cpu")  # the foreach path, without Triton's interpreter


def test_the_kernel_is_not_used_on_the_cpu_or_under_vmap():
    from fnlm.optim import adamw_kernel

    leaf = torch.zeros(4, device="cuda" if torch.cuda.is_available() else "cpu")
    assert adamw_kernel.supports(leaf) == (leaf.is_cuda or adamw_kernel.INTERPRET)
    seen = []
    torch.func.vmap(lambda x: seen.append(adamw_kernel.supports(x)) or x)(leaf[None])  # a sweep's stacked runs
    assert seen == [False]
