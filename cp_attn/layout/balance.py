"""How much work and padding a split gives each rank: pure counts from a SplitPlan, no timing.

Per rank r, over its real rows (position p in their own sequence, K = index_topk):
    indexer keys   sum (p + 1)          the lightning indexer scores every causal key (quadratic in
                                        length; also the work of dense causal attention)
    attended keys  sum min(K, p + 1)    sparse MLA reads at most K latent rows per query (linear in
                                        length once p >= K)
The slowest rank sets the pace, so `imbalance` (max / mean) is the slowdown against a perfect split.

`contiguous_loads` is the split neither mode uses, for comparison: rank r takes the r-th of C equal
runs of the concatenated batch, so the late tokens of long sequences (the expensive ones) pile up on
the last ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from cp_attn.layout.split import SplitPlan, plan_split, validate_seq_lens


@dataclass(frozen=True)
class RankLoad:
    """The rows of one rank and the attention work they carry."""

    rows: int
    """Real rows (tokens) the rank computes."""
    pad_rows: int
    """Padding rows it computes too (round_robin pads T up to a multiple of C; in_seq never does)."""
    indexer_keys: int
    """sum over real rows of (position + 1): keys the indexer scores."""
    attended_keys: int
    """sum over real rows of min(K, position + 1): keys sparse attention reads."""


def _load(pos: torch.Tensor, pad_rows: int, topk: int) -> RankLoad:
    keys = pos + 1
    return RankLoad(int(pos.numel()), pad_rows, int(keys.sum()), int(keys.clamp(max=topk).sum()))


def _check_topk(topk: int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")


def rank_loads(plan: SplitPlan, topk: int) -> list[RankLoad]:
    """Per rank of `plan`, its rows and work with top-k `topk`."""
    _check_topk(topk)
    out = []
    for r in range(plan.cp_size):
        real = plan.token_index(r) >= 0
        out.append(_load(plan.positions(r)[real], int((~real).sum()), topk))
    return out


def contiguous_loads(seq_lens: Sequence[int], cp_size: int, topk: int) -> list[RankLoad]:
    """Per rank, the load of the naive split: rank r takes global tokens [r S, (r + 1) S), S = ceil(T / C)."""
    _check_topk(topk)
    pos = plan_split(validate_seq_lens(seq_lens), 1, "round_robin").positions(0)   # [T] position of every token
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be an int >= 1, got {cp_size!r}")
    S = -(-pos.numel() // cp_size)
    return [_load(pos[r * S : (r + 1) * S], 0, topk) for r in range(cp_size)]


def rows_by_sequence(plan: SplitPlan) -> list[list[int]]:
    """[C][B]: how many rows of each sequence every rank computes."""
    B = len(plan.seq_lens)
    out = []
    for r in range(plan.cp_size):
        seq = plan.seq_ids(r)
        out.append(torch.bincount(seq[seq >= 0], minlength=B).tolist())
    return out


def gather_padding(plan: SplitPlan) -> int:
    """Padding rows in every all-gather buffer: C * S - T (each rank is padded to the largest shard)."""
    return plan.cp_size * plan.shard_size - plan.num_tokens


def relative(values: Sequence[float]) -> list[float]:
    """Per-rank values as a share of the mean: 1.0 everywhere is a perfect split."""
    values = list(values)
    if not values:
        raise ValueError("relative load of no ranks")
    mean = sum(values) / len(values)
    return [v / mean if mean else 1.0 for v in values]


def imbalance(values: Sequence[float]) -> float:
    """max / mean of per-rank values: 1.0 is a perfect split, 1.5 means the slowest rank has 50% more."""
    values = list(values)
    if not values:
        raise ValueError("imbalance of no ranks")
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0
