"""The leaderboard switches of ModelConfig (tied embeddings, QK-norm, ReLU^2, logit soft-cap),
each against a straightforward reference or a property, on a tiny CPU model; off by default."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fnlm.config import ModelConfig
from fnlm.kv_cache import cached_lm, empty_cache
from fnlm.model import init_params, lm_spec, transformer_lm
from fnlm.optim import apply_updates, muon_adamw
from fnlm.train import make_loss_fn
from fnlm.tree import flatten, tree_map
from tests.reference import rope_reference

BASE = ModelConfig(vocab_size=37, context_length=12, d_model=16, num_layers=2, num_heads=2, d_ff=24)
SWITCHES = {"tie_embeddings": True, "qk_norm": True, "ffn_type": "relu2", "logit_soft_cap": 5.0}


def double_params(cfg, seed=0):
    return tree_map(lambda p: p.double(), init_params(cfg, seed=seed))


def tokens(batch=3, length=12, seed=0, vocab=37):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_every_switch_is_off_by_default_and_leaves_the_tree_unchanged():
    defaults = {field.name: field.default for field in dataclasses.fields(ModelConfig)}
    assert {name: defaults[name] for name in SWITCHES} == {
        "tie_embeddings": False, "qk_norm": False, "ffn_type": "swiglu", "logit_soft_cap": None}
    keys = set(flatten(init_params(BASE)))
    assert "lm_head.weight" in keys and not any("q_norm" in key for key in keys)
    assert "layers.0.ffn.w3.weight" in keys


def test_tied_embeddings_are_one_matrix_used_twice():
    tied = dataclasses.replace(BASE, tie_embeddings=True)
    params = double_params(tied)
    assert "lm_head" not in params and params["token_embeddings"]["weight"].shape == (37, 16)
    # initialized as an output layer: small, so the first logits are small
    assert params["token_embeddings"]["weight"].std() < 0.5
    untied = dict(params, lm_head={"weight": params["token_embeddings"]["weight"]})
    x = tokens()
    torch.testing.assert_close(transformer_lm(params, x, tied), transformer_lm(untied, x, BASE))
    # the tied matrix's gradient is the sum of its two roles' gradients
    loss, loss_untied = make_loss_fn(tied), make_loss_fn(BASE)
    grad_tied = torch.func.grad(loss)(params, x[:, :-1], x[:, 1:])["token_embeddings"]["weight"]
    grads = torch.func.grad(loss_untied)(untied, x[:, :-1], x[:, 1:])
    torch.testing.assert_close(grad_tied, grads["token_embeddings"]["weight"] + grads["lm_head"]["weight"])


def reference_qk_norm_attention(attn, x, num_heads, theta):
    """Straightforward causal attention with RMSNorm on each head's q and k, then RoPE."""
    batch, length, d_model = x.shape
    head_dim = d_model // num_heads

    def heads(name):
        return (x @ attn[name]["weight"].T).view(batch, length, num_heads, head_dim).transpose(1, 2)

    q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
    q = F.rms_norm(q, (head_dim,), attn["q_norm"]["weight"], eps=1e-5)
    k = F.rms_norm(k, (head_dim,), attn["k_norm"]["weight"], eps=1e-5)
    positions = torch.arange(length)
    q, k = rope_reference(q, positions, theta), rope_reference(k, positions, theta)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(batch, length, d_model) @ attn["output_proj"]["weight"].T


def test_qk_norm_matches_the_reference_and_ignores_the_scale_of_q_and_k_projections():
    cfg = dataclasses.replace(BASE, qk_norm=True, num_layers=1)
    params = double_params(cfg)
    attn = params["layers"][0]["attn"]
    assert attn["q_norm"]["weight"].shape == attn["k_norm"]["weight"].shape == (cfg.head_dim,)
    generator = torch.Generator().manual_seed(1)
    attn = dict(attn, q_norm={"weight": torch.rand(cfg.head_dim, generator=generator, dtype=torch.float64) + 0.5})
    x = torch.randn(2, 12, 16, generator=generator, dtype=torch.float64)
    from fnlm.nn import multihead_self_attention

    ours = multihead_self_attention(attn, x, cfg.num_heads, rope_theta=cfg.rope_theta)
    torch.testing.assert_close(ours, reference_qk_norm_attention(attn, x, cfg.num_heads, cfg.rope_theta))
    scaled = dict(attn, q_proj={"weight": 7.0 * attn["q_proj"]["weight"]}, k_proj={"weight": 3.0 * attn["k_proj"]["weight"]})
    # only eps (1e-5 beside a mean square ~0.1) keeps this from being exact
    torch.testing.assert_close(multihead_self_attention(scaled, x, cfg.num_heads, rope_theta=cfg.rope_theta), ours,
                               rtol=1e-3, atol=1e-4)


def test_relu_squared_ffn_matches_the_reference():
    cfg = dataclasses.replace(BASE, ffn_type="relu2", d_ff=64)
    params = double_params(cfg)
    ffn = params["layers"][0]["ffn"]
    assert set(ffn) == {"w1", "w2"} and ffn["w1"]["weight"].shape == (64, 16)
    from fnlm.model import FFNS

    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = F.relu(x @ ffn["w1"]["weight"].T).square() @ ffn["w2"]["weight"].T
    torch.testing.assert_close(FFNS["relu2"](ffn, x), expected)


def test_logit_soft_cap_is_cap_tanh_of_the_raw_logits_and_bounded():
    capped = dataclasses.replace(BASE, logit_soft_cap=0.5)
    params = double_params(BASE)
    x = tokens()
    raw = transformer_lm(params, x, BASE)
    logits = transformer_lm(params, x, capped)
    torch.testing.assert_close(logits, 0.5 * torch.tanh(raw / 0.5))
    assert logits.abs().max() < 0.5 and raw.abs().max() > 0.5  # the cap did bind somewhere


def test_cached_decoding_agrees_with_the_forward_under_every_switch():
    cfg = dataclasses.replace(BASE, **SWITCHES)
    params = double_params(cfg, seed=2)
    x = tokens(batch=2, length=7)
    full = transformer_lm(params, x, cfg)
    cache = empty_cache(cfg, torch.zeros(2, dtype=torch.long), dtype=torch.float64)
    prefix, cache = cached_lm(params, x[:, :4], cache, cfg)
    rest, _ = cached_lm(params, x[:, 4:], cache, cfg)
    torch.testing.assert_close(torch.cat([prefix, rest], dim=1), full)


def test_all_switches_with_muon_train_a_tiny_model():
    cfg = dataclasses.replace(BASE, **SWITCHES)
    params = init_params(cfg)
    optimizer = muon_adamw(0.02, 3e-3, weight_decay=0.0, max_grad_norm=1.0)
    state = optimizer.init(params)
    loss_and_grad = torch.func.grad_and_value(make_loss_fn(cfg))
    x = (torch.arange(13).repeat(4, 1) + torch.arange(4).unsqueeze(1)) % 37  # (4, 13) counting sequences
    losses = []
    for _ in range(30):
        grads, loss = loss_and_grad(params, x[:, :-1], x[:, 1:])
        updates, state = optimizer.update(grads, state, params)
        params = apply_updates(params, updates)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(37), rel=0.05)  # small tied init: near-uniform logits
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("change, message", [
    ({"logit_soft_cap": 0.0}, "logit_soft_cap"),
    ({"logit_soft_cap": "3"}, "logit_soft_cap"),
    ({"qk_norm": 1}, "qk_norm"),
    ({"tie_embeddings": "yes"}, "tie_embeddings"),
    ({"ffn_type": "gelu"}, "ffn_type"),
])
def test_bad_switch_values_are_value_errors_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BASE, **change)


def test_switches_round_trip_through_the_config_dict():
    cfg = dataclasses.replace(BASE, **SWITCHES)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert set(flatten(lm_spec(cfg))) == set(flatten(init_params(cfg)))
