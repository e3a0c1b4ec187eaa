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

    def __init__(self, group: dist.ProcessGroup | None = None, *, single: bool = False):
        """`group` (default: the world group when one is initialised); `single=True` forces a
        one-process group with no process group behind it, even inside a torchrun job."""
        self.group = group
        if single or (group is None and not (dist.is_available() and dist.is_initialized())):
            self.rank, self.size = 0, 1
        else:
            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._local = self.size == 1

    @classmethod
    def single(cls) -> "Comm":
        """A group of one process, no process group: every collective is a local copy."""
        return cls(single=True)

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, size={self.size})"

    # ---- pure indexing (no traffic) -------------------------------------------------------------

    def _check_plan(self, plan: SplitPlan) -> None:
        if plan.cp_size != self.size:
            raise ValueError(f"the split plan is for {plan.cp_size} ranks but this CP group has {self.size}")

    def shard(self, x_full: torch.Tensor, plan: SplitPlan) -> torch.Tensor:
        """This rank's rows of a tensor in global token order [T, ...] -> [n_r, ...]; pads are 0."""
        self._check_plan(plan)
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
        self._check_plan(plan)
        if x_local.shape[0] != plan.num_rows(self.rank):
            raise ValueError(f"rank {self.rank} holds {x_local.shape[0]} rows, the plan gives it {plan.num_rows(self.rank)}")
        pending = self.all_gather_async(x_local, plan.shard_size)
        restore = plan.restore_index_on(x_local.device)
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

    def exchange_counts(self, send_counts: Sequence[int], device: torch.device | str | None = None) -> list[int]:
        """All-to-all of one int per peer: how many rows each rank will receive from each other.
        `device` defaults to the current CUDA device on NCCL groups and the CPU otherwise."""
        if len(send_counts) != self.size:
            raise ValueError(f"need one count per rank ({self.size}), got {len(send_counts)}")
        if device is None:
            nccl = not self._local and dist.get_backend(self.group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
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

    def all_gather_object(self, obj: object) -> list:
        """Every rank's picklable `obj`, in rank order. For small metadata (per-rank report lines),
        never tensors of the forward."""
        if self._local:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def subgroup(self, size: int) -> "Comm | None":
        """A CP group of this group's first `size` ranks, so one set of processes can run several CP sizes.

        Collective: every rank of this group calls it with the same sizes in the same order. Ranks outside
        the new group get None. Size 1 needs no process group (`Comm.single()` on rank 0).
        """
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= self.size:
            raise ValueError(f"a subgroup of a group of {self.size} ranks needs 1 <= size <= {self.size}, got {size!r}")
        if size == self.size:
            return self
        if size == 1:
            return Comm.single() if self.rank == 0 else None
        group = self.group if self.group is not None else dist.group.WORLD
        sub = dist.new_group([dist.get_global_rank(group, r) for r in range(size)])
        return Comm(sub) if self.rank < size else None


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


def exit_process(code: int = 0) -> None:
    """End a rank's process once its work is done and its output written, without the interpreter's
    teardown: gloo's worker threads can free a finished collective's tensors while Python shuts down
    (seen: SIGABRT, "terminate called without an active exception", after a correct result in about
    1 of 10 two-rank CPU runs; torch keeps the process group alive past destroy_process_group)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- expert-parallel dispatch / combine (the deepep MoE backend) ---------------------------------


@dataclass
class DispatchHandle:
    """What `combine` needs to send results back to the rows they came from."""

    token: torch.Tensor  # [M] local row of every dispatched copy, grouped by destination rank
    send_splits: list[int]
    recv_splits: list[int]
    num_rows: int


class AllToAllDispatcher:
    """DeepEP normal-mode semantics over `all_to_all_single` (gloo and NCCL).

    Experts are owned by ranks in contiguous blocks of E / C. `dispatch` sends every local row once
    to each rank that owns at least one of its top-k experts, with the top-k ids made local to that
    rank (-1 = not here) and the matching weights; `combine` sends each rank's (already weighted)
    results back and sums them per row.
    """

    def __init__(self, comm: Comm, num_experts: int):
        if num_experts % comm.size:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {comm.size} ranks")
        self.comm, self.num_experts = comm, num_experts
        self.per_rank = num_experts // comm.size

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchHandle]:
        """x [n, hidden], topk_idx [n, k] global ids, topk_weights [n, k] fp32 ->
        received rows [m, hidden], their local expert ids [m, k] (-1 = other rank), weights [m, k]."""
        n, C = x.shape[0], self.comm.size
        owner = topk_idx // self.per_rank                                         # [n, k]
        in_rank = torch.zeros((n, C), dtype=torch.bool, device=x.device)
        in_rank.scatter_(1, owner, True)                                           # DeepEP's is_token_in_rank
        dest, token = in_rank.t().nonzero(as_tuple=True)                           # grouped by rank, rows ascending
        send_splits = in_rank.sum(0).tolist()
        local_idx = torch.where(owner[token] == dest[:, None], topk_idx[token] - dest[:, None] * self.per_rank, -1)
        # ids ride with the weights in one fp32 message (exact for ids < 2^24)
        meta = torch.cat([local_idx.float(), topk_weights[token].float()], dim=-1)
        recv_splits = self.comm.exchange_counts(send_splits, device=x.device)
        x_pending = self.comm.all_to_all_async(x[token], send_splits, recv_splits)
        recv_meta = self.comm.all_to_all(meta, send_splits, recv_splits)
        k = topk_idx.shape[1]
        handle = DispatchHandle(token, send_splits, recv_splits, n)
        return x_pending.wait(), recv_meta[:, :k].long(), recv_meta[:, k:], handle

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Weighted expert outputs [m, hidden] of the received rows -> [n, hidden] summed per local row."""
        back = self.comm.all_to_all(y, handle.recv_splits, handle.send_splits)
        out = torch.zeros((handle.num_rows, y.shape[1]), dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.token, back.float())
        return out.to(y.dtype)


class DeepEPDispatcher:
    """The same contract through `deep_ep.Buffer` (normal mode, intranode NVLink), used when deep_ep is
    importable and the group runs on NCCL. Buffer sizes follow deep_ep's own dispatch/combine config
    hints for this group size and row width. Not exercised by CI (no GPU, no deep_ep there)."""

    def __init__(self, comm: Comm, num_experts: int, hidden_bytes: int):
        from deep_ep import Buffer  # ImportError -> the caller falls back to AllToAllDispatcher

        if num_experts % comm.size:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {comm.size} ranks")
        self.comm, self.num_experts = comm, num_experts
        group = comm.group if comm.group is not None else dist.group.WORLD
        nvl_bytes = max(
            cfg.get_nvl_buffer_size_hint(hidden_bytes, comm.size)
            for cfg in (Buffer.get_dispatch_config(comm.size), Buffer.get_combine_config(comm.size))
        )
        self.buffer = Buffer(group, nvl_bytes, 0)

    def dispatch(self, x, topk_idx, topk_weights):
        n_rank, n_rdma, n_expert, in_rank, _ = self.buffer.get_dispatch_layout(topk_idx, self.num_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = self.buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights.float(), num_tokens_per_rank=n_rank,
            num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert,
        )
        return recv_x, recv_idx, recv_w, handle

    def combine(self, y, handle):
        out, _, _ = self.buffer.combine(y, handle)
        return out


def ep_dispatcher(comm: Comm, num_experts: int, hidden: int, impl: str = "auto", dtype: torch.dtype = torch.bfloat16):
    """'all_to_all', 'deep_ep', or 'auto': deep_ep when it is importable, the group runs on NCCL and
    rows are bf16 (what its normal-mode kernels move); all_to_all_single otherwise."""
    if impl not in ("auto", "all_to_all", "deep_ep"):
        raise ValueError(f"unknown deepep dispatch implementation {impl!r}; expected auto, all_to_all or deep_ep")
    on_nccl = comm.size > 1 and dist.is_initialized() and dist.get_backend(comm.group) == "nccl"
    if impl == "deep_ep" and dtype != torch.bfloat16:
        raise ValueError(f"moe.deepep_impl=deep_ep moves bf16 rows; this model runs in {dtype}")
    if impl == "deep_ep" or (impl == "auto" and on_nccl and dtype == torch.bfloat16):
        try:
            return DeepEPDispatcher(comm, num_experts, hidden_bytes=hidden * 2)  # bf16 rows
        except ImportError:
            if impl == "deep_ep":
                raise
    return AllToAllDispatcher(comm, num_experts)
