"""Optimizers as pure state transitions, in optax's shape (see base.py).

    optimizer = adamw(warmup_cosine_schedule(3e-4, 3e-5, 100, 5000), weight_decay=0.1, max_grad_norm=1.0)
    opt_state = optimizer.init(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = apply_updates(params, updates)
    params, opt_state = apply_step(optimizer, grads, opt_state, params)  # the two lines above in one

Muon for the hidden matrices beside AdamW for the rest: muon_adamw(muon_lr, adam_lr, ...), a
`partition` of the tree by muon_labels (muon.py).
"""

from . import adamw_kernel
from .alias import adamw
from .base import (
    EmptyState,
    GradientTransformation,
    OptState,
    PartitionState,
    apply_step,
    apply_updates,
    chain,
    find_state,
    partition,
    replace_state,
)
from .muon import ScaleByMuonState, muon, muon_adamw, muon_labels, newton_schulz, scale_by_muon
from .schedules import Schedule, schedule_value, warmup_cosine_schedule, warmup_stable_decay_schedule
from .transforms import (
    ClipByGlobalNormState,
    ScaleByAdamState,
    ScaleByScheduleState,
    add_decayed_weights,
    clip_by_global_norm,
    clip_factor,
    scale_by_adam,
    scale_by_learning_rate,
)

__all__ = [
    "ClipByGlobalNormState",
    "EmptyState",
    "GradientTransformation",
    "OptState",
    "PartitionState",
    "ScaleByAdamState",
    "ScaleByMuonState",
    "ScaleByScheduleState",
    "Schedule",
    "add_decayed_weights",
    "adamw",
    "adamw_kernel",
    "apply_step",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "clip_factor",
    "find_state",
    "muon",
    "muon_adamw",
    "muon_labels",
    "newton_schulz",
    "partition",
    "replace_state",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_muon",
    "schedule_value",
    "warmup_cosine_schedule",
    "warmup_stable_decay_schedule",
]
