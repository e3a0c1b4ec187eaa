"""The context-parallel prefill forward on one rank of a CP group.

Rank r computes only its own rows of the batch (see cp_attn.layout); per layer it all-gathers the
latent KV and the indexer keys to global order, scores and attends for its rows only, and runs the
FFN on its rows (dense) or through a MoE backend. At the end the final-normed hidden states are
all-gathered back to global order, so every rank can produce the logits of every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from cp_attn.comm import Comm
from cp_attn.config import ModelConfig
from cp_attn.inputs import validate_batch
from cp_attn.layout import SplitPlan, canonical_mode, plan_split
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
    topk: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> [T, K] top-k key indices of every token in global order (when recorded)."""

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Cut a [T, ...] tensor into per-sequence pieces."""
        return list(x.split(list(self.plan.seq_lens)))


def check_prefill_args(
    cfg: ModelConfig, cp_size: int, mode: str, backend: str, input_ids: Sequence[Sequence[int]]
) -> list[list[int]]:
    """Every check that can fail, done before any collective (identically on every rank)."""
    canonical_mode(mode)
    check_backend(backend, cfg, cp_size)
    return validate_batch(input_ids, cfg)


def cp_context(plan: SplitPlan, comm: Comm, moe, device: torch.device, **kw) -> ForwardContext:
    """This rank's ForwardContext: positions and key ranges from the plan, gathers through `comm`."""
    ks, ke = plan.key_range(comm.rank)
    ctx = ForwardContext(
        positions=plan.positions(comm.rank),
        key_start=ks,
        key_end=ke,
        num_tokens=plan.num_tokens,
        gather=lambda x: comm.gather(x, plan),
        moe=moe,
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
) -> PrefillOutput:
    """Run the prefill of `input_ids` (every rank passes the whole batch) on this rank's rows."""
    check_kv_dtype(kv_dtype)
    ids = check_prefill_args(model.cfg, comm.size, mode, moe_backend, input_ids)
    device = model.embed_tokens.weight.device
    plan = plan_split([len(s) for s in ids], comm.size, mode)
    flat = torch.tensor([t for s in ids for t in s], dtype=torch.long)
    local_ids = comm.shard(flat, plan).to(device)                    # padding rows read token 0

    captured: dict[int, torch.Tensor] = {}
    ctx = cp_context(
        plan, comm, make_moe_backend(moe_backend, comm, plan, model.cfg, deepep_impl, model.embed_tokens.weight.dtype), device,
        kernels=kernels or KernelSet(), timer=timer, attn_impl=attn_impl, kv_dtype=kv_dtype,
        on_topk=(lambda layer, idx: captured.__setitem__(layer, idx)) if record_topk else None,
    )
    hidden_local = model(local_ids, ctx)
    with ctx.stage("final.gather"):
        hidden = comm.gather(hidden_local, plan)
    topk = {layer: comm.gather(idx, plan) for layer, idx in captured.items()}
    return PrefillOutput(hidden, plan, topk)
