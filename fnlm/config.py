"""Frozen, validated configuration. Configs hold hyperparameters only: no tensors, no state."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

FFN_TYPES = ("swiglu", "silu", "relu2")


@dataclass(frozen=True)
class ModelConfig:
    """A pre-norm Transformer LM and the ablation switches of the handout's section 7.3.

    ffn_type "silu" is the handout's parameter-matched ablation: W2 SiLU(W1 x), meant to be used
    with d_ff = 4 * d_model (SwiGLU's three matrices at d_ff = 8/3 d_model hold the same count).

    Leaderboard switches (off by default, so the CS336 model is unchanged; docs/leaderboard.md):
    ffn_type "relu2" is W2 ReLU(W1 x)^2 (So et al., Primer; also two matrices, w1 and w2);
    tie_embeddings drops lm_head: the logits use token_embeddings.weight, the one (V, D) matrix
    of the state dict, initialized like lm_head would be; qk_norm RMS-normalizes each head's
    queries and keys before RoPE, with gains attn.q_norm.weight and attn.k_norm.weight (Dh,);
    logit_soft_cap c maps the logits through c * tanh(logits / c) (Gemma 2).
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
    ffn_type: Literal["swiglu", "silu", "relu2"] = "swiglu"
    tie_embeddings: bool = False  # lm_head is token_embeddings.weight
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE
    logit_soft_cap: float | None = None  # cap * tanh(logits / cap); None: raw logits

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in ("rope_theta", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        for name in ("remove_rmsnorm", "use_post_norm", "remove_rope", "tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        cap = self.logit_soft_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise ValueError(f"ModelConfig.logit_soft_cap must be a positive number or None, got {cap!r}")
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
        values = _known_fields(cls, values)
        if values.get("ffn_type") is None:  # CS336 config files write null for the default
            values.pop("ffn_type", None)
        return cls(**values)


AUTOCAST_DTYPES = ("none", "bfloat16")  # float16 would need loss scaling
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization, data and run settings of `fnlm train` (everything but the model).

    The learning rate follows the handout's cosine schedule: linear warm-up from 0 over
    warmup_steps, cosine decay from lr to min_lr until cosine_steps (default: steps), then min_lr;
    schedule "wsd" holds lr after the warm-up and decays linearly to min_lr over the last
    decay_fraction of those steps instead. optimizer "muon" trains the hidden matrices with Muon
    at muon_lr (its schedule the same shape, scaled by muon_lr / lr) and the embeddings, LM head
    and norm gains with AdamW at lr (fnlm.optim.muon_adamw).
    Parameters and optimizer state stay float32; `autocast` only lowers the forward's matmuls.
    """

    train_data: str = ""  # a .npy token array, or raw `data_dtype` binary
    val_data: str | None = None
    data_dtype: str = "uint16"  # for raw binary files; .npy files carry their dtype
    batch_size: int = 32
    steps: int = 5000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    cosine_steps: int | None = None
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0  # None: no clipping
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.01  # Muon's peak rate; its update RMS matches AdamW's, so rates are alike
    muon_momentum: float = 0.95
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the share of the steps spent cooling down
    seed: int = 0  # parameter init and batch sampling
    log_every: int = 10
    eval_every: int = 250  # 0: never
    eval_batches: int | None = 20  # None: the whole validation set
    checkpoint_every: int = 1000  # 0: only at the end
    keep_checkpoints: int = 2
    device: str = "auto"
    autocast: str = "none"  # "bfloat16": autocast the forward on CUDA / CPU
    compile: bool | None = None  # None (auto): compile on CUDA, eager elsewhere (TrainConfig.compiles)

    def __post_init__(self) -> None:
        positive = ("batch_size", "steps", "log_every", "keep_checkpoints")
        non_negative = ("warmup_steps", "seed", "eval_every", "checkpoint_every")
        for name in positive + non_negative:
            value, minimum = getattr(self, name), 1 if name in positive else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                kind = "a positive int" if minimum else "a non-negative int"
                raise ValueError(f"TrainConfig.{name} must be {kind}, got {value!r}")
        for name in ("cosine_steps", "eval_batches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"TrainConfig.{name} must be a positive int or None, got {value!r}")
        if self.decay_steps < self.warmup_steps:
            end = "cosine_steps" if self.cosine_steps is not None else "steps (the default cosine_steps)"
            raise ValueError(
                f"TrainConfig.{end} ({self.decay_steps}) must be >= warmup_steps ({self.warmup_steps})"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"TrainConfig.autocast must be one of {AUTOCAST_DTYPES}, got {self.autocast!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ValueError(f"TrainConfig.compile must be a bool or None (auto), got {self.compile!r}")
        for name in ("lr", "min_lr", "beta1", "beta2", "adam_eps", "weight_decay", "max_grad_norm", "muon_lr",
                     "muon_momentum", "decay_fraction"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"TrainConfig.{name} must be a number, got {value!r}")
        for field in dataclasses.fields(self):  # every number finite: inf or nan trains to nan
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"TrainConfig.{field.name} must be finite, got {value!r}")
        ranges = {
            "lr": (lambda v: v > 0, "> 0"),
            "min_lr": (lambda v: 0 <= v <= self.lr, f"in [0, lr={self.lr}]"),
            "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "adam_eps": (lambda v: v > 0, "> 0 (0 divides by zero where a gradient is 0)"),
            "weight_decay": (lambda v: v >= 0, ">= 0"),
            "max_grad_norm": (lambda v: v > 0, "> 0, or None for no clipping"),
        }
        for name, (ok, expected) in ranges.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"TrainConfig.{name} must be {expected}, got {value!r}")

    @property
    def decay_steps(self) -> int:
        return self.steps if self.cosine_steps is None else self.cosine_steps

    def compiles(self, device_type: str) -> bool:
        """Whether a run on `device_type` torch.compiles its step: `compile`, or with None (auto)
        on CUDA only, where the compiled step ran 2.8x the eager one's tokens/s (TinyStories
        shape, H200); on the CPU compiling costs tens of seconds to minutes before the first step
        (scripts/bench_compile.py), and eager stays the mode to debug in."""
        return device_type == "cuda" if self.compile is None else self.compile

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict (a JSON/TOML file, a checkpoint); unknown keys are an error."""
        return cls(**_known_fields(cls, values))


def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """A copy of `values`, or a ValueError naming the keys that are not fields of `cls`."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return dict(values)
