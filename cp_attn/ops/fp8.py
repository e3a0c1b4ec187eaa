"""FP8 (e4m3) block quantisation math shared by the indexer simulation and the checkpoint code."""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def pow2_block_scale(amax: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Scale 2^ceil(log2(amax / 448)) with amax clamped to >= eps (DeepSeek's indexer / FlashMLA rule)."""
    return torch.exp2(torch.ceil(torch.log2(amax.float().clamp(min=eps) / E4M3_MAX)))


def quantize_e4m3_lastdim(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x [..., D] in blocks of `block` along the last dim with power-of-two scales.
    Returns (e4m3 values [..., D], fp32 scales [..., ceil(D / block)])."""
    D = x.shape[-1]
    nblk = -(-D // block)
    xf = x.float()
    if D % block:
        xf = torch.nn.functional.pad(xf, (0, nblk * block - D))
    xb = xf.unflatten(-1, (nblk, block))
    scale = pow2_block_scale(xb.abs().amax(-1))
    q = (xb / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :D], scale


def fake_quant_e4m3_lastdim(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x after an e4m3 round trip (quantise, dequantise), in fp32: simulates an FP8 kernel's inputs."""
    q, scale = quantize_e4m3_lastdim(x, block)
    D = x.shape[-1]
    nblk = scale.shape[-1]
    qf = torch.nn.functional.pad(q.float(), (0, nblk * block - D)).unflatten(-1, (nblk, block))
    return (qf * scale[..., None]).flatten(-2)[..., :D]
