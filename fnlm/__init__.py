"""fnlm: a functional language-model stack on torch.func.

Parameters are pytrees, layers are pure functions of (params, inputs, config), the optimizer is
a pure state transition and a training step is torch.func.grad_and_value plus that transition.
"""

from .config import ModelConfig
from .model import init_params, transformer_block, transformer_lm
from .tree import flatten, unflatten

__all__ = ["ModelConfig", "flatten", "init_params", "transformer_block", "transformer_lm", "unflatten"]
__version__ = "0.1.0"
