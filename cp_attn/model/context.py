"""What a forward pass needs to know beyond the weights: where its rows sit in the batch, how to see
the whole batch, how to run MoE, which kernels to use. The model reads it; it never builds one.

Single-process runs use `ForwardContext.single(seq_lens)`; CP runs get one from
`cp_attn.parallel.context.cp_context`, whose `gather` and `moe` move data through a `Comm`.
This file imports no torch.distributed.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Protocol

import torch

from cp_attn.ops.kernels import KernelSet
from cp_attn.timing import StageTimer

if TYPE_CHECKING:
    from cp_attn.cache import KVCache
    from cp_attn.model.moe import MoE

ATTN_IMPLS = ("sparse", "dense_mask")
KV_DTYPES = ("auto", "bf16", "fp8")


class Waitable(Protocol):
    def wait(self) -> torch.Tensor: ...


@dataclass
class _Deferred:
    run: Callable[[], torch.Tensor]

    def wait(self) -> torch.Tensor:
        return self.run()


def check_kv_dtype(kv_dtype: str) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; expected one of {KV_DTYPES}")


@dataclass
class ForwardContext:
    """Per-forward facts about this rank's n rows (T = tokens in the whole batch)."""

    positions: torch.Tensor
    """[n] position of each row in its own sequence (0 for padding rows); drives RoPE."""
    key_start: torch.Tensor
    """[n] ks: first key of the row's sequence, as an index into the gathered (global-order) buffer,
    or into the cache's buffers when `cache` is set."""
    key_end: torch.Tensor
    """[n] ke = ks + position + 1 (causal end); ks == ke for padding rows."""
    num_tokens: int
    """T, the rows `gather` returns."""
    gather: Callable[[torch.Tensor], torch.Tensor]
    """Local rows [n, ...] -> every token of the batch [T, ...] in global order."""
    moe: Callable[["MoE", torch.Tensor], torch.Tensor]
    """Runs a MoE layer (routed + shared experts) on the local rows [n, hidden] -> [n, hidden]."""
    gather_async: Callable[[torch.Tensor], "Waitable"] | None = None
    """The same gather, started now and finished by `.wait()` (None: `gather` runs at wait time)."""
    overlap_gather: bool = True
    """Start each layer's KV gather before the query projections and wait for it after them, so the
    collective runs behind that work (off: gather, then project; for measuring what is hidden)."""
    kernels: KernelSet = field(default_factory=KernelSet)
    """Implementations of the sparse-attention stages."""
    attn_impl: str = "sparse"
    """'sparse' (absorbed MLA over top-k rows) or 'dense_mask' (naive MLA + -inf mask oracle)."""
    kv_dtype: str = "auto"
    """What the gathered KV holds: 'auto' (the compute dtype), 'bf16' (rounded to bf16), 'fp8' (each
    rank packs its rows to cp_attn.ops.kv_fp8's layouts, the gather moves the bytes, kernels read FP8)."""
    timer: StageTimer | None = None
    """Accumulates seconds per stage when set."""
    on_topk: Callable[[int, torch.Tensor], None] | None = None
    """Observer called with (layer, [n, K] indices into the gathered buffer) for analysis."""
    cache: "KVCache | None" = None
    """A KV cache (cp_attn.cache) holding the batch's earlier tokens: after each layer's gather the new
    rows are written into it, and the indexer and sparse MLA read its whole buffers (then ks/ke and
    top-k indices are cache rows). None: keys are the gathered tokens of this forward only."""
    cache_rows: torch.Tensor | None = None
    """[T] with `cache`: the cache row of every gathered token (they are this forward's new tokens)."""

    def __post_init__(self) -> None:
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attention implementation {self.attn_impl!r}; expected one of {ATTN_IMPLS}")
        check_kv_dtype(self.kv_dtype)
        if (self.cache is None) != (self.cache_rows is None):
            raise ValueError("cache and cache_rows come together: the rows say where the new tokens go")

    def start_gather(self, x: torch.Tensor) -> "Waitable":
        """Start gathering `x`; `.wait()` returns the gathered rows."""
        if self.gather_async is not None:
            return self.gather_async(x)
        return _Deferred(lambda: self.gather(x))

    def stage(self, name: str) -> ContextManager:
        return self.timer.stage(name) if self.timer is not None else nullcontext()

    def to(self, device: torch.device | str) -> "ForwardContext":
        self.positions = self.positions.to(device)
        self.key_start = self.key_start.to(device)
        self.key_end = self.key_end.to(device)
        if self.cache_rows is not None:
            self.cache_rows = self.cache_rows.to(device)
        return self

    @classmethod
    def single(cls, seq_lens: list[int], **kw) -> "ForwardContext":
        """One process computes every token of the batch (rows = global tokens, in order)."""
        from cp_attn.layout import plan_split
        from cp_attn.model.moe import moe_local

        plan = plan_split(seq_lens, 1, "round_robin")
        ks, ke = plan.key_range(0)
        return cls(plan.positions(0), ks, ke, plan.num_tokens, gather=lambda x: x, moe=moe_local, **kw)
