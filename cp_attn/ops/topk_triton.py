"""Exact top-k of indexer logits in Triton: a radix select per row, then one ordered emit pass.

Same contract as `cp_attn.ops.naive.topk_indices`: the min(K, ke - ks) best keys of each row inside
[ks, ke), ascending key order, -1 padding, ties at the cut to the LOWER key index, so it equals the
torch op exactly, also on rows full of ties.

One program per row:
1. Rows with ke - ks <= K emit ks .. ke-1 and -1 padding; nothing is read.
2. Otherwise every score becomes an order-preserving uint32 key (sign flip for positives, bitwise
   not for negatives; -0.0 is first made +0.0, since torch compares them equal). Four passes over
   [ks, ke) build 256-bin histograms (`tl.histogram`) of one byte of the key, most significant
   first, among the keys that match the bytes chosen so far; each pass picks the byte of the K-th
   largest key. A pass stops the search early when the chosen bin holds exactly the keys still
   needed (all of them are taken).
3. One pass over [ks, ke) in index order emits every key above the threshold and the first `need`
   keys equal to it. A single int32 cumsum of (above << 16 | equal) per chunk gives each emitted
   key its output slot, so the output is in ascending key order without a sort.

Cost: at most 5 reads of the row's in-range scores (the first from HBM, the rest mostly from L2),
~15 integer ops per score per pass; no sort, no extra memory. Passes read chunks of BLOCK scores
starting at a 16-aligned address so loads vectorise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cp_attn.ops.naive import INVALID

NUM_BINS = 256
"""One byte of the key per radix pass."""


@triton.jit
def _order_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (-0.0 and +0.0 map to one key)."""
    u = x.to(tl.uint32, bitcast=True)
    u = tl.where(u == 0x80000000, 0, u)
    return tl.where((u >> 31) != 0, u ^ 0xFFFFFFFF, u | 0x80000000)


@triton.jit
def _topk_kernel(
    logits_ptr, stride_row, ks_ptr, ke_ptr, out_ptr, stride_out, T, K,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    ks = tl.maximum(tl.load(ks_ptr + row).to(tl.int32), 0)
    ke = tl.minimum(tl.load(ke_ptr + row).to(tl.int32), T)
    length = tl.maximum(ke - ks, 0)
    out_row = out_ptr + row.to(tl.int64) * stride_out
    offs = tl.arange(0, BLOCK)

    if length <= K:  # every key of the range is selected
        for s in range(0, K, BLOCK):
            slot = s + offs
            tl.store(out_row + slot, tl.where(slot < length, ks + slot, -1), mask=slot < K)
    else:
        src = logits_ptr + row.to(tl.int64) * stride_row
        base = (ks // 16) * 16  # aligned chunk starts: vector loads
        bins = tl.arange(0, 256)

        # Radix select of the K-th largest key, one byte per pass.
        prefix = tl.zeros((), tl.uint32)   # bytes chosen so far
        need = K                           # keys still to take at or below the prefix
        shift = 24
        done = 0
        while (shift >= 0) & (done == 0):
            hist = tl.zeros((256,), tl.int32)
            for s in range(base, ke, BLOCK):
                j = s + offs
                inr = (j >= ks) & (j < ke)
                key = _order_key(tl.load(src + j, mask=inr, other=0.0))
                match = inr & (((key >> shift) >> 8) == prefix)
                digit = ((key >> shift) & 0xFF).to(tl.int32)
                hist += tl.histogram(digit, 256, mask=match)
            at_or_above = tl.cumsum(hist, 0, reverse=True)            # keys with digit >= bin
            b = tl.max(tl.where(at_or_above >= need, bins, -1), 0)    # the K-th largest's digit
            in_b = tl.sum(tl.where(bins == b, hist, 0), 0)
            above = tl.sum(tl.where(bins == b, at_or_above, 0), 0) - in_b
            need = need - above
            prefix = (prefix << 8) | b.to(tl.uint32)
            done = (in_b == need).to(tl.int32)
            shift -= 8
        shift += 8  # the level the prefix was decided at

        # Emit in index order: keys above the threshold, and the first `need` keys at it.
        taken = 0
        ties_left = need
        s = base
        while (s < ke) & (taken < K):
            j = s + offs
            inr = (j >= ks) & (j < ke)
            kp = _order_key(tl.load(src + j, mask=inr, other=0.0)) >> shift
            gt = (inr & (kp > prefix)).to(tl.int32)
            eq = (inr & (kp == prefix)).to(tl.int32)
            packed = gt * 65536 + eq                       # BLOCK < 65536: the halves never carry
            before = tl.cumsum(packed, 0) - packed          # exclusive counts
            gt_before, eq_before = before >> 16, before & 0xFFFF
            take = (gt != 0) | ((eq != 0) & (eq_before < ties_left))
            slot = taken + gt_before + tl.minimum(eq_before, ties_left)
            tl.store(out_row + slot, j, mask=take)
            total = tl.sum(packed, 0)
            eq_taken = tl.minimum(total & 0xFFFF, ties_left)
            taken += (total >> 16) + eq_taken
            ties_left -= eq_taken
            s += BLOCK


MAX_BLOCK = 4096
"""Scores per chunk: 16 a thread at 8 warps; the emit pass's packed cumsum needs < 65536."""


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int,
                 block: int | None = None) -> torch.Tensor:
    """The `topk` best keys of each row inside [ks, ke): [n, topk] int32, ascending, -1 padded;
    ties at the cut go to the lower key index (see cp_attn.ops.naive.topk_indices).

    logits [n, T] fp32 (rows may be strided: a view into a wider buffer works), ks/ke [n] int.
    `block`: scores per chunk (a power of two, 16 .. 4096); default: the rows' length, at most 4096.
    """
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be [n, T] float32, got {tuple(logits.shape)} {logits.dtype}")
    n, T = logits.shape
    if ks.shape != (n,) or ke.shape != (n,):
        raise ValueError(f"ks/ke must be [{n}], got {tuple(ks.shape)} and {tuple(ke.shape)}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    out = torch.empty((n, topk), dtype=torch.int32, device=logits.device)
    if n == 0 or topk == 0:
        return out.fill_(INVALID)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if block is None:
        block = min(MAX_BLOCK, max(128, triton.next_power_of_2(T)))
    if block & (block - 1) or not 16 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be a power of two in [16, {MAX_BLOCK}], got {block}")
    warps = max(1, min(8, block // 512))
    _topk_kernel[(n,)](logits, logits.stride(0), ks, ke, out, out.stride(0), T, topk,
                       BLOCK=block, num_warps=warps)
    return out
