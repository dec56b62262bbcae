"""fnlm: a functional language-model stack on torch.func.

Parameters are pytrees, layers are pure functions of (params, inputs, config), the optimizer is
a pure state transition and a training step is torch.func.grad_and_value plus that transition.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import ModelConfig

__all__ = ["ModelConfig", "flatten", "init_params", "transformer_block", "transformer_lm", "unflatten"]
__version__ = "0.1.0"

# The torch-based names load on first use, so that torch-free parts (the tokenizer, the CLI's
# parser) start fast and run under tight memory limits.
_LAZY = {"init_params": ".model", "transformer_block": ".model", "transformer_lm": ".model",
         "flatten": ".tree", "unflatten": ".tree"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'fnlm' has no attribute {name!r}")
