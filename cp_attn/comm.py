"""All communication of a context-parallel group. The only module that touches process groups.

Model and MoE code call these methods on a `Comm` handed to them; they never import
torch.distributed. Every collective works on gloo (CPU) and NCCL (GPU). A `Comm` of size 1 with
no process group (`Comm.single()`) turns every collective into a local copy, so the single-rank
path runs the very same code.

Each collective has an `*_async` form that returns a `Pending`; `.wait()` finishes the transfer
and applies any post-processing (un-padding, reranging) and returns the result tensor.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from cp_attn.layout import SplitPlan

# torch >= 2.13 renamed the tensor-in/tensor-out collectives; older releases (the GPU machines' 2.11) lack the new names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Pending:
    """An in-flight collective. `wait()` returns its result (once; later calls return the same)."""

    work: object | None
    finish: Callable[[], torch.Tensor]
    _result: torch.Tensor | None = field(default=None, repr=False)

    def wait(self) -> torch.Tensor:
        if self._result is None:
            if self.work is not None:
                self.work.wait()
            self._result = self.finish()
        return self._result


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] > rows:
        raise ValueError(f"cannot pad {x.shape[0]} rows down to {rows}")
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad]).contiguous()


class Comm:
    """A CP group: `rank`, `size`, and the collectives the CP forward needs."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, rank: int | None = None, size: int | None = None):
        self.group = group
        if group is None and rank is None:
            if dist.is_available() and dist.is_initialized():
                self.rank, self.size = dist.get_rank(), dist.get_world_size()
            else:
                self.rank, self.size = 0, 1
        elif group is None:
            self.rank, self.size = rank, size if size is not None else 1
        else:
            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._local = self.size == 1

    @classmethod
    def single(cls) -> "Comm":
        """A group of one process, no process group: every collective is a local copy."""
        return cls(None, rank=0, size=1)

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, size={self.size})"

    # ---- pure indexing (no traffic) -------------------------------------------------------------

    def shard(self, x_full: torch.Tensor, plan: SplitPlan) -> torch.Tensor:
        """This rank's rows of a tensor in global token order [T, ...] -> [n_r, ...]; pads are 0."""
        tok = plan.token_index(self.rank).to(x_full.device)
        rows = x_full[tok.clamp(min=0)]
        pad = (tok < 0).view(-1, *([1] * (x_full.dim() - 1)))
        return rows.masked_fill(pad, 0) if bool((tok < 0).any()) else rows

    # ---- collectives ----------------------------------------------------------------------------

    def all_gather_async(self, x_local: torch.Tensor, rows: int | None = None) -> Pending:
        """Rank-major gather, no reorder: [n_r, ...] -> [C * rows, ...], row i of rank r at r*rows + i.

        `rows` (default: this rank's n_r, which must then be equal on all ranks) pads uneven shards
        with zeros.
        """
        rows = x_local.shape[0] if rows is None else rows
        x = _pad_rows(x_local, rows)
        if self._local:
            return Pending(None, lambda: x.clone())
        out = x.new_empty((self.size * rows, *x.shape[1:]))
        work = _all_gather_tensor(out, x, group=self.group, async_op=True)
        return Pending(work, lambda: out)

    def all_gather(self, x_local: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        return self.all_gather_async(x_local, rows).wait()

    def gather_async(self, x_local: torch.Tensor, plan: SplitPlan) -> Pending:
        """All-gather + rerange: this rank's rows [n_r, ...] -> the whole batch [T, ...] in global order."""
        if x_local.shape[0] != plan.num_rows(self.rank):
            raise ValueError(f"rank {self.rank} holds {x_local.shape[0]} rows, the plan gives it {plan.num_rows(self.rank)}")
        pending = self.all_gather_async(x_local, plan.shard_size)
        restore = plan.restore_index.to(x_local.device)
        return Pending(pending.work, lambda: pending.finish()[restore])

    def gather(self, x_local: torch.Tensor, plan: SplitPlan) -> torch.Tensor:
        return self.gather_async(x_local, plan).wait()

    def reduce_scatter_async(self, x_full: torch.Tensor) -> Pending:
        """Sum over ranks, then rank r keeps rows [r*n, (r+1)*n) of the result: [C*n, ...] -> [n, ...]."""
        if x_full.shape[0] % self.size:
            raise ValueError(f"reduce_scatter needs rows divisible by {self.size}, got {x_full.shape[0]}")
        if self._local:
            return Pending(None, lambda: x_full.clone())
        x = x_full.contiguous()
        out = x.new_empty((x.shape[0] // self.size, *x.shape[1:]))
        work = _reduce_scatter_tensor(out, x, group=self.group, async_op=True)
        return Pending(work, lambda: out)

    def reduce_scatter(self, x_full: torch.Tensor) -> torch.Tensor:
        return self.reduce_scatter_async(x_full).wait()

    def exchange_counts(self, send_counts: Sequence[int], device: torch.device | str = "cpu") -> list[int]:
        """All-to-all of one int per peer: how many rows each rank will receive from each other."""
        if len(send_counts) != self.size:
            raise ValueError(f"need one count per rank ({self.size}), got {len(send_counts)}")
        send = torch.tensor(list(send_counts), dtype=torch.long, device=device)
        if self._local:
            return send.tolist()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.tolist()

    def all_to_all_async(
        self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]
    ) -> Pending:
        """Rows [sum(send_splits), ...]: the first send_splits[0] go to rank 0, ...; returns the rows
        received, [sum(recv_splits), ...], rank-major. `recv_splits` comes from `exchange_counts`."""
        send_splits, recv_splits = list(map(int, send_splits)), list(map(int, recv_splits))
        if len(send_splits) != self.size or len(recv_splits) != self.size:
            raise ValueError(f"need one split per rank ({self.size}): send {send_splits}, recv {recv_splits}")
        if sum(send_splits) != x.shape[0]:
            raise ValueError(f"send splits {send_splits} do not add up to {x.shape[0]} rows")
        if self._local:
            return Pending(None, lambda: x.clone())
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        work = dist.all_to_all_single(
            out, x, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=self.group, async_op=True
        )
        return Pending(work, lambda: out)

    def all_to_all(self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]) -> torch.Tensor:
        return self.all_to_all_async(x, send_splits, recv_splits).wait()

    def barrier(self) -> None:
        if not self._local:
            dist.barrier(group=self.group)


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> Comm:
    """Join the torchrun group (env:// rendezvous) and return its Comm; a single process without
    torchrun's environment gets `Comm.single()`.

    backend 'auto' picks NCCL when CUDA is available (one GPU per local rank) and gloo otherwise.
    The timeout bounds every collective, so a rank that dies mid-run cannot hang the others forever.
    """
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"unknown process-group backend {backend!r}; expected auto, gloo or nccl")
    if "WORLD_SIZE" not in os.environ:
        return Comm.single()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Comm(dist.group.WORLD)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
