"""The whole LM against the independent nn.Module reference, gradients, properties and errors."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnlm import nn as fnn
from fnlm.config import ModelConfig
from fnlm.model import init_params, lm_spec, num_params, transformer_block, transformer_lm
from fnlm.shims import MultiHeadSelfAttention, TransformerBlock, TransformerLM
from fnlm.tree import flatten, tree_map
from tests import adapters
from tests.reference import ReferenceLM

TINY = ModelConfig(vocab_size=50, context_length=12, d_model=16, num_layers=2, num_heads=4, d_ff=24)
ABLATIONS = {
    "base": {},
    "no_rmsnorm": {"remove_rmsnorm": True},
    "post_norm": {"use_post_norm": True},
    "nope": {"remove_rope": True},
    "silu_ffn": {"ffn_type": "silu", "d_ff": 64},
}


def tokens(cfg, batch=3, seq=None, seed=0):
    seq = cfg.context_length if seq is None else seq
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def reference_with(params, cfg):
    ref = ReferenceLM(cfg).double()
    ref.load_state_dict(flatten(params), strict=True)
    return ref


@pytest.mark.parametrize("ablation", ABLATIONS)
@pytest.mark.parametrize("seq", [12, 5])
def test_lm_matches_reference_for_every_ablation(ablation, seq):
    cfg = dataclasses.replace(TINY, **ABLATIONS[ablation])
    params = init_params(cfg, seed=1, dtype=torch.float64)
    ids = tokens(cfg, seq=seq)
    torch.testing.assert_close(transformer_lm(params, ids, cfg), reference_with(params, cfg)(ids))


def test_func_grad_equals_backward_through_shim_and_reference():
    cfg, ids, targets = TINY, tokens(TINY), tokens(TINY, seed=1)
    params = init_params(cfg, seed=2, dtype=torch.float64)

    def loss(p):
        return fnn.cross_entropy(transformer_lm(p, ids, cfg), targets)

    grads = flatten(torch.func.grad(loss)(params))
    shim = TransformerLM(cfg, params=tree_map(torch.clone, params))
    fnn.cross_entropy(shim(ids), targets).backward()
    ref = reference_with(params, cfg)
    ref.loss(ids, targets).backward()
    for name, module in (("shim", shim), ("reference", ref)):
        for key, p in module.named_parameters():
            torch.testing.assert_close(grads[key], p.grad, msg=lambda m: f"{name} {key}: {m}")


def test_adapters_load_state_dicts_into_lm_and_block():
    cfg = TINY
    params = init_params(cfg, seed=3)
    ids = tokens(cfg, seq=7)
    expected = transformer_lm(params, ids, cfg)
    got = adapters.run_transformer_lm(cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.num_layers,
                                      cfg.num_heads, cfg.d_ff, cfg.rope_theta, flatten(params), ids)
    torch.testing.assert_close(got, expected)
    x = torch.randn(2, 7, cfg.d_model)
    block = {k.removeprefix("layers.0."): v for k, v in flatten(params).items() if k.startswith("layers.0.")}
    got = adapters.run_transformer_block(cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.context_length,
                                         cfg.rope_theta, block, x)
    torch.testing.assert_close(got, transformer_block(params["layers"][0], x, cfg))


def test_init_follows_the_handout_and_is_per_leaf():
    cfg = ModelConfig(vocab_size=1000, context_length=8, d_model=64, num_layers=2, num_heads=4, d_ff=192)
    params = init_params(cfg, seed=0)
    emb, w1 = params["token_embeddings"]["weight"], params["layers"][0]["ffn"]["w1"]["weight"]
    assert emb.abs().max() <= 3 and 0.9 < emb.std() < 1.0  # N(0, 1) truncated at +-3
    std = (2 / (64 + 192)) ** 0.5
    assert w1.abs().max() <= 3 * std and 0.9 * std < w1.std() < std
    assert torch.equal(params["layers"][0]["ln1"]["weight"], torch.ones(64))
    assert torch.equal(init_params(cfg, seed=0)["lm_head"]["weight"], params["lm_head"]["weight"])
    assert not torch.equal(init_params(cfg, seed=1)["lm_head"]["weight"], params["lm_head"]["weight"])
    deeper = init_params(dataclasses.replace(cfg, num_layers=3), seed=0)
    assert torch.equal(deeper["layers"][1]["attn"]["q_proj"]["weight"], params["layers"][1]["attn"]["q_proj"]["weight"])
    assert num_params(params) == 2 * 1000 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 192 + 2 * 64) + 64


def test_init_dtype_and_device_follow_arguments():
    params = init_params(TINY, dtype=torch.bfloat16, device="cpu")
    assert {leaf.dtype for leaf in flatten(params).values()} == {torch.bfloat16}


@given(st.sampled_from(list(ABLATIONS)), st.integers(1, 3), st.integers(1, 4))
def test_shim_state_dict_keys_equal_flatten_keys(ablation, num_layers, heads_log2):
    cfg = dataclasses.replace(TINY, num_layers=num_layers, num_heads=2 ** (heads_log2 - 1), **ABLATIONS[ablation])
    shim = TransformerLM(cfg)
    assert set(shim.state_dict()) == set(flatten(init_params(cfg))) == set(flatten(lm_spec(cfg)))
    assert set(TransformerBlock(cfg).state_dict()) == set(flatten(lm_spec(cfg)["layers"][0]))
    assert set(MultiHeadSelfAttention(16, 4).state_dict()) == {f"{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "output_proj")}


@given(st.sampled_from(list(ABLATIONS)), st.integers(0, 10), st.integers(0, 2**16))
def test_changing_a_later_token_leaves_earlier_logits_unchanged(ablation, t, seed):
    cfg = dataclasses.replace(TINY, **ABLATIONS[ablation])
    params = init_params(cfg, seed=seed % 7, dtype=torch.float64)
    ids = tokens(cfg, batch=1, seed=seed)
    changed = ids.clone()
    changed[0, t + 1] = (ids[0, t + 1] + 1) % cfg.vocab_size
    before, after = transformer_lm(params, ids, cfg), transformer_lm(params, changed, cfg)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1])
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_bad_model_inputs_raise_clear_errors():
    params = init_params(TINY)
    with pytest.raises(ValueError, match="exceeds context_length 12"):
        transformer_lm(params, tokens(TINY, seq=13), TINY)
    with pytest.raises(ValueError, match=r"token id 50 is outside the vocabulary \[0, 50\)"):
        transformer_lm(params, torch.tensor([[1, 50]]), TINY)
    with pytest.raises(ValueError, match="token id -1"):
        transformer_lm(params, torch.tensor([[-1, 2]]), TINY)
    with pytest.raises(TypeError, match="integer tensor"):
        transformer_lm(params, torch.zeros(1, 3), TINY)
    with pytest.raises(ValueError, match="missing"):
        adapters.run_transformer_lm(50, 12, 16, 3, 4, 24, 10_000.0, flatten(params), tokens(TINY))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"d_model": 18}, "divisible by num_heads"),
        ({"num_heads": 8, "d_model": 24}, "head_dim .* is odd"),
        ({"vocab_size": 0}, "vocab_size must be a positive int"),
        ({"num_layers": 2.0}, "num_layers must be a positive int"),
        ({"eps": -1.0}, "eps must be a positive number"),
        ({"ffn_type": "gelu"}, "ffn_type must be one of"),
        ({"remove_rope": 1}, "remove_rope must be a bool"),
    ],
)
def test_bad_config_raises(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **change)


def test_config_round_trips_through_dict_and_rejects_unknown_keys():
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**TINY.to_dict(), "n_layers": 3})


def test_cs336_model_config_file_loads():
    import json

    from tests.conftest import FIXTURES

    cfg = ModelConfig.from_dict(json.loads((FIXTURES / "ts_tests" / "model_config.json").read_text()))
    assert (cfg.d_model, cfg.num_layers, cfg.ffn_type) == (64, 3, "swiglu")
