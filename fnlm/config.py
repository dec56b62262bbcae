"""Frozen, validated configuration. Configs hold hyperparameters only: no tensors, no state."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

FFN_TYPES = ("swiglu", "silu")


@dataclass(frozen=True)
class ModelConfig:
    """A pre-norm Transformer LM and the ablation switches of the handout's section 7.3.

    ffn_type "silu" is the handout's parameter-matched ablation: W2 SiLU(W1 x), meant to be used
    with d_ff = 4 * d_model (SwiGLU's three matrices at d_ff = 8/3 d_model hold the same count).
    """

    vocab_size: int
    context_length: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    rope_theta: float = 10_000.0
    eps: float = 1e-5
    remove_rmsnorm: bool = False  # no RMSNorm anywhere (layer_norm_ablation)
    use_post_norm: bool = False  # x = norm(x + sublayer(x)) (pre_norm_ablation)
    remove_rope: bool = False  # NoPE: no position information at all (no_pos_emb)
    ffn_type: Literal["swiglu", "silu"] = "swiglu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in ("rope_theta", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        for name in ("remove_rmsnorm", "use_post_norm", "remove_rope"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.ffn_type not in FFN_TYPES:
            raise ValueError(f"ModelConfig.ffn_type must be one of {FFN_TYPES}, got {self.ffn_type!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if not self.remove_rope and self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs: head_dim d_model/num_heads = {self.head_dim} is odd")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a dict (a JSON file, a checkpoint header); unknown keys are an error."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if values.get("ffn_type") is None:  # CS336 config files write null for the default
            values.pop("ffn_type", None)
        return cls(**values)
