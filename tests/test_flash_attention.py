"""The Triton attention kernels against the PyTorch definition, run by Triton's CPU interpreter.

TRITON_INTERPRET must be set before the kernels are defined, so the checks run in a fresh
interpreter process. The interpreter has no bfloat16, hence float16 here; the GPU benchmark
(scripts/bench_train.py) compares bfloat16 training losses against the plain path.
"""

import pytest
import torch

from tests.conftest import run_interpreted, skip_before_interpreter_3_9

triton = pytest.importorskip("triton")


def check_kernels() -> None:
    from fnlm import flash_attention
    from fnlm.config import ModelConfig
    from fnlm.model import init_params, transformer_lm
    from fnlm.nn import cross_entropy, scaled_dot_product_attention
    from fnlm.tree import tree_map

    assert flash_attention.INTERPRET
    # T = 256 is a multiple of every block: the EVEN kernels, which mask only the diagonal
    for seq_len, head_dim in [(1, 16), (5, 32), (64, 32), (130, 64), (256, 32), (256, 64)]:
        q, k, v = (torch.randn(2, 3, seq_len, head_dim, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                   for s in range(3))
        grad_out = torch.randn(2, 3, seq_len, head_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()

        def loss(q, k, v, attend):
            return (attend(q, k, v) * grad_out).sum()

        half = [t.half() for t in (q, k, v)]
        assert flash_attention.supports(half[0])
        torch.testing.assert_close(
            flash_attention.causal_attention(*half).double(), scaled_dot_product_attention(q, k, v, causal),
            atol=5e-3, rtol=5e-3,
        )
        got = torch.func.grad(loss, argnums=(0, 1, 2))(*half, flash_attention.causal_attention)
        want = torch.func.grad(loss, argnums=(0, 1, 2))(
            q, k, v, lambda q, k, v: scaled_dot_product_attention(q, k, v, causal)
        )
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, atol=2e-2, rtol=2e-2)

    # laid out (B, T, H, D), so that concatenating the heads for the output projection is a view
    assert flash_attention.causal_attention(*half).transpose(1, 2).is_contiguous()

    # vmap over grad, as a sweep of stacked models does
    stacked = torch.stack([half[0], 2 * half[0]])
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None, None, None))(
        stacked, half[1], half[2], flash_attention.causal_attention
    )
    torch.testing.assert_close(grads[0], got[0])

    # rotary attention over one projection: the gradient with dq, dk rotated back, as autograd's
    from fnlm.nn import qkv_heads, rope_tables, rotate_pairs

    def rotate_then_attend(qkv, cos, sin):
        q, k, v = qkv_heads(qkv)
        return scaled_dot_product_attention(rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin), v, causal)

    for seq_len in (5, 64, 130):
        qkv = torch.randn(2, seq_len, 3, 2, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        grad_out = torch.randn(2, 2, seq_len, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        cos, sin = rope_tables(torch.arange(seq_len), 32, 100.0, torch.float32)
        fused = lambda qkv: flash_attention.rotary_causal_attention(qkv, cos, sin)  # noqa: E731
        torch.testing.assert_close(fused(qkv.half()).double(), rotate_then_attend(qkv, cos.double(), sin.double()),
                                   atol=5e-3, rtol=5e-3)
        got = torch.func.grad(lambda qkv: (fused(qkv) * grad_out).sum())(qkv.half())
        want = torch.func.grad(lambda qkv: (rotate_then_attend(qkv, cos.double(), sin.double()) * grad_out).sum())(qkv)
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    stacked = torch.stack([qkv.half(), 2 * qkv.half()])  # and under vmap, as a sweep
    grads = torch.func.vmap(torch.func.grad(lambda qkv: (fused(qkv) * grad_out).sum()))(stacked)
    torch.testing.assert_close(grads[0], got)
    # its rotation op (T = 130: a partial last block) is rotate_pairs of q and k, (B, 2, H, T, D)
    q, k, _ = qkv_heads(qkv.half())
    torch.testing.assert_close(torch.ops.fnlm.rotate_qk(qkv.half(), cos, sin),
                               torch.stack([rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)], 1))

    # the whole model in float16 takes the kernel path and matches float64 without it
    cfg = ModelConfig(vocab_size=50, context_length=24, d_model=64, num_layers=2, num_heads=2, d_ff=96)
    params = init_params(cfg, seed=0, dtype=torch.float64)
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(0))
    loss16 = cross_entropy(transformer_lm(tree_map(torch.Tensor.half, params), ids, cfg, attention="triton"), ids)
    loss64 = cross_entropy(transformer_lm(params, ids, cfg, attention="plain"), ids)
    assert abs(loss16.item() - loss64.item()) < 1e-2, (loss16, loss64)
    # the same with QK-norm, which rotates normalized q and k: the unfused kernel
    cfg = ModelConfig(vocab_size=50, context_length=24, d_model=64, num_layers=1, num_heads=2, d_ff=96, qk_norm=True)
    params = init_params(cfg, seed=0, dtype=torch.float64)
    loss16 = cross_entropy(transformer_lm(tree_map(torch.Tensor.half, params), ids, cfg, attention="triton"), ids)
    loss64 = cross_entropy(transformer_lm(params, ids, cfg, attention="plain"), ids)
    assert abs(loss16.item() - loss64.item()) < 1e-2, (loss16, loss64)
    print("flash attention kernels ok")


@skip_before_interpreter_3_9(triton, "the program id (the kernels' causal skip)")
def test_kernels_match_the_definition_under_the_interpreter():
    run_interpreted("test_flash_attention", "check_kernels", "flash attention kernels ok")


def test_kernels_are_not_used_for_float32_or_on_the_cpu():
    from fnlm import flash_attention

    q = torch.zeros(1, 2, 8, 32)
    assert not flash_attention.supports(q)
    assert not flash_attention.supports(q.half()) or flash_attention.INTERPRET


def test_the_kernel_is_an_explicit_choice():
    from fnlm import flash_attention
    from fnlm.nn import causal_attention, scaled_dot_product_attention

    q, k, v = (torch.randn(1, 2, 8, 32, generator=torch.Generator().manual_seed(s)) for s in range(3))
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    for kernel in ("auto", "plain"):  # auto means the kernels on CUDA only
        torch.testing.assert_close(causal_attention(q, k, v, kernel), scaled_dot_product_attention(q, k, v, causal))
    with pytest.raises(ValueError, match="Triton attention kernels need"):
        causal_attention(q, k, v, "triton")  # float32
    with pytest.raises(ValueError, match="must be one of"):
        causal_attention(q, k, v, "flash")
    for head_dim in (16, 32, 64, 128):  # the EVEN paths rely on one block size dividing the other
        block_m, block_n, *_ = flash_attention.tuning("forward", head_dim)
        small, big, *_ = flash_attention.tuning("backward", head_dim)
        assert block_m % block_n == 0 and big % small == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_rotary_kernel_compiled_on_cuda_matches_the_definition():
    """bf16 on the GPU, eager and inside torch.compile(fullgraph=True), against float32 without kernels."""
    from fnlm.nn import multihead_self_attention

    cuda, d_model, heads = torch.device("cuda"), 256, 4
    generator = torch.Generator().manual_seed(0)
    params = {name: {"weight": torch.randn(d_model, d_model, generator=generator).to(cuda) * d_model**-0.5}
              for name in ("q_proj", "k_proj", "v_proj", "output_proj")}
    x = torch.randn(2, 384, d_model, generator=generator).to(cuda)  # the EVEN kernels; the interpreter checks the rest

    def loss(params, x, attention):
        with torch.autocast("cuda", torch.bfloat16, enabled=attention == "triton"):
            return multihead_self_attention(params, x, heads, rope_theta=10000.0, attention=attention).float().square().mean()

    want = torch.func.grad(loss, argnums=(0, 1))(params, x, "plain")
    for grad in (torch.func.grad(loss, argnums=(0, 1)), torch.compile(torch.func.grad(loss, argnums=(0, 1)), fullgraph=True)):
        got = grad(params, x, "triton")
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            torch.testing.assert_close(g, w, atol=2e-2 * w.abs().max().item(), rtol=0)
