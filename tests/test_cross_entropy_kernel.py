"""The cross-entropy kernel against the float64 definition and fnlm.fused_ce's plain path: under
Triton's CPU interpreter, and on CUDA.

TRITON_INTERPRET must be set before the kernel is defined, so the interpreted check runs in a
fresh process. The interpreter has no bfloat16: float16 and float32 there.
"""

import pytest
import torch

from tests.conftest import run_interpreted, skip_before_interpreter_3_9

triton = pytest.importorskip("triton")


def check_kernel(device: str = "cpu", dtypes=(torch.float16, torch.float32)) -> None:
    from fnlm import cross_entropy_kernel
    from fnlm.fused_ce import linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    # widths under one block, over one (the loop), with padding columns; logits up to 1e4 apart
    for rows, vocab, padded, spread in [(5, 67, 128, 3.0), (3, 5000, 5056, 3.0), (4, 300, 300, 1e3), (0, 10, 16, 1.0)]:
        logits = torch.randn(rows, padded, generator=generator, dtype=torch.float64) * spread
        targets = torch.randint(0, vocab, (rows,), generator=generator)
        for dtype in dtypes:
            rounded = logits.to(dtype)
            exact = rounded.double()[:, :vocab]  # the kernel's own input, so that only its error counts
            want_losses = exact.logsumexp(-1) - exact.gather(-1, targets[:, None])[:, 0]
            want_grad = torch.zeros_like(logits)
            want_grad[:, :vocab] = (exact.softmax(-1) - torch.nn.functional.one_hot(targets, vocab)) / 7
            grad = rounded.to(device)
            losses = cross_entropy_kernel.softmax_cross_entropy_(grad, targets.to(device), vocab, 1 / 7)
            assert losses.dtype == torch.float32 and grad.dtype == dtype
            torch.testing.assert_close(losses.double().cpu(), want_losses, atol=1e-4, rtol=1e-5)
            # the gradient's own rounding; in float32, that of x log2 e - lse at logits ~1e3 (CUDA's exp2
            # then turns an ulp there, 6e-5, into a relative error of 4e-5)
            tolerance = 2e-4 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(grad.double().cpu(), want_grad, atol=tolerance / 7, rtol=tolerance)
            assert (grad[:, vocab:] == 0).all()
    # a target outside the vocabulary: a NaN loss, not a read of another row
    grad = torch.zeros(3, 8, device=device)
    losses = cross_entropy_kernel.softmax_cross_entropy_(grad, torch.tensor([-1, 6, 2], device=device), 6, 1.0)
    assert losses[:2].isnan().all() and losses[2].isfinite() and (grad[:2] >= 0).all()
    labels = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        cross_entropy_kernel.softmax_cross_entropy_(torch.zeros(2, 8, device=device), labels, 9, 1.0)
    with pytest.raises(ValueError, match="row-contiguous"):
        cross_entropy_kernel.softmax_cross_entropy_(torch.zeros(8, 2, device=device).T, labels, 8, 1.0)

    # through the LM head: half weights on the kernel path against float64 on the plain one
    weight = torch.randn(250, 32, generator=generator, dtype=torch.float64) * 0.3
    x = torch.randn(2, 9, 32, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 250, (2, 9), generator=generator)
    loss_and_grads = torch.func.grad_and_value(linear_cross_entropy, argnums=(0, 1))
    (gw, gx), loss = loss_and_grads(weight.to(dtypes[0]).to(device), x.to(dtypes[0]).to(device), labels.to(device),
                                    chunk_rows=4)
    (want_gw, want_gx), want_loss = loss_and_grads(weight, x, labels, chunk_rows=4)
    torch.testing.assert_close(loss.double().cpu(), want_loss, atol=5e-3, rtol=1e-3)
    torch.testing.assert_close(gw.double().cpu(), want_gw, atol=5e-4, rtol=1e-2)
    torch.testing.assert_close(gx.double().cpu(), want_gx, atol=5e-4, rtol=1e-2)
    # and vmapped over stacked runs' weights, as a sweep's training step
    weights = torch.stack([weight, 2 * weight]).to(dtypes[0]).to(device)
    half_x = x.to(dtypes[0]).to(device)
    (gws, _), losses = torch.func.vmap(loss_and_grads, in_dims=(0, None, None))(weights, half_x, labels.to(device))
    for i in range(2):
        (gw, _), loss = loss_and_grads(weights[i], half_x, labels.to(device))
        torch.testing.assert_close(losses[i], loss)
        torch.testing.assert_close(gws[i], gw)
    # float32 master weights under half autocast get float32 gradients; compiled, the same values
    # (torch.compile calls the op, whose fake says what it returns)
    def autocast_loss(weight, x):
        with torch.autocast(device, dtypes[0]):
            return linear_cross_entropy(weight, x, labels.to(device), chunk_rows=4)

    master = (weight.float().to(device), x.float().to(device))
    with torch.profiler.profile() as eager:
        (gw, gx), loss = torch.func.grad_and_value(autocast_loss, argnums=(0, 1))(*master)
    assert gw.dtype == gx.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(gw.double().cpu(), want_gw, atol=5e-4, rtol=1e-2)
    compiled_loss_and_grads = torch.compile(torch.func.grad_and_value(autocast_loss, argnums=(0, 1)), fullgraph=True)
    torch.testing.assert_close(compiled_loss_and_grads(*master), ((gw, gx), loss))
    with torch.profiler.profile() as compiled_run:  # after compiling: only the compiled program's calls count
        compiled_loss_and_grads(*master)
    # both ran the chunks as the one op (which holds one chunk's gradient at a time), not traced
    for profile in (eager, compiled_run):
        assert "fnlm::linear_cross_entropy" in {event.key for event in profile.key_averages()}
    print("cross-entropy kernel ok")


@skip_before_interpreter_3_9(triton, "a kernel's scalar argument (the loops over the vocabulary)")
def test_the_kernel_matches_the_definition_under_the_interpreter():
    run_interpreted("test_cross_entropy_kernel", "check_kernel", "cross-entropy kernel ok")


def test_the_kernel_is_not_used_on_the_cpu():
    from fnlm import cross_entropy_kernel

    assert cross_entropy_kernel.supports(torch.device("cpu"), torch.float32) == cross_entropy_kernel.INTERPRET


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_kernel_matches_the_definition_on_cuda():
    check_kernel("cuda", dtypes=(torch.float16, torch.bfloat16, torch.float32))  # the LM head check: float16
    # inside torch.compile, where the training step runs it
    from fnlm.fused_ce import linear_cross_entropy

    weight, x = torch.randn(1000, 64, device="cuda") * 0.1, torch.randn(300, 64, device="cuda")
    labels = torch.randint(0, 1000, (300,), device="cuda")

    def loss(weight, x):
        with torch.autocast("cuda", torch.bfloat16):
            return linear_cross_entropy(weight, x, labels, chunk_rows=128)

    want = torch.func.grad_and_value(loss, argnums=(0, 1))(weight, x)
    got = torch.compile(torch.func.grad_and_value(loss, argnums=(0, 1)), fullgraph=True)(weight, x)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-3)
