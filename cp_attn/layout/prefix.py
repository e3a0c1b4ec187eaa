"""New tokens appended after cached prefixes: the CP split of a prefill chunk, and the chunk schedule.

Pure index arithmetic, like split.py. A batch of B sequences has a KV cache (cp_attn.cache) in which
sequence b owns the rows [region_b, region_b + capacity_b) and has P_b tokens cached already. A chunk
brings N_b >= 0 new tokens of each sequence. Only the new tokens are split over the C ranks (any
mode, `plan_split` over the non-empty N_b, in batch order); ownership stays relative to the request:

    position of new token j of sequence b     P_b + j                       (RoPE)
    its cache row                             region_b + P_b + j            (where the gather writes it)
    its causal keys [ks, ke) in the cache     [region_b, region_b + P_b + j + 1)

so a top-k index is a cache row, and `region_b + position` names the same token in every chunking.
With P = 0 and region_b = the sequence's start in the batch, all of this is `plan_split`'s own.

`chunk_schedule` packs prompts into chunks the way SGLang's scheduler fills a prefill batch with a
token budget (`--chunked-prefill-size`): first come first served, the request that does not fit is cut
and continues first in the next batch. That is, chunk k holds tokens [kN, (k+1)N) of the concatenated
batch, pieces of several prompts when they are short.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from cp_attn.layout.split import SplitPlan, plan_split


def _check_counts(name: str, values: Sequence[int], minimum: int) -> tuple[int, ...]:
    out = []
    for b, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name}[{b}] = {v!r} must be an int >= {minimum}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class PrefixPlan:
    """The rows every rank computes for one chunk of new tokens over cached prefixes. Build it with
    `plan_prefix`. `split` is the plain split of the new tokens; this adds the cache's coordinates."""

    split: SplitPlan
    """`plan_split` of the new tokens of the sequences that have any (split sequence i is batch
    sequence `seq_index[i]`); its global order is the new tokens in batch order."""
    new_lens: tuple[int, ...]
    """N_b per batch sequence (0: nothing new for b in this chunk)."""
    prefix_lens: tuple[int, ...]
    """P_b per batch sequence: tokens cached before this chunk."""
    region_starts: tuple[int, ...]
    """First cache row of every batch sequence."""

    @cached_property
    def seq_index(self) -> torch.Tensor:
        """[B'] batch sequence of each split sequence (the ones with N_b > 0)."""
        return torch.tensor([b for b, n in enumerate(self.new_lens) if n > 0], dtype=torch.long)

    def _batch_seq(self, r: int) -> torch.Tensor:
        """[n_r] batch sequence of each of rank r's rows; 0 for padding (masked by the callers)."""
        return self.seq_index[self.split.seq_ids(r).clamp(min=0)]

    def positions(self, r: int) -> torch.Tensor:
        """[n_r] position of each row in its whole sequence (prefix included); 0 for padding."""
        real = self.split.token_index(r) >= 0
        prefix = torch.tensor(self.prefix_lens, dtype=torch.long)[self._batch_seq(r)]
        return torch.where(real, self.split.positions(r) + prefix, 0)

    def key_range(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[n_r] each: the causal keys [ks, ke) of each row as cache rows; empty for padding."""
        real = self.split.token_index(r) >= 0
        start = torch.tensor(self.region_starts, dtype=torch.long)[self._batch_seq(r)]
        ks = torch.where(real, start, 0)
        ke = torch.where(real, start + self.positions(r) + 1, 0)
        return ks, ke

    @cached_property
    def cache_rows(self) -> torch.Tensor:
        """[N] the cache row of every new token, in the split's global order (batch order)."""
        rows = [torch.arange(s + p, s + p + n, dtype=torch.long)
                for s, p, n in zip(self.region_starts, self.prefix_lens, self.new_lens) if n > 0]
        return torch.cat(rows)

    def token_index(self, r: int) -> torch.Tensor:
        """[n_r] index of each row among the chunk's new tokens (global order); -1 for padding."""
        return self.split.token_index(r)


def plan_prefix(new_lens: Sequence[int], prefix_lens: Sequence[int], region_starts: Sequence[int],
                cp_size: int, mode: str) -> PrefixPlan:
    """The split of a chunk's new tokens (`new_lens[b]` of sequence b, 0 allowed) cached after
    `prefix_lens[b]` tokens in the cache region starting at row `region_starts[b]`.

    Raises ValueError for lists of different lengths, a negative count, or a chunk with no new token
    (and whatever `plan_split` refuses: cp_size, mode).
    """
    if not (len(new_lens) == len(prefix_lens) == len(region_starts)) or not new_lens:
        raise ValueError(f"new_lens, prefix_lens and region_starts need one entry per sequence (non-empty), got "
                         f"{len(new_lens)}, {len(prefix_lens)} and {len(region_starts)}")
    new = _check_counts("new_lens", new_lens, 0)
    prefix = _check_counts("prefix_lens", prefix_lens, 0)
    starts = _check_counts("region_starts", region_starts, 0)
    if sum(new) == 0:
        raise ValueError("the chunk has no new token: at least one sequence needs new_lens[b] >= 1")
    split = plan_split([n for n in new if n > 0], cp_size, mode)
    return PrefixPlan(split, new, prefix, starts)


def chunk_schedule(seq_lens: Sequence[int], chunk_size: int) -> list[list[int]]:
    """Per chunk, the new tokens of every sequence (0 where none): chunk k holds tokens
    [k chunk_size, (k+1) chunk_size) of the concatenated batch, so every chunk but the last is full
    and a chunk may hold pieces of several sequences (SGLang's first-come-first-served packing).

    >>> chunk_schedule([5, 2, 4], 4)
    [[4, 0, 0], [1, 2, 1], [0, 0, 3]]
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    lens = _check_counts("seq_lens", seq_lens, 1)
    if not lens:
        raise ValueError("seq_lens is empty: a prefill batch needs at least one sequence")
    cu = [0]
    for L in lens:
        cu.append(cu[-1] + L)
    chunks = []
    for lo in range(0, cu[-1], chunk_size):
        hi = min(lo + chunk_size, cu[-1])
        chunks.append([max(0, min(hi, e) - max(lo, s)) for s, e in zip(cu, cu[1:])])
    return chunks


__all__ = ["PrefixPlan", "chunk_schedule", "plan_prefix"]
