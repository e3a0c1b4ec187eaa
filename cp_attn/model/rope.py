"""YaRN rotary embeddings, in the two layouts V3.2 uses.

MLA rotates *interleaved* pairs (x[2i], x[2i+1]); the lightning indexer rotates *half-split* pairs
(x[i], x[i + d/2]) on the first qk_rope_head_dim dims of its head. Mixing the two up was a real bug
in the first public release of the indexer.

YaRN (d = qk_rope_head_dim, L0 = original_max_position_embeddings):
    f_i   = theta^(-2i/d)                                  i < d/2
    corr  = d ln(L0 / (2 pi beta)) / (2 ln theta)
    low   = max(floor(corr(beta_fast)), 0),  high = min(ceil(corr(beta_slow)), d - 1)
    ramp  = clamp((i - low) / (high - low), 0, 1)
    f'_i  = f_i (1 - ramp_i) + (f_i / factor) ramp_i
cos/sin are not scaled; YaRN's attention factor goes into the softmax scale (ModelConfig.softmax_scale).
"""

from __future__ import annotations

import math

import torch

from cp_attn.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[d/2] fp32 rotation frequencies, YaRN-corrected when the config asks for it."""
    d, theta = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if cfg.rope_type != "yarn":
        return freqs.float()
    rs = cfg.rope_scaling
    factor = float(rs["factor"])
    L0 = float(rs["original_max_position_embeddings"])

    def corr(beta: float) -> float:
        return d * math.log(L0 / (2 * math.pi * beta)) / (2 * math.log(theta))

    low = max(math.floor(corr(float(rs.get("beta_fast", 32.0)))), 0)
    high = min(math.ceil(corr(float(rs.get("beta_slow", 1.0)))), d - 1)
    if high == low:  # avoid a zero-width ramp
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return (freqs * (1 - ramp) + freqs / factor * ramp).float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] positions -> cos, sin of shape [n, d/2] (fp32)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return angles.cos(), angles.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, ..., d] with pairs (x[2i], x[2i+1]); cos/sin [n, d/2]. Computed in fp32."""
    shape = [cos.shape[0]] + [1] * (x.dim() - 2) + [cos.shape[1]]
    cos, sin = cos.view(shape), sin.view(shape)
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, ..., d] with pairs (x[i], x[i + d/2]); cos/sin [n, d/2]. Computed in fp32."""
    shape = [cos.shape[0]] + [1] * (x.dim() - 2) + [cos.shape[1]]
    cos, sin = cos.view(shape), sin.view(shape)
    x0, x1 = x.float().chunk(2, dim=-1)
    return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).to(x.dtype)
