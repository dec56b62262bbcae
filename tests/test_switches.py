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


# --- the optimizer and schedule switches of TrainConfig ------------------------------------------


def test_train_config_muon_is_muon_adamw_with_the_schedule_scaled_to_muon_lr():
    from fnlm.config import TrainConfig
    from fnlm.optim import ScaleByMuonState, find_state, schedule_value, warmup_stable_decay_schedule
    from fnlm.train import make_optimizer, make_schedule

    cfg = TrainConfig(optimizer="muon", lr=2e-3, min_lr=2e-4, muon_lr=0.02, schedule="wsd", decay_fraction=0.5,
                      warmup_steps=2, steps=10)
    assert [schedule_value(make_schedule(cfg), t) for t in (1, 5, 10)] == pytest.approx([1e-3, 2e-3, 2e-4])
    params = double_params(BASE)
    grads = tree_map(torch.ones_like, params)
    optimizer = make_optimizer(cfg)
    state = optimizer.init(params)
    assert find_state(state, ScaleByMuonState) is not None
    wsd = lambda peak: warmup_stable_decay_schedule(peak, peak / 10, 2, 10, 0.5)  # noqa: E731
    expected = muon_adamw(wsd(0.02), wsd(2e-3), b1=0.9, b2=0.95, weight_decay=0.1, max_grad_norm=1.0)
    expected_state = expected.init(params)
    for _ in range(3):
        updates, state = optimizer.update(grads, state, params)
        want, expected_state = expected.update(grads, expected_state, params)
        for (key, got), other in zip(flatten(updates).items(), flatten(want).values()):
            torch.testing.assert_close(got, other, msg=key)


def test_train_config_rejects_unknown_optimizers_and_schedules():
    from fnlm.config import TrainConfig

    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="muon_lr"):
        TrainConfig(muon_lr="fast")


def test_a_muon_sweep_varies_muon_lr_per_run_under_vmap():
    from fnlm.config import TrainConfig
    from fnlm.sweep import make_sweep_step, stack
    from fnlm.train import make_optimizer

    cfg = dataclasses.replace(BASE, **SWITCHES)
    train_cfg = TrainConfig(optimizer="muon", warmup_steps=0, steps=4)
    lrs = [1e-3, 0.05]
    params = stack([init_params(cfg)] * 2)
    state = stack([make_optimizer(dataclasses.replace(train_cfg, muon_lr=lr)).init(init_params(cfg)) for lr in lrs])
    step = make_sweep_step(cfg, train_cfg)
    x = tokens(batch=2, length=13)
    new_params, _, metrics = step(params, state, {"muon_lr": torch.tensor(lrs)}, torch.ones(2, dtype=torch.bool),
                                  x[:, :-1], x[:, 1:])
    assert metrics.alive.all()
    moved = flatten(new_params)["layers.0.attn.q_proj.weight"] - flatten(params)["layers.0.attn.q_proj.weight"]
    # the first step's size is muon_lr times an orthogonal-ish update (plus a tiny decay): ~50 times apart
    assert 20 < moved[1].abs().max() / moved[0].abs().max() < 80


def test_the_leaderboard_config_file_is_a_valid_fnlm_train_config():
    import tomllib
    from pathlib import Path

    from fnlm.config import TrainConfig

    config = tomllib.loads((Path(__file__).parents[1] / "scripts/configs/leaderboard.toml").read_text())
    model, train = ModelConfig.from_dict(config["model"]), TrainConfig.from_dict(config["train"])
    assert (model.tie_embeddings, model.qk_norm, model.ffn_type, train.optimizer, train.schedule) == (
        True, True, "relu2", "muon", "wsd")
