"""Triton sparse MLA prefill forward: the absorbed-form attention of cp_attn.ops.naive.sparse_mla.

One program per (query row, block of BLOCK_H heads). All heads of the block share the row's gathered
latent rows, so each selected row is read once per program, never once per head (a vLLM fallback that
re-read the latent per head reached ~6% of HBM bandwidth). Per block of BLOCK_N selected keys:

    kv    = latent[indices[i, s : s + BLOCK_N]]         [BLOCK_N, Dqk] gathered rows (-1 rows masked)
    S     = q_nope kv_nope^T + q_tail kv_tail^T          [BLOCK_H, BLOCK_N] (nope = first d_v columns)
    O    += softmax-online(S) kv_nope                    [BLOCK_H, d_v]   (values are the first d_v columns)

so the 512-wide value tile is the same smem tile as the score's K operand (loaded once, used twice).
The loop runs only to the row's last valid slot: top-k emits valid indices first, so an early token
with few keys costs proportionally less, while any order and any placement of -1 stays correct
(invalid slots inside the range are masked; their rows are never read).

FP8 KV (uint8 rows in cp_attn.ops.kv_fp8's 656-byte layout) is dequantised to bf16 by a separate
one-pass kernel first: the dequantised latent is T x 1152 bytes, which costs well under 1% of the
attention over it (measured: docs/benchmarks.md), and keeps this kernel's pipeline untouched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cp_attn.ops.kv_fp8 import BLOCK as FP8_BLOCK
from cp_attn.ops.kv_fp8 import mla_fp8_width

LOG2E = 1.4426950408889634  # host side: folded into sm_scale
LN2 = tl.constexpr(0.6931471805599453)  # natural log of 2, for the lse


@triton.jit
def _sparse_mla_fwd(
    Q, KV, IDX, OUT, LSE,
    T, H, K_TOPK,
    stride_qn, stride_qh, stride_kvt, stride_in, stride_on, stride_oh, stride_ln,
    sm_scale_log2,
    D_V: tl.constexpr, D_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    BLOCK_SCAN: tl.constexpr, IEEE: tl.constexpr,
):
    row = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_tail = tl.arange(0, BLOCK_TAIL)
    # At V3.2 (d_v = 512, tail 64) the column masks are all-true: drop them at compile time, so the
    # gathered loads stay 16-byte vectors masked per row only.
    if BLOCK_DV == D_V:
        mask_dv = offs_dv < BLOCK_DV
    else:
        mask_dv = offs_dv < D_V
    if BLOCK_TAIL == D_TAIL:
        mask_tail = offs_tail < BLOCK_TAIL
    else:
        mask_tail = offs_tail < D_TAIL
    idx_row = IDX + row.to(tl.int64) * stride_in

    # The loop's end: one past the last slot holding a valid index (= the valid count for top-k's layout).
    end = 0
    for s0 in range(0, K_TOPK, BLOCK_SCAN):
        slots = s0 + tl.arange(0, BLOCK_SCAN)
        ids = tl.load(idx_row + slots, mask=slots < K_TOPK, other=-1)
        end = tl.maximum(end, tl.max(tl.where((ids >= 0) & (ids < T), slots + 1, 0), axis=0))

    q_ptr = Q + row.to(tl.int64) * stride_qn + offs_h[:, None] * stride_qh
    q_nope = tl.load(q_ptr + offs_dv[None, :], mask=mask_h[:, None] & mask_dv[None, :], other=0.0)
    q_tail = tl.load(q_ptr + D_V + offs_tail[None, :], mask=mask_h[:, None] & mask_tail[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)   # running max, log2 domain
    l_i = tl.zeros([BLOCK_H], tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for s0 in range(0, end, BLOCK_N):
        slots = s0 + tl.arange(0, BLOCK_N)
        ids = tl.load(idx_row + slots, mask=slots < K_TOPK, other=-1)
        valid = (ids >= 0) & (ids < T)
        kv_ptr = KV + tl.where(valid, ids, 0).to(tl.int64)[:, None] * stride_kvt
        kv_nope = tl.load(kv_ptr + offs_dv[None, :], mask=valid[:, None] & mask_dv[None, :], other=0.0)
        kv_tail = tl.load(kv_ptr + D_V + offs_tail[None, :], mask=valid[:, None] & mask_tail[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q_nope, tl.trans(kv_nope), input_precision="ieee")
            s = tl.dot(q_tail, tl.trans(kv_tail), s, input_precision="ieee")
        else:
            s = tl.dot(q_nope, tl.trans(kv_nope))
            s = tl.dot(q_tail, tl.trans(kv_tail), s)
        s = tl.where(valid[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # nothing valid yet: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = tl.dot(p.to(kv_nope.dtype), kv_nope, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(kv_nope.dtype), kv_nope, acc * alpha[:, None])
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    o_ptr = OUT + row.to(tl.int64) * stride_on + offs_h[:, None] * stride_oh + offs_dv[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=mask_h[:, None] & mask_dv[None, :])
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(LSE + row.to(tl.int64) * stride_ln + offs_h, lse, mask=mask_h)


@triton.jit
def _dequant_mla_kv(
    PACKED, OUT, T, stride_pt, stride_ot,
    KV_LORA: tl.constexpr, ROPE: tl.constexpr, NBLK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """uint8 [T, 656] (kv_fp8 layout) -> [T, KV_LORA + ROPE] in OUT's dtype; BLOCK_T rows a program."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mrow = rows < T
    src = PACKED + rows.to(tl.int64)[:, None] * stride_pt
    dst = OUT + rows.to(tl.int64)[:, None] * stride_ot
    cols = tl.arange(0, BLOCK_C)
    mc = mrow[:, None] & (cols[None, :] < KV_LORA)
    vals = tl.load(src + cols[None, :], mask=mc, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    scale_ptr = (src + KV_LORA).to(tl.pointer_type(tl.float32))  # 4-byte aligned: KV_LORA % 4 == 0
    scales = tl.load(scale_ptr + (cols // 128)[None, :], mask=mc, other=0.0)
    tl.store(dst + cols[None, :], (vals * scales).to(OUT.dtype.element_ty), mask=mc)
    r = tl.arange(0, BLOCK_R)
    mr = mrow[:, None] & (r[None, :] < ROPE)
    pe_ptr = (src + KV_LORA + 4 * NBLK).to(tl.pointer_type(tl.bfloat16))
    pe = tl.load(pe_ptr + r[None, :], mask=mr, other=0.0)
    tl.store(dst + KV_LORA + r[None, :], pe.to(OUT.dtype.element_ty), mask=mr)


def dequant_mla_kv(packed: torch.Tensor, kv_lora: int, rope: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton twin of cp_attn.ops.kv_fp8.unpack_mla_kv: uint8 [T, W] -> [T, kv_lora + rope]."""
    T = packed.shape[0]
    if packed.shape[-1] != mla_fp8_width(kv_lora, rope) or kv_lora % 4 or packed.stride(-1) != 1 or packed.stride(0) % 4:
        raise ValueError(f"packed FP8 latent {tuple(packed.shape)} (stride {packed.stride()}) does not match kv_lora={kv_lora}, rope={rope}")
    out = torch.empty((T, kv_lora + rope), dtype=dtype, device=packed.device)
    if T:
        BLOCK_T = 16
        _dequant_mla_kv[(triton.cdiv(T, BLOCK_T),)](
            packed, out, T, packed.stride(0), out.stride(0),
            KV_LORA=kv_lora, ROPE=rope, NBLK=-(-kv_lora // FP8_BLOCK),
            BLOCK_T=BLOCK_T, BLOCK_C=triton.next_power_of_2(kv_lora), BLOCK_R=triton.next_power_of_2(rope),
        )
    return out


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def launch_config(H: int, d_v: int, d_tail: int) -> dict:
    """Block sizes and launch shape, by the smem a program needs: Q (BLOCK_H x Dqk) stays resident,
    and num_stages buffers of BLOCK_N gathered rows stream through (Hopper: 227 KB per program)."""
    block_h = min(64, _pow2(H))
    if d_v + d_tail >= 512:  # V3.2: Q 72 KB + 2 x 72 KB of rows
        return dict(BLOCK_H=block_h, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_H=block_h, BLOCK_N=32, num_warps=4, num_stages=2)


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int, config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as cp_attn.ops.naive.sparse_mla. q [n, H, Dqk]; kv [T, Dqk] (float), or uint8
    [T, W] packed FP8 rows (kv_fp8 layout; then Dqk = d_v + rope); indices [n, K] (-1 or >= T: skip).
    Returns out [n, H, d_v] in q's dtype and lse [n, H] fp32 (natural log)."""
    n, H, Dqk = q.shape
    if kv.dtype == torch.uint8:
        kv = dequant_mla_kv(kv, d_v, Dqk - d_v, q.dtype)
    if kv.dim() != 2 or kv.shape[1] != Dqk:
        raise ValueError(f"latent {tuple(kv.shape)} does not match q's head dim {Dqk}")
    if indices.dim() != 2 or indices.shape[0] != n:
        raise ValueError(f"indices {tuple(indices.shape)} do not match {n} query rows")
    if not 0 < d_v <= Dqk:
        raise ValueError(f"d_v={d_v} outside (0, {Dqk}]")
    if kv.dtype != q.dtype:
        raise ValueError(f"latent dtype {kv.dtype} differs from q's {q.dtype}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    indices = indices.to(torch.int32).contiguous()
    out = torch.empty((n, H, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, H), dtype=torch.float32, device=q.device)
    K = indices.shape[1]
    if n == 0:
        return out, lse
    if K == 0 or kv.shape[0] == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    d_tail = Dqk - d_v
    cfg = dict(launch_config(H, d_v, d_tail), **(config or {}))
    block_h = cfg.pop("BLOCK_H")
    grid = (n, triton.cdiv(H, block_h))
    _sparse_mla_fwd[grid](
        q, kv, indices, out, lse,
        kv.shape[0], H, K,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        sm_scale * LOG2E,
        D_V=d_v, D_TAIL=d_tail, BLOCK_H=block_h, BLOCK_DV=_pow2(d_v), BLOCK_TAIL=_pow2(d_tail),
        BLOCK_SCAN=min(1024, _pow2(K)), IEEE=q.dtype == torch.float32, **cfg,
    )
    return out, lse


def flops(n_valid: int, H: int, Dqk: int, d_v: int) -> float:
    """Useful FLOPs: 2 H (Dqk + d_v) per (query row, valid index) pair."""
    return 2.0 * n_valid * H * (Dqk + d_v)


__all__ = ["sparse_mla", "dequant_mla_kv", "launch_config", "flops"]
