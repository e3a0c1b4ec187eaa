"""Token layouts for context-parallel prefill: which global token each rank's rows hold.

Pure index arithmetic on plain ints; nothing here touches a process group, so every rank's
shard of any batch can be built and checked in one process.

Notation: a batch of B sequences with lengths L_b is concatenated into T global tokens
(`cu_seqlens[b]` is where sequence b starts). C is the CP size, r a rank, S the shard size.

round_robin (alias "interleave"):  T is padded up to a multiple of C and global token t goes to
    rank t % C, so row i of rank r is token r + i*C (or -1 past T). Shards are equal.
in_seq (alias "zigzag"):  every sequence is cut into 2C blocks, block i of length
    L // 2C + (i < L % 2C); rank r owns blocks r and 2C-1-r of each sequence, in batch order,
    block r first. Pairing an early with a late block balances the causal work. Shards differ.

A gather pads every rank to S = max rows, concatenates in rank order (`gathered[r*S + i]` is row
i of rank r), and `gathered[restore_index]` puts the T real tokens back in global order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

MODE_ALIASES = {
    "round_robin": "round_robin",
    "interleave": "round_robin",
    "in_seq": "in_seq",
    "zigzag": "in_seq",
}
PAD = -1  # token index of a padding row


def canonical_mode(mode: str) -> str:
    """'interleave' -> 'round_robin', 'zigzag' -> 'in_seq'; anything unknown is a ValueError."""
    try:
        return MODE_ALIASES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"unknown CP split mode {mode!r}; expected one of {sorted(MODE_ALIASES)}") from None


def validate_seq_lens(seq_lens: Sequence[int]) -> tuple[int, ...]:
    """A non-empty batch of positive int lengths, else a ValueError naming the bad value."""
    if isinstance(seq_lens, (str, bytes)) or not isinstance(seq_lens, Sequence):
        raise ValueError(f"seq_lens must be a list of ints, got {seq_lens!r}")
    if len(seq_lens) == 0:
        raise ValueError("seq_lens is empty: a prefill batch needs at least one sequence")
    out = []
    for b, L in enumerate(seq_lens):
        if isinstance(L, bool) or not isinstance(L, int):
            raise ValueError(f"seq_lens[{b}] = {L!r} is not an int")
        if L <= 0:
            raise ValueError(f"seq_lens[{b}] = {L} must be >= 1")
        out.append(int(L))
    return tuple(out)


def in_seq_block_sizes(length: int, cp_size: int) -> list[int]:
    """Sizes of the 2C blocks one sequence is cut into: remainders go to the first blocks."""
    base, rem = divmod(length, 2 * cp_size)
    return [base + (i < rem) for i in range(2 * cp_size)]


def _round_robin_rows(num_tokens: int, cp_size: int) -> list[torch.Tensor]:
    shard = -(-num_tokens // cp_size)
    rows = []
    for r in range(cp_size):
        idx = r + torch.arange(shard, dtype=torch.long) * cp_size
        rows.append(torch.where(idx < num_tokens, idx, PAD))
    return rows


def _in_seq_rows(seq_lens: tuple[int, ...], cp_size: int) -> list[torch.Tensor]:
    pieces: list[list[torch.Tensor]] = [[] for _ in range(cp_size)]
    start = 0
    for L in seq_lens:
        sizes = in_seq_block_sizes(L, cp_size)
        offsets = [start]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        for r in range(cp_size):
            for blk in (r, 2 * cp_size - 1 - r):
                pieces[r].append(torch.arange(offsets[blk], offsets[blk + 1], dtype=torch.long))
        start += L
    return [torch.cat(p) for p in pieces]


@dataclass(frozen=True, eq=False)
class SplitPlan:
    """The rows every rank computes for one batch. Build it with `plan_split`."""

    seq_lens: tuple[int, ...]
    """Length of every sequence, in batch order."""
    cp_size: int
    """C, the number of ranks in the CP group."""
    mode: str
    """'round_robin' or 'in_seq' (canonical names)."""

    @cached_property
    def _rows(self) -> list[torch.Tensor]:
        if self.mode == "round_robin":
            return _round_robin_rows(self.num_tokens, self.cp_size)
        return _in_seq_rows(self.seq_lens, self.cp_size)

    @property
    def num_tokens(self) -> int:
        """T, real tokens in the batch."""
        return sum(self.seq_lens)

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """[B + 1] start of every sequence in global token order, then T."""
        return torch.tensor([0, *self.seq_lens], dtype=torch.long).cumsum(0)

    @cached_property
    def shard_size(self) -> int:
        """S, the most rows on any rank; gathers pad every rank to it."""
        return max(len(t) for t in self._rows)

    def _check_rank(self, r: int) -> None:
        if not 0 <= r < self.cp_size:
            raise ValueError(f"rank {r} is outside the CP group of size {self.cp_size}")

    def num_rows(self, r: int) -> int:
        """Rows rank r computes, padding rows included (round_robin pads, in_seq never does)."""
        self._check_rank(r)
        return len(self._rows[r])

    def token_index(self, r: int) -> torch.Tensor:
        """[n_r] global token of each of rank r's rows, in local order; -1 marks padding."""
        self._check_rank(r)
        return self._rows[r].clone()

    def seq_ids(self, r: int) -> torch.Tensor:
        """[n_r] sequence index of each row; -1 for padding."""
        tok = self.token_index(r)
        seq = torch.searchsorted(self.cu_seqlens[1:], tok, right=True)
        return torch.where(tok >= 0, seq, PAD)

    def positions(self, r: int) -> torch.Tensor:
        """[n_r] position of each row inside its own sequence; 0 for padding."""
        tok, seq = self.token_index(r), self.seq_ids(r)
        pos = tok - self.cu_seqlens[seq.clamp(min=0)]
        return torch.where(tok >= 0, pos, 0)

    def key_range(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[n_r] each, the causal keys [ks, ke) of each row in the global (gathered) order.

        ks = start of the row's sequence, ke = ks + position + 1; padding rows get an empty range.
        """
        tok, seq = self.token_index(r), self.seq_ids(r)
        ks = torch.where(tok >= 0, self.cu_seqlens[seq.clamp(min=0)], 0)
        ke = torch.where(tok >= 0, tok + 1, 0)
        return ks, ke

    @cached_property
    def gathered_token_index(self) -> torch.Tensor:
        """[C * S] global token of every row of the padded rank-major gather buffer; -1 for pads."""
        out = torch.full((self.cp_size, self.shard_size), PAD, dtype=torch.long)
        for r, rows in enumerate(self._rows):
            out[r, : len(rows)] = rows
        return out.flatten()

    @cached_property
    def restore_index(self) -> torch.Tensor:
        """[T] rows of the gather buffer in global token order: `gathered[restore_index]`."""
        flat = self.gathered_token_index
        slot = torch.arange(flat.numel(), dtype=torch.long)
        real = flat >= 0
        restore = torch.full((self.num_tokens,), PAD, dtype=torch.long)
        restore[flat[real]] = slot[real]
        return restore

    def restore_index_on(self, device: torch.device | str) -> torch.Tensor:
        """`restore_index` on a device, copied there once per plan (gathers run every layer)."""
        device = torch.device(device)
        cache = self.__dict__.setdefault("_restore_on", {})
        if device not in cache:
            cache[device] = self.restore_index.to(device)
        return cache[device]

    def causal_work(self) -> list[int]:
        """Per rank, the causal attention work sum(position + 1) over its real rows."""
        work = []
        for r in range(self.cp_size):
            pos = self.positions(r)[self.token_index(r) >= 0]
            work.append(int((pos + 1).sum()))
        return work


def plan_split(seq_lens: Sequence[int], cp_size: int, mode: str) -> SplitPlan:
    """The split of a batch of sequences with lengths `seq_lens` over `cp_size` ranks.

    mode: 'round_robin' (alias 'interleave') or 'in_seq' (alias 'zigzag').
    Raises ValueError, naming the bad value, for cp_size < 1, an unknown mode, an empty batch
    or a length <= 0.
    """
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be an int >= 1, got {cp_size!r}")
    mode = canonical_mode(mode)
    return SplitPlan(validate_seq_lens(seq_lens), cp_size, mode)
