"""Exact top-k of indexer logits in Triton: one program per row finds the threshold key, then one
ordered pass writes the selected indices.

Same contract as `cp_attn.ops.naive.topk_indices`: the min(K, ke - ks) best keys of each row inside
[ks, ke), ascending key order, -1 padding, ties at the cut to the LOWER key index, so it equals the
torch op exactly, also on rows full of ties.

Scores become order-preserving uint32 keys (x + 0.0 makes -0.0 into +0.0, which torch compares
equal; then negatives flip every bit, positives the sign bit). Per row, L = ke - ks:

* L <= K: write ks .. ke-1 and -1 padding; nothing is read.
* Sampled bracket (L >= 4 S): sort S = 1024 scores read in runs of 16 spread over the row; its keys
  at sample ranks K S / L + (-4s-2, -s, +s, +4s+2) (s: the binomial standard deviation of that
  rank) are four thresholds. One pass counts the keys at or above each; the two thresholds around
  the K-th largest key bracket a few hundred keys, which a second pass copies to a scratch row.
  A radix select over that copy gives the exact K-th largest key.
* Radix select (shorter rows, or a bracket over CAP keys, e.g. long runs of ties): four passes over
  the row build 256-bin histograms (`tl.histogram`) of one key byte, most significant first, among
  the keys matching the bytes chosen so far (stopping early once a bin holds exactly the keys
  still needed).
* Output: one pass in index order writes every key at or above the threshold when all keys equal
  to it are taken (the usual case); otherwise the keys above it and the first `ties` equal to it,
  counted with one cumsum of (above << 16 | equal). Slots come from a cumsum over the chunk (per
  thread's run of 4, then across runs), so the indices come out ascending without a sort.

Why the sample: compiled for sm_90, one 256-bin `tl.histogram` pass costs ~70 instructions per
score (ballots, popcounts), a pass counting against four thresholds ~23, a compaction pass ~30.
A long row costs ~85 per score plus ~0.5M per row (sort, bracket select) on the sampled path,
against ~310 for four histogram passes and the output pass. Any sample gives the exact answer; a
poor one only sends the row to the radix select.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cp_attn.ops.naive import INVALID

MAX_BLOCK = 4096
"""Scores per chunk of a full-row pass (the packed cumsum of the tie pass needs < 65536)."""
SAMPLE = 1024
"""Sampled scores per row (a power of two >= 32, read in runs of 16)."""
SAMPLE_MIN_ROWS = 4
"""Rows shorter than SAMPLE_MIN_ROWS * SAMPLE skip sampling: the sort would cost more than it saves."""
CAP = 4096
"""Most keys a bracket may hold to be copied to scratch; more go to the radix select."""
SELECT_BLOCK = 512
"""Chunk of the radix select over the scratch copy."""


@triton.jit
def _order_key(x):
    """fp32 -> uint32 whose unsigned order is the float order. x + 0.0 turns -0.0 into +0.0 (torch
    compares them equal); then negatives flip every bit and positives only the sign bit."""
    i = (x + 0.0).to(tl.int32, bitcast=True)
    return (i ^ ((i >> 31) | -2147483648)).to(tl.uint32, bitcast=True)


@triton.jit
def _radix_select(src, lo, hi, limit, need, EARLY: tl.constexpr, BLOCK: tl.constexpr):
    """The `need`-th largest key of src[lo:hi] (fp32 scores, need >= 1) as (prefix, shift, ties,
    all_eq): keys with key >> shift > prefix are above it, `ties` keys with key >> shift == prefix
    are still to take, and all_eq says that is all of them. EARLY stops once a byte's bin holds
    exactly the keys still needed (shift may then be > 0); without it the prefix is the whole key
    (shift = 0). src[:limit] is readable."""
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    base = (lo // 16) * 16                   # aligned chunk starts
    prefix = tl.zeros((), tl.uint32)         # bytes chosen so far
    shift = 24
    done = 0
    all_eq = 0
    while (shift >= 0) & (done == 0):
        hist = tl.zeros((256,), tl.int32)
        for s in range(base, hi, BLOCK):
            j = s + offs
            inr = (j >= lo) & (j < hi)
            key = _order_key(tl.load(src + j, mask=j < limit, other=0.0))
            match = inr & (((key >> shift) >> 8) == prefix)
            hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=match)
        at_or_above = tl.cumsum(hist, 0, reverse=True)            # keys with digit >= bin
        b = tl.max(tl.where(at_or_above >= need, bins, -1), 0)    # the need-th largest's digit
        in_b = tl.sum(tl.where(bins == b, hist, 0), 0)
        need -= tl.sum(tl.where(bins == b, at_or_above, 0), 0) - in_b
        prefix = (prefix << 8) | b.to(tl.uint32)
        all_eq = (in_b == need).to(tl.int32)
        if EARLY:
            done = all_eq
        shift -= 8
    return prefix, shift + 8, need, all_eq


@triton.jit
def _pick(v, i):
    """v[i] of a small 1-D tensor (0 where i is out of range)."""
    return tl.sum(tl.where(tl.arange(0, v.shape[0]) == i, v, 0), 0)


@triton.jit
def _sample_thresholds(src, ks, L, K, S: tl.constexpr):
    """[4] keys, descending, of a sorted sample of S scores of src[ks:ks+L], at sample ranks
    K S / L + (-4s-2, -s, +s, +4s+2), s the binomial standard deviation of that rank."""
    RUNS: tl.constexpr = S // 16
    start = ks + (tl.arange(0, RUNS) * (L - 16)) // (RUNS - 1)
    pos = tl.reshape(start[:, None] + tl.arange(0, 16)[None, :], (S,))
    keys = tl.sort(_order_key(tl.load(src + pos)), descending=True)
    rank = K.to(tl.float32) * S / L.to(tl.float32)
    sd = tl.sqrt(rank * (1.0 - rank / S))
    i = tl.arange(0, 4)
    at = rank + tl.where(i % 3 == 0, 4.0 * sd + 2.0, sd) * tl.where(i < 2, -1.0, 1.0)
    return tl.gather(keys, tl.minimum(tl.maximum(at, 0.0), S - 1.0).to(tl.int32), 0)


@triton.jit
def _count_at_or_above(src, ks, ke, T, t0, t1, t2, t3, BLOCK: tl.constexpr):
    """[4] int32: keys of src[ks:ke] at or above each threshold."""
    offs = tl.arange(0, BLOCK)
    c0 = tl.zeros((BLOCK,), tl.int32)
    c1 = tl.zeros((BLOCK,), tl.int32)
    c2 = tl.zeros((BLOCK,), tl.int32)
    c3 = tl.zeros((BLOCK,), tl.int32)
    for s in range((ks // 16) * 16, ke, BLOCK):
        j = s + offs
        inr = (j >= ks) & (j < ke)
        key = _order_key(tl.load(src + j, mask=j < T, other=0.0))
        c0 += (inr & (key >= t0)).to(tl.int32)
        c1 += (inr & (key >= t1)).to(tl.int32)
        c2 += (inr & (key >= t2)).to(tl.int32)
        c3 += (inr & (key >= t3)).to(tl.int32)
    i = tl.arange(0, 4)
    return tl.where(i == 0, tl.sum(c0, 0), tl.where(i == 1, tl.sum(c1, 0),
                    tl.where(i == 2, tl.sum(c2, 0), tl.sum(c3, 0))))


@triton.jit
def _compact(src, ks, ke, T, lo_key, hi_key, has_hi, dst, most, VALUES: tl.constexpr, BLOCK: tl.constexpr):
    """Write to dst, in index order, the scores (VALUES) or the indices of src[ks:ke] with
    lo_key <= key (< hi_key if has_hi); stop after `most`. Chunks are [BLOCK / 4, 4]: the slot
    cumsum runs along each run of 4 (one thread's vector load), then across runs."""
    offs = tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    n = 0
    s = (ks // 16) * 16
    while (s < ke) & (n < most):
        j = s + offs
        inr = (j >= ks) & (j < ke)
        x = tl.load(src + j, mask=j < T, other=0.0)
        key = _order_key(x)
        sel = (inr & (key >= lo_key) & ((key < hi_key) | (has_hi == 0))).to(tl.int32)
        runs = tl.sum(sel, 1)
        slot = n + (tl.cumsum(runs, 0) - runs)[:, None] + tl.cumsum(sel, 1) - sel
        if VALUES:
            tl.store(dst + slot, x, mask=sel != 0)
        else:
            tl.store(dst + slot, j, mask=sel != 0)
        n += tl.sum(runs, 0)
        s += BLOCK


@triton.jit
def _emit(src, ks, ke, T, prefix, shift, ties_left, K, out_row, BLOCK: tl.constexpr):
    """Write, in index order, the keys with key >> shift above `prefix` and the first `ties_left`
    equal to it. Chunks are [BLOCK / 4, 4], as in `_compact`."""
    offs = tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    taken = 0
    s = (ks // 16) * 16
    while (s < ke) & (taken < K):
        j = s + offs
        inr = (j >= ks) & (j < ke)
        kp = _order_key(tl.load(src + j, mask=j < T, other=0.0)) >> shift
        gt = (inr & (kp > prefix)).to(tl.int32)
        eq = (inr & (kp == prefix)).to(tl.int32)
        packed = gt * 65536 + eq                       # BLOCK < 65536: the halves never carry
        runs = tl.sum(packed, 1)
        before = (tl.cumsum(runs, 0) - runs)[:, None] + tl.cumsum(packed, 1) - packed  # exclusive
        eq_before = before & 0xFFFF
        take = (gt != 0) | ((eq != 0) & (eq_before < ties_left))
        tl.store(out_row + taken + (before >> 16) + tl.minimum(eq_before, ties_left), j, mask=take)
        total = tl.sum(runs, 0)
        eq_taken = tl.minimum(total & 0xFFFF, ties_left)
        taken += (total >> 16) + eq_taken
        ties_left -= eq_taken
        s += BLOCK


@triton.jit
def _topk_kernel(
    logits_ptr, stride_row, ks_ptr, ke_ptr, out_ptr, stride_out, scratch_ptr, T, K, cap,
    BLOCK: tl.constexpr, S: tl.constexpr, SAMPLE_MIN: tl.constexpr, SEL_BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    ks = tl.maximum(tl.load(ks_ptr + row).to(tl.int32), 0)
    ke = tl.minimum(tl.load(ke_ptr + row).to(tl.int32), T)
    length = tl.maximum(ke - ks, 0)
    out_row = out_ptr + row.to(tl.int64) * stride_out
    src = logits_ptr + row.to(tl.int64) * stride_row

    if length <= K:  # every key of the range is selected
        offs = tl.arange(0, BLOCK)
        for s in range(0, K, BLOCK):
            slot = s + offs
            tl.store(out_row + slot, tl.where(slot < length, ks + slot, -1), mask=slot < K)
    else:
        prefix = tl.zeros((), tl.uint32)
        shift = tl.zeros((), tl.int32)
        ties = tl.zeros((), tl.int32)
        all_eq = tl.zeros((), tl.int32)
        radix = tl.full((), 1, tl.int32)
        if S > 0:
            if length >= SAMPLE_MIN:
                thr = _sample_thresholds(src, ks, length, K, S)                   # descending
                counts = _count_at_or_above(src, ks, ke, T, _pick(thr, 0), _pick(thr, 1), _pick(thr, 2),
                                            _pick(thr, 3), BLOCK)               # non-decreasing
                cut = tl.sum((counts < K).to(tl.int32), 0)  # first threshold with >= K keys at/above
                above = _pick(counts, cut - 1)              # keys above the bracket (0 if cut == 0)
                inside = tl.where(cut < 4, _pick(counts, cut), length) - above
                if inside <= cap:   # the bracket: [thr[cut], thr[cut - 1]) (open ends at 0 / 4)
                    dst = scratch_ptr + row.to(tl.int64) * cap
                    _compact(src, ks, ke, T, _pick(thr, cut), _pick(thr, cut - 1), (cut > 0).to(tl.int32),
                             dst, inside, True, BLOCK)
                    tl.debug_barrier()  # the copy is read back by other threads of this program
                    prefix, shift, ties, all_eq = _radix_select(dst, 0, inside, cap, K - above, False,
                                                                SEL_BLOCK)
                    radix = tl.zeros((), tl.int32)
        if radix != 0:
            prefix, shift, ties, all_eq = _radix_select(src, ks, ke, T, K, True, BLOCK)
        if all_eq != 0:   # every key at the threshold is taken: one comparison decides
            _compact(src, ks, ke, T, prefix << shift, prefix, 0, out_row, K, False, BLOCK)
        else:
            _emit(src, ks, ke, T, prefix, shift, ties, K, out_row, BLOCK)


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int,
                 block: int | None = None, sample: int | None = None, cap: int = CAP) -> torch.Tensor:
    """The `topk` best keys of each row inside [ks, ke): [n, topk] int32, ascending, -1 padded;
    ties at the cut go to the lower key index (see cp_attn.ops.naive.topk_indices).

    logits [n, T] fp32 (rows may be strided: a view into a wider buffer works), ks/ke [n] int.
    `block`: scores per chunk, a power of two in [16, 4096] (default: min(T, 2048), at least 128).
    `sample`: sampled scores per row, a power of two >= 32, or 0 for the radix select only
    (default SAMPLE). `cap`: scratch keys per row; larger brackets go to the radix select.
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
    block = min(2048, max(128, triton.next_power_of_2(T))) if block is None else block
    if block & (block - 1) or not 16 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be a power of two in [16, {MAX_BLOCK}], got {block}")
    sample = SAMPLE if sample is None else sample
    if sample and (sample & (sample - 1) or sample < 32):
        raise ValueError(f"sample must be 0 or a power of two >= 32, got {sample}")
    sampled = sample and T >= SAMPLE_MIN_ROWS * sample
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    cap = cap if sampled else 1              # scratch only where some row can be sampled
    scratch = torch.empty((n, cap), dtype=torch.float32, device=logits.device)
    _topk_kernel[(n,)](logits, logits.stride(0), ks, ke, out, out.stride(0), scratch, T, topk, cap,
                       BLOCK=block, S=sample, SAMPLE_MIN=SAMPLE_MIN_ROWS * sample,
                       SEL_BLOCK=min(block, SELECT_BLOCK), num_warps=max(1, min(8, block // 512)))
    return out
