"""The context-parallel prefill forward on one rank of a CP group.

Rank r computes only its own rows of the batch (see cp_attn.layout); per layer it all-gathers the
latent KV and the indexer keys to global order, scores and attends for its rows only, and runs the
FFN on its rows (dense) or through a MoE backend. At the end the final-normed hidden states are
all-gathered back to global order, so every rank can produce the logits of every token.

Over a KV cache (cache=...): the batch's tokens are new tokens appended after each sequence's cached
ones. Only they are split (cp_attn.layout.plan_prefix); their positions and key ranges count the
prefix, each layer writes their gathered KV into the cache, and attention reads the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from cp_attn.cache import KVCache
from cp_attn.comm import Comm
from cp_attn.config import ModelConfig
from cp_attn.inputs import validate_batch
from cp_attn.layout import PrefixPlan, SplitPlan, canonical_mode, plan_prefix, plan_split
from cp_attn.model import ForwardContext, Transformer
from cp_attn.model.context import check_kv_dtype
from cp_attn.ops.kernels import KernelSet
from cp_attn.parallel.moe import check_backend, make_moe_backend
from cp_attn.timing import StageTimer


@dataclass
class PrefillOutput:
    hidden: torch.Tensor
    """[T, hidden] final-normed hidden states of every token, in global order (on every rank)."""
    plan: SplitPlan
    """The split of this forward's tokens (with a cache: of the new tokens of the sequences that have any)."""
    topk: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> [T, K] top-k key indices of every token in global order (when recorded); with a
    cache they are cache rows (KVCache.token_of maps them to (sequence, position))."""
    new_lens: tuple[int, ...] | None = None
    """With a cache: the new tokens of every sequence of the batch, 0 allowed."""

    @property
    def seq_lens(self) -> tuple[int, ...]:
        """Tokens of every sequence in this forward (with a cache: its new ones, possibly 0)."""
        return self.plan.seq_lens if self.new_lens is None else self.new_lens

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Cut a [T, ...] tensor into per-sequence pieces (empty ones for sequences with no new token)."""
        return list(x.split(list(self.seq_lens)))


def check_prefill_args(
    cfg: ModelConfig, cp_size: int, mode: str, backend: str, input_ids: Sequence[Sequence[int]],
    allow_empty: bool = False,
) -> list[list[int]]:
    """Every check that can fail, done before any collective (identically on every rank).
    `allow_empty`: sequences may bring no token (chunks over a KV cache)."""
    canonical_mode(mode)
    check_backend(backend, cfg, cp_size)
    return validate_batch(input_ids, cfg, allow_empty=allow_empty)


def cp_context(plan: SplitPlan, comm: Comm, moe, device: torch.device, prefix: PrefixPlan | None = None,
               **kw) -> ForwardContext:
    """This rank's ForwardContext: positions and key ranges from the plan (from `prefix`, in cache
    rows, when the tokens follow cached prefixes; pass the cache in **kw), gathers through `comm`."""
    rows = plan if prefix is None else prefix
    ks, ke = rows.key_range(comm.rank)
    ctx = ForwardContext(
        positions=rows.positions(comm.rank),
        key_start=ks,
        key_end=ke,
        num_tokens=plan.num_tokens,
        gather=lambda x: comm.gather(x, plan),
        gather_async=lambda x: comm.gather_async(x, plan),
        moe=moe,
        cache_rows=None if prefix is None else prefix.cache_rows,
        **kw,
    )
    return ctx.to(device)


@torch.no_grad()
def cp_prefill(
    model: Transformer,
    comm: Comm,
    input_ids: Sequence[Sequence[int]],
    mode: str,
    moe_backend: str,
    *,
    kernels: KernelSet | None = None,
    deepep_impl: str = "auto",
    timer: StageTimer | None = None,
    record_topk: bool = False,
    attn_impl: str = "sparse",
    kv_dtype: str = "auto",
    cache: KVCache | None = None,
    overlap_gather: bool = True,
) -> PrefillOutput:
    """Run the prefill of `input_ids` (every rank passes the whole batch) on this rank's rows.

    With `cache` (one entry per sequence, built for this model, kv_dtype and compute dtype; every rank
    holds an identical one): `input_ids[b]` are sequence b's next tokens, possibly none, placed after
    its `cache.lengths[b]` cached ones. They attend to that prefix and to each other, their KV is
    written into the cache, and `cache.lengths` grows by them. Every check runs before any collective.
    """
    check_kv_dtype(kv_dtype)
    ids = check_prefill_args(model.cfg, comm.size, mode, moe_backend, input_ids, allow_empty=cache is not None)
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    new_lens = [len(s) for s in ids]
    prefix = None
    if cache is None:
        plan = plan_split(new_lens, comm.size, mode)
    else:
        cache.check(model.cfg, new_lens, kv_dtype, dtype, device)
        prefix = plan_prefix(new_lens, cache.lengths, cache.region_starts, comm.size, mode)
        plan = prefix.split
    flat = torch.tensor([t for s in ids for t in s], dtype=torch.long)
    local_ids = comm.shard(flat, plan).to(device)                    # padding rows read token 0

    captured: dict[int, torch.Tensor] = {}
    ctx = cp_context(
        plan, comm, make_moe_backend(moe_backend, comm, plan, model.cfg, deepep_impl, dtype), device, prefix,
        kernels=kernels or KernelSet(), timer=timer, attn_impl=attn_impl, kv_dtype=kv_dtype, cache=cache,
        overlap_gather=overlap_gather,
        on_topk=(lambda layer, idx: captured.__setitem__(layer, idx)) if record_topk else None,
    )
    hidden_local = model(local_ids, ctx)
    with ctx.stage("final.gather"):
        hidden = comm.gather(hidden_local, plan)
    topk = {layer: comm.gather(idx, plan) for layer, idx in captured.items()}
    if cache is not None:
        cache.advance(new_lens)
    return PrefillOutput(hidden, plan, topk, None if cache is None else tuple(new_lens))
