"""FP8 KV-cache layouts: the MLA latent in FlashMLA's 656-byte form and the indexer key in 132 bytes.

MLA latent, per token (V3.2: kv_lora = 512, rope = 64 -> 656 bytes):
    [0, kv_lora)                       e4m3 values of c_kv
    [kv_lora, kv_lora + 4 B)           fp32 scales, one per 128 values (B = ceil(kv_lora / 128))
    [kv_lora + 4 B, ... + 2 rope)      k_pe in bf16 (RoPE'd keys stay 16-bit)
Index key, per token (D = 128 -> 132 bytes):
    [0, D) e4m3 values, [D, D + 4) one fp32 scale.
Scales are 2^ceil(log2(max(amax, 1e-4) / 448)) (cp_attn.ops.fp8); dequantised value = e4m3 * scale.
Packed rows are plain uint8 tensors, so a CP gather moves them like any other rows.
"""

from __future__ import annotations

import torch

from cp_attn.ops.fp8 import quantize_e4m3_lastdim

BLOCK = 128


def mla_fp8_width(kv_lora: int, rope: int) -> int:
    """Bytes per token of the packed latent (656 for V3.2)."""
    return kv_lora + 4 * -(-kv_lora // BLOCK) + 2 * rope


def pack_mla_kv(latent: torch.Tensor, kv_lora: int) -> torch.Tensor:
    """latent [T, kv_lora + rope] (any float dtype) -> uint8 [T, mla_fp8_width]."""
    c_kv, k_pe = latent[:, :kv_lora], latent[:, kv_lora:]
    values, scales = quantize_e4m3_lastdim(c_kv, BLOCK)
    return torch.cat([
        values.view(torch.uint8),
        scales.float().contiguous().view(torch.uint8),
        k_pe.to(torch.bfloat16).contiguous().view(torch.uint8),
    ], dim=-1)


def split_mla_kv(packed: torch.Tensor, kv_lora: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [T, W] -> (e4m3 c_kv [T, kv_lora], fp32 scales [T, B], bf16 k_pe [T, rope]) (copies)."""
    nblk = -(-kv_lora // BLOCK)
    values = packed[:, :kv_lora].contiguous().view(torch.float8_e4m3fn)
    scales = packed[:, kv_lora : kv_lora + 4 * nblk].contiguous().view(torch.float32)
    k_pe = packed[:, kv_lora + 4 * nblk :].contiguous().view(torch.bfloat16)
    return values, scales, k_pe


def unpack_mla_kv(packed: torch.Tensor, kv_lora: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 [T, W] -> the dequantised latent [T, kv_lora + rope] in `dtype`."""
    values, scales, k_pe = split_mla_kv(packed, kv_lora)
    c_kv = values.float().unflatten(-1, (-1, BLOCK)) if kv_lora % BLOCK == 0 else None
    if c_kv is None:  # a partial last block (small test shapes)
        pad = scales.shape[-1] * BLOCK - kv_lora
        c_kv = torch.nn.functional.pad(values.float(), (0, pad)).unflatten(-1, (-1, BLOCK))
    c_kv = (c_kv * scales[..., None]).flatten(-2)[:, :kv_lora]
    return torch.cat([c_kv, k_pe.float()], dim=-1).to(dtype)


def index_k_fp8_width(head_dim: int) -> int:
    """Bytes per token of the packed index key (132 for V3.2)."""
    return head_dim + 4


def quantize_index_k(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k [T, D] -> (e4m3 [T, D], fp32 scale [T]): one power-of-two scale per token (D <= 128)."""
    if k.shape[-1] > BLOCK:
        raise ValueError(f"index head dim {k.shape[-1]} > {BLOCK}: one scale per key needs D <= {BLOCK}")
    values, scale = quantize_e4m3_lastdim(k, BLOCK)
    return values, scale[..., 0]


def quantize_index_q(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, H, D] -> (e4m3 [n, H, D], fp32 scale [n, H]), one scale per (token, head)."""
    return quantize_index_k(q)


def pack_index_k(k: torch.Tensor) -> torch.Tensor:
    """k [T, D] -> uint8 [T, D + 4]."""
    values, scale = quantize_index_k(k)
    return torch.cat([values.view(torch.uint8), scale[:, None].contiguous().view(torch.uint8)], dim=-1)


def unpack_index_k(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [T, D + 4] -> (e4m3 [T, D], fp32 scale [T])."""
    D = packed.shape[-1] - 4
    return packed[:, :D].contiguous().view(torch.float8_e4m3fn), packed[:, D:].contiguous().view(torch.float32)[:, 0]


def dequant_index_k(k: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(e4m3 [T, D], fp32 scale [T]) -> fp32 [T, D]."""
    values, scale = k
    return values.float() * scale[:, None]
