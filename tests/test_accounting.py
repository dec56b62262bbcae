"""scripts/accounting.py: closed forms against fnlm's parameter tree and torch's own FLOP counter."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fnlm.config import ModelConfig
from fnlm.model import init_params, num_params, transformer_lm

SCRIPT = Path(__file__).parents[1] / "scripts" / "accounting.py"
spec = importlib.util.spec_from_file_location("accounting", SCRIPT)
accounting = importlib.util.module_from_spec(spec)
spec.loader.exec_module(accounting)

TINY = ModelConfig(vocab_size=97, context_length=12, d_model=32, num_layers=2, num_heads=4, d_ff=80)
VARIANTS = [
    TINY,
    replace(TINY, ffn_type="silu"),
    replace(TINY, remove_rmsnorm=True),
    replace(TINY, use_post_norm=True),
]


@pytest.mark.parametrize("size", list(accounting.GPT2_SIZES))
def test_closed_form_param_count_matches_the_tree_for_gpt2(size):
    for ffn_type in ("swiglu", "silu"):
        cfg = accounting.gpt2_config(size, ffn_type=ffn_type)
        assert accounting.param_count(cfg) == accounting.param_count_closed_form(cfg)


@pytest.mark.parametrize("cfg", VARIANTS, ids=["swiglu", "silu", "no_rmsnorm", "post_norm"])
def test_counts_match_a_materialized_model(cfg):
    assert accounting.param_count(cfg) == accounting.param_count_closed_form(cfg) == num_params(init_params(cfg))


@pytest.mark.parametrize("cfg", VARIANTS[:2], ids=["swiglu", "silu"])
def test_forward_flops_match_torch_flop_counter(cfg):
    params = init_params(cfg)
    tokens = torch.zeros(1, cfg.context_length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        transformer_lm(params, tokens, cfg)
    assert sum(accounting.forward_flops(cfg).values()) == counter.get_total_flops()


def test_max_batch_size_is_the_largest_that_fits():
    cfg = accounting.gpt2_config("xl", ffn_type="silu")
    memory = accounting.adamw_memory(cfg)
    per_sequence = memory.pop("activations_per_sequence")
    batch = accounting.max_batch_size(cfg, 80e9)
    assert sum(memory.values()) + batch * per_sequence <= 80e9 < sum(memory.values()) + (batch + 1) * per_sequence
