"""An independent, conventional implementation of the same LM: nn.Modules + torch.nn.functional.

It is the oracle for fnlm's model tests and the peer in scripts/bench_*.py. It shares nothing
with fnlm but the state-dict names, so fnlm parameters load into it with load_state_dict.
RoPE here is the rotate-pairs formulation x cos + rot(x) sin, attention uses
F.scaled_dot_product_attention and the norms nn.RMSNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fnlm.config import ModelConfig


def rope_reference(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """x (..., T, Dh): each interleaved pair (x0, x1) -> x * cos + (-x1, x0) * sin (real arithmetic,
    which torch.compile fuses; complex tensors would fall back to eager kernels)."""
    d, dtype = x.shape[-1], torch.promote_types(x.dtype, torch.float32)
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)
    angles = (positions.to(dtype)[..., None] * freqs).repeat_interleave(2, dim=-1)  # (..., T, Dh)
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj, self.k_proj, self.v_proj, self.output_proj = (
            nn.Linear(cfg.d_model, cfg.d_model, bias=False) for _ in range(4)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.cfg.num_heads
        q, k, v = (proj(x).view(b, t, h, d // h).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if not self.cfg.remove_rope:
            positions = torch.arange(t, device=x.device)
            q, k = rope_reference(q, positions, self.cfg.rope_theta), rope_reference(k, positions, self.cfg.rope_theta)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.output_proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.ffn_type == "swiglu"
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        if self.gated:
            self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.w1(x))
        return self.w2(h * self.w3(x) if self.gated else h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.attn, self.ffn = Attention(cfg), FeedForward(cfg)
        norm = nn.Identity if cfg.remove_rmsnorm else (lambda: nn.RMSNorm(cfg.d_model, eps=cfg.eps))
        self.ln1, self.ln2 = norm(), norm()

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.use_post_norm:
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.ffn(x))
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class ReferenceLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        final_norm = not (cfg.remove_rmsnorm or cfg.use_post_norm)
        self.ln_final = nn.RMSNorm(cfg.d_model, eps=cfg.eps) if final_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, token_ids: Tensor) -> Tensor:
        x = self.token_embeddings(token_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_final(x))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, -2).float(), y.flatten())
