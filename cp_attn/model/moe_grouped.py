"""Routed experts through two grouped GEMMs: the fast twin of `MoE.routed_loop`, same contract.

Per layer, for x [n, H], expert ids [n, k] (global, -1 = none) and weights [n, k]:
    slot  = local expert of every (row, choice), E_l (past the last expert) when not held here
    order = argsort(slot)                      one sort of the n k choices; unheld ones sort last
    offs  = searchsorted(slot[order], 1..E_l)  cumulative row ends of the E_l groups (int32)
    gu    = x[order // k] @ W13[e]^T           grouped GEMM, [n k, 2 I]  (gate | up)
    y     = (silu(gate) * up) @ W2[e]^T        grouped GEMM, [n k, H]
    out[order // k] += w[order] * y            fp32 index_add, rows past offs[-1] masked out
Nothing here reads a device value on the host, so on CUDA the layer runs without a sync (the loop
syncs once per expert in `nonzero`). Unheld choices are sorted past the last group: the GEMMs skip
them and leave those output rows unwritten, which `torch.where` drops.

The expert weights are stacked once into W13 [E_l, 2 I_p, H_p] and W2 [E_l, H_p, I_p], and every
expert's nn.Linear weight is re-pointed to its view of them, so a checkpoint still loads by the
per-expert names (writing into the stack) and no weight is held twice. I_p and H_p round I and H up
so every stride is a multiple of 16 bytes (what `torch._grouped_mm` requires, on CPU too); the
padding is zeros, which adds exact zeros to every dot product and silu(0) * 0 = 0.

`torch._grouped_mm(a [M, K], b [G, K, N], offs [G] int32) -> [M, N]` multiplies rows
[offs[g-1], offs[g]) of a by b[g]. On CUDA, bf16 on SM90/SM100 runs CUTLASS kernels with no sync;
other dtypes and GPUs take torch's fallback (one offs.cpu(), then one mm per group); the CPU build
always takes that fallback, in any float dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cp_attn.model.layers import SwiGLU

IMPLS = ("loop", "grouped", "auto")
# Rows weighted and scattered per index_add: bounds the fp32 temporary ([rows, H]) at ~230 MB for
# H = 7168 instead of one [n k, H] fp32 tensor (3.7 GB for 16K rows, top-8).
SCATTER_ROWS = 8192


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def check_impl(impl: str) -> str:
    """ValueError for an unknown MoE implementation or 'grouped' on a torch without _grouped_mm."""
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE impl {impl!r}; expected one of {IMPLS}")
    if impl == "grouped" and not has_grouped_mm():
        raise ValueError(f"moe.impl=grouped needs torch._grouped_mm, which torch {torch.__version__} lacks; "
                         "use loop or auto")
    return impl


@functools.cache
def grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether 'auto' takes the grouped path here: torch has _grouped_mm, it runs this dtype on this
    device (one tiny call, cached), and on CUDA the dtype is bf16, the one with sync-free kernels."""
    if not has_grouped_mm() or (device_type == "cuda" and dtype != torch.bfloat16):
        return False
    try:
        a = torch.ones(2, 8, dtype=dtype, device=device_type)
        b = torch.ones(1, 8, 8, dtype=dtype, device=device_type)
        torch._grouped_mm(a, b, offs=torch.tensor([2], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """'loop' or 'grouped' for a layer running in `dtype` on `device`."""
    if impl == "auto":
        return "grouped" if grouped_mm_runs(device.type, dtype) else "loop"
    return check_impl(impl)


def _aligned(n: int, dtype: torch.dtype) -> int:
    per = 16 // dtype.itemsize
    return -(-n // per) * per


@dataclass
class StackedExperts:
    """The held experts' weights as two padded stacks (the storage behind each expert's weights)."""

    w13: torch.Tensor
    """[E_l, 2 I_p, H_p]: rows [0, I) gate_proj, [I_p, I_p + I) up_proj; zeros elsewhere."""
    w2: torch.Tensor
    """[E_l, H_p, I_p]: down_proj in [:H, :I]; zeros elsewhere."""
    slot_of: torch.Tensor
    """[n_experts + 1] int64: slot_of[e + 1] = local index of global expert e, E_l if not held (and for e = -1)."""
    group_ends: torch.Tensor
    """[E_l] = 1..E_l, the searchsorted probes that give each group's end."""
    hidden: int
    inter: int

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    def backs(self, slot: int, expert: SwiGLU) -> bool:
        """Whether the expert's three weights are still views into this stack (a module.to() or a
        replaced Parameter breaks that; an in-place copy_ does not)."""
        ip = self.w13.shape[1] // 2
        return (expert.gate_proj.weight.data_ptr() == self.w13[slot].data_ptr()
                and expert.up_proj.weight.data_ptr() == self.w13[slot, ip].data_ptr()
                and expert.down_proj.weight.data_ptr() == self.w2[slot].data_ptr())


@torch.no_grad()
def stack_experts(experts: Mapping[int, SwiGLU], n_experts: int) -> StackedExperts:
    """Copy the experts (global id -> SwiGLU, all the same shape) into padded stacks and re-point
    every expert's weights to views of them."""
    mods = [experts[e] for e in sorted(experts)]
    ref = mods[0].gate_proj.weight
    inter, hidden = ref.shape
    dtype, device = ref.dtype, ref.device
    ip, hp = _aligned(inter, dtype), _aligned(hidden, dtype)
    w13 = torch.zeros(len(mods), 2 * ip, hp, dtype=dtype, device=device)
    w2 = torch.zeros(len(mods), hp, ip, dtype=dtype, device=device)
    for i, m in enumerate(mods):
        views = {"gate_proj": w13[i, :inter, :hidden], "up_proj": w13[i, ip : ip + inter, :hidden],
                 "down_proj": w2[i, :hidden, :inter]}
        for name, view in views.items():
            lin: nn.Linear = getattr(m, name)
            view.copy_(lin.weight)
            lin.weight = nn.Parameter(view, requires_grad=lin.weight.requires_grad)
    slot_of = torch.full((n_experts + 1,), len(mods), dtype=torch.long, device=device)
    slot_of[torch.tensor(sorted(experts), device=device) + 1] = torch.arange(len(mods), device=device)
    group_ends = torch.arange(1, len(mods) + 1, device=device)
    return StackedExperts(w13, w2, slot_of, group_ends, hidden, inter)


def routed_grouped(stack: StackedExperts, x: torch.Tensor, expert_idx: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:, k] * Expert_{expert_idx[:, k]}(x) over the stacked experts.

    x [n, H], expert_idx [n, k] global ids in [-1, n_experts) (-1 and unheld ids add nothing),
    weights [n, k] -> fp32 [n, H]. Same rounding points as the loop (bf16 GEMM outputs, silu and
    product in x's dtype, weighting and sum in fp32); only the order of the fp32 sum differs.
    """
    n, k = expert_idx.shape
    E, H = stack.num_experts, stack.hidden
    ip, hp = stack.w2.shape[2], stack.w2.shape[1]
    out = torch.zeros((n, H), dtype=torch.float32, device=x.device)
    if n * k == 0:
        return out
    slot = stack.slot_of[expert_idx.reshape(-1) + 1]                                 # [n k], E = not here
    order = torch.argsort(slot, stable=True)                                         # [n k] grouped by expert
    sorted_slot = slot[order]
    offs = torch.searchsorted(sorted_slot, stack.group_ends, out_int32=True)         # [E] row ends
    token = order // k                                                               # [n k] source row
    xp = x if hp == H else F.pad(x, (0, hp - H))
    gu = torch._grouped_mm(xp[token], stack.w13.transpose(1, 2), offs=offs)          # [n k, 2 I_p]
    act = F.silu(gu[:, :ip]) * gu[:, ip:]                                            # [n k, I_p]
    y = torch._grouped_mm(act, stack.w2.transpose(1, 2), offs=offs)                  # [n k, H_p]
    w = weights.reshape(-1)[order].float()
    valid = sorted_slot < E                                                          # rows the GEMMs wrote
    for s in range(0, n * k, SCATTER_ROWS):
        rows = slice(s, s + SCATTER_ROWS)
        contrib = torch.where(valid[rows, None], y[rows, :H].float() * w[rows, None], 0.0)
        out.index_add_(0, token[rows], contrib)
    return out
