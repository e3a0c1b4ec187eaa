"""MoE backends for CP prefill: the same layer math, three ways to place experts and move tokens.

    local   one process, every expert.
    fused   (SGLang ScatterMode.FULL) all-gather the local rows in rank order; every rank holds
            part r of C of every expert's intermediate dim (and of the shared expert), computes its
            partial sums for all rows; a reduce-scatter adds the parts and returns each rank's rows.
    deepep  (ScatterMode.SCATTERED) rank r owns experts [r E/C, (r+1) E/C); rows travel to the owners
            of their top-k experts (all-to-all dispatch), are weighted there, and come back summed
            (all-to-all combine). The shared expert runs locally on the local rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cp_attn.comm import Comm, ep_dispatcher
from cp_attn.config import ModelConfig
from cp_attn.layout import SplitPlan
from cp_attn.model.moe import MoE

BACKENDS = ("fused", "deepep")


def check_backend(backend: str, cfg: ModelConfig, cp_size: int) -> None:
    """ValueError, before any collective, for a backend or expert count this group cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; expected one of {BACKENDS}")
    has_moe = cfg.num_hidden_layers > cfg.first_k_dense_replace
    if backend == "deepep" and has_moe and cfg.n_routed_experts % cp_size:
        raise ValueError(f"moe.backend=deepep needs n_routed_experts ({cfg.n_routed_experts}) divisible by the CP size ({cp_size})")


@dataclass(frozen=True)
class ExpertPlacement:
    """Which expert weights a rank loads."""

    expert_ids: list[int] | None  # None = all
    expert_shard: tuple[int, int]  # part (i, n) of every expert's intermediate dim


def expert_placement(backend: str, cfg: ModelConfig, rank: int, cp_size: int) -> ExpertPlacement:
    check_backend(backend, cfg, cp_size)
    if cp_size == 1:
        return ExpertPlacement(None, (0, 1))
    if backend == "fused":
        return ExpertPlacement(None, (rank, cp_size))
    per = cfg.n_routed_experts // cp_size
    return ExpertPlacement(list(range(rank * per, (rank + 1) * per)), (0, 1))


class FusedMoE:
    """All-gather rows, expert-parallel over the intermediate dim, reduce-scatter back."""

    def __init__(self, comm: Comm, plan: SplitPlan):
        self.comm, self.plan = comm, plan
        rows = torch.tensor([plan.num_rows(r) for r in range(comm.size)])
        # rows of the rank-major gather buffer that hold real rows (in_seq shards are uneven)
        self.real = (torch.arange(plan.shard_size)[None, :] < rows[:, None]).flatten()

    def __call__(self, moe: MoE, x: torch.Tensor) -> torch.Tensor:
        n, S = x.shape[0], self.plan.shard_size
        x_all = self.comm.all_gather(x, rows=S)                                  # [C*S, hidden]
        idx, w = moe.gate(x_all)
        if self.real.device != x.device:
            self.real = self.real.to(x.device)                                   # once, not per layer
        idx = idx.masked_fill(~self.real[:, None], -1)                           # pad rows route nowhere
        partial = moe.routed(x_all, idx, w) + moe.shared_experts(x_all)          # this rank's part of the sum
        return self.comm.reduce_scatter(partial)[:n]


class DeepEPMoE:
    """Dispatch rows to the ranks owning their experts, compute there, combine back."""

    def __init__(self, comm: Comm, cfg: ModelConfig, impl: str = "auto", dtype: torch.dtype = torch.bfloat16):
        self.comm = comm
        self.per_rank = cfg.n_routed_experts // comm.size
        self.dispatcher = ep_dispatcher(comm, cfg.n_routed_experts, cfg.hidden_size, impl, dtype)

    def __call__(self, moe: MoE, x: torch.Tensor) -> torch.Tensor:
        idx, w = moe.gate(x)
        recv_x, recv_local_idx, recv_w, handle = self.dispatcher.dispatch(x, idx, w)
        first = self.comm.rank * self.per_rank
        recv_idx = torch.where(recv_local_idx >= 0, recv_local_idx + first, -1)
        y = moe.routed(recv_x, recv_idx, recv_w)
        return self.dispatcher.combine(y, handle) + moe.shared_experts(x)


def make_moe_backend(backend: str, comm: Comm, plan: SplitPlan, cfg: ModelConfig, deepep_impl: str = "auto",
                     dtype: torch.dtype = torch.bfloat16):
    """The MoE runner for a ForwardContext (also at C = 1, where every collective is a local copy)."""
    check_backend(backend, cfg, comm.size)
    if backend == "fused":
        return FusedMoE(comm, plan)
    return DeepEPMoE(comm, cfg, deepep_impl, dtype)
