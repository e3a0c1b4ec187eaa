"""Lightning-indexer logits in Triton, bf16 (fp16, fp32) and FP8, beside `naive.indexer_logits`.

out[i, j] = sum_h weights[i, h] * relu(q[i, h] . k[j])  (times k_scale[j] in the FP8 form)
for ks[i] <= j < ke[i], -inf elsewhere; q [n, H, D], k [T, D] (FP8: (e4m3 [T, D], fp32 scale [T])),
weights [n, H] fp32 -> [n, T] fp32.

Tiling (DeepGEMM's, DESIGN.md section 4): keys are the dot's M dimension and (query row x head) its N
dimension, so one `tl.dot` of a key block [BLOCK_N, D] with the query block's [BLOCK_QH, D]^T scores
all heads of BLOCK_QH / H query rows at once. ReLU, the head weight and the head sum (a reshape of
the accumulator to [BLOCK_N, rows, H] and a sum over H) stay in registers; the key scale (FP8) is
applied after the head sum, once per (key, row): relu(x) * s = relu(x * s) for s > 0. The query
block and its weights are loaded once and stay resident while the program streams key blocks.

Each program owns BLOCK_QH / H consecutive query rows and computes only the key blocks inside the
rows' [min ks, max ke); it writes -inf itself over the rest of its rows (that costs one fp32 store
per element, the least any full [n, T] output can cost, and no pre-filled buffer is read or written
twice). Inside computed blocks every row's own range is applied. Programs start from the last row
block: in a causal batch those rows have the longest ranges, which evens out the tail.

Head counts that are not powers of two are padded (zero queries, zero weights); D is padded to a
power of two >= 32 (fp8 wgmma needs K >= 32).

A logit is computed the same way whatever rows share its program and however the keys are split
(test_gpu_logits_independent_of_row_grouping checks it bit for bit), so for one config the result
does not depend on the CP layout. bf16/fp16/FP8
launches autotune among CONFIGS per (H, D, FP8 or not, size bucket), so two ranks may differ in the
last bits; fp32 inputs always use CONFIGS[0] with IEEE fp32 dots (no TF32): slow, but the same
numbers on every rank, which the fp32 equality tests of a CP run need.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn

# (keys per block, query-row x head columns per block, warps, pipeline stages). The first is the
# default off CUDA and for fp32; the autotuner picks among all of them on a GPU. Four-warp programs
# of ~160 registers let 2-3 programs share an SM, so one's ReLU/head-sum epilogue overlaps another's
# MMAs (Triton waits on each wgmma right away; there is no overlap inside one program).
CONFIGS = (
    dict(BLOCK_N=64, BLOCK_QH=128, num_warps=4, num_stages=4),
    dict(BLOCK_N=64, BLOCK_QH=128, num_warps=4, num_stages=2),   # bf16: 3 programs per SM fit
    dict(BLOCK_N=128, BLOCK_QH=128, num_warps=4, num_stages=4),
    dict(BLOCK_N=64, BLOCK_QH=256, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_QH=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_QH=256, num_warps=8, num_stages=3),
)
FILL = 512
"""Columns per -inf store outside the computed key blocks."""
PROGRAMS_PER_SM = 16
"""Default grid size target: enough programs that the last wave and uneven rows cost little."""
MIN_SPLIT_BLOCKS = 16
"""A split of a row block's keys covers at least this many key blocks of a full row."""


@triton.jit
def _indexer_kernel(
    q_ptr, sq_n, sq_h, sq_d,
    k_ptr, sk_t, sk_d, kscale_ptr,
    w_ptr, sw_n, sw_h,
    ks_ptr, ke_ptr,
    out_ptr, so_n,
    n, T, H,
    N_LOG2, T_LOG2,  # autotune keys only
    D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_QH: tl.constexpr, FILL_N: tl.constexpr,
):
    # grid: (row blocks, splits); split `sp` of a row block takes one contiguous share of its
    # computed key blocks and one share of its -inf columns.
    ROWS: tl.constexpr = BLOCK_QH // H_PAD
    q0 = (tl.cdiv(n, ROWS) - 1 - tl.program_id(0)) * ROWS  # last row block first
    sp, splits = tl.program_id(1), tl.num_programs(1)
    rows = q0 + tl.arange(0, ROWS)
    row_ok = rows < n
    ks = tl.maximum(tl.load(ks_ptr + rows, mask=row_ok, other=0).to(tl.int32), 0)
    ke = tl.minimum(tl.load(ke_ptr + rows, mask=row_ok, other=0).to(tl.int32), T)
    live = row_ok & (ke > ks)
    lo = tl.min(tl.where(live, ks, T), 0)
    hi = tl.max(tl.where(live, ke, 0), 0)
    start = (lo // BLOCK_N) * BLOCK_N
    end = tl.maximum(start + tl.cdiv(hi - start, BLOCK_N) * BLOCK_N, start)  # computed: [start, end)
    share = tl.cdiv((end - start) // BLOCK_N, splits) * BLOCK_N
    c_lo = start + sp * share
    c_hi = tl.minimum(c_lo + share, end)
    out_rows = out_ptr + rows.to(tl.int64) * so_n

    # Query block, column c = (row c // H_PAD, head c % H_PAD); padded heads/dims load as zero.
    c = tl.arange(0, BLOCK_QH)
    c_row, c_head = q0 + c // H_PAD, c % H_PAD
    c_ok = (c_row < n) & (c_head < H)
    d = tl.arange(0, BLOCK_D)
    q_tile = tl.load(q_ptr + c_row.to(tl.int64)[:, None] * sq_n + c_head[:, None] * sq_h + d[None, :] * sq_d,
                     mask=c_ok[:, None] & (d[None, :] < D), other=0.0)                    # [QH, D]
    w = tl.load(w_ptr + c_row.to(tl.int64) * sw_n + c_head * sw_h, mask=c_ok, other=0.0)  # [QH]
    q_t = tl.trans(q_tile)                                                                  # [D, QH]

    jn = tl.arange(0, BLOCK_N)
    for j0 in range(c_lo, c_hi, BLOCK_N):
        j = j0 + jn
        k_tile = tl.load(k_ptr + j[:, None] * sk_t + d[None, :] * sk_d,
                         mask=(j[:, None] < T) & (d[None, :] < D), other=0.0)              # [N, D]
        if IEEE:
            s = tl.dot(k_tile, q_t, input_precision="ieee")
        else:
            s = tl.dot(k_tile, q_t)                                                        # [N, QH] fp32
        s = tl.maximum(s, 0.0) * w[None, :]
        logit = tl.sum(tl.reshape(s, (BLOCK_N, ROWS, H_PAD)), axis=2)                      # [N, ROWS]
        if HAS_SCALE:
            logit = logit * tl.load(kscale_ptr + j, mask=j < T, other=0.0)[:, None]
        inr = (j[:, None] >= ks[None, :]) & (j[:, None] < ke[None, :])
        tl.store(out_rows[None, :] + j[:, None], tl.where(inr, logit, float("-inf")),
                 mask=row_ok[None, :] & (j[:, None] < T))

    # -inf over [0, start) and [end, T), seen as one run v in [0, fill) with the gap cut out.
    fill = start + tl.maximum(T - end, 0)
    f_share = tl.cdiv(tl.cdiv(fill, FILL_N), splits) * FILL_N
    f_lo = sp * f_share
    f_hi = tl.minimum(f_lo + f_share, fill)
    f = tl.arange(0, FILL_N)
    neg = tl.full((ROWS, FILL_N), float("-inf"), tl.float32)
    for v0 in range(f_lo, f_hi, FILL_N):
        v = v0 + f
        jf = tl.where(v < start, v, v + (end - start))
        tl.store(out_rows[:, None] + jf[None, :], neg, mask=row_ok[:, None] & (v[None, :] < f_hi))


_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_QH": c["BLOCK_QH"]},
                           num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in CONFIGS],
    key=["H_PAD", "BLOCK_D", "HAS_SCALE", "N_LOG2", "T_LOG2"],
    prune_configs_by={"early_config_prune": lambda configs, named_args, **meta: [
        c for c in configs if c.kwargs["BLOCK_QH"] >= meta["H_PAD"]]},
)(_indexer_kernel)


def _check(q: torch.Tensor, k, weights: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor):
    """-> (k values, k scale or None) after checking shapes and dtypes against the contract."""
    fp8 = isinstance(k, (tuple, list))
    kv, kscale = (k[0], k[1]) if fp8 else (k, None)
    if q.dim() != 3 or kv.dim() != 2 or q.shape[-1] != kv.shape[-1]:
        raise ValueError(f"need q [n, H, D] and k [T, D], got {tuple(q.shape)} and {tuple(kv.shape)}")
    n, H, D = q.shape
    if weights.shape != (n, H) or ks.shape != (n,) or ke.shape != (n,):
        raise ValueError(f"need weights [{n}, {H}] and ks/ke [{n}], got {tuple(weights.shape)}, "
                         f"{tuple(ks.shape)}, {tuple(ke.shape)}")
    if fp8:
        if q.dtype != FP8 or kv.dtype != FP8 or kscale.shape != (kv.shape[0],):
            raise ValueError(f"FP8 form needs q and k e4m3 and a k scale [T]; got q {q.dtype}, "
                             f"k {kv.dtype}, scale {tuple(kscale.shape)}")
    elif q.dtype != kv.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q and k must share a 16/32-bit float dtype (or use the FP8 form), got "
                         f"{q.dtype} and {kv.dtype}")
    if D > 256 or H > max(c["BLOCK_QH"] for c in CONFIGS):
        raise ValueError(f"H={H}, D={D}: this kernel takes H <= 256 and D <= 256")
    return kv, (kscale.float().contiguous() if fp8 else None)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small count
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grid(n: int, T: int, h_pad: int, block_n: int, block_qh: int, device: torch.device,
          splits: int | None) -> tuple[int, int]:
    """(row blocks, splits). By default each row block's keys are split over programs until the
    grid holds PROGRAMS_PER_SM programs per SM, so wave quantisation and uneven ranges (a mixed
    batch) cost little, while every split keeps >= MIN_SPLIT_BLOCKS key blocks of a full row."""
    row_blocks = triton.cdiv(n, block_qh // h_pad)
    if splits is None:
        want = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), row_blocks)
        splits = max(1, min(want, T // (MIN_SPLIT_BLOCKS * block_n)))
    return row_blocks, splits


def indexer_logits(q: torch.Tensor, k, weights: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor,
                   config: dict | None = None, splits: int | None = None) -> torch.Tensor:
    """Indexer scores [n, T] fp32 (see the module docstring and `naive.indexer_logits`).

    `config` pins one entry of CONFIGS instead of autotuning; fp32 inputs, and runs off CUDA
    (TRITON_INTERPRET=1: autotuning times on the GPU), default to CONFIGS[0]. `splits` pins how many
    programs share a row block's keys (default: see `_grid`).
    """
    kv, kscale = _check(q, k, weights, ks, ke)
    n, H, D = q.shape
    T = kv.shape[0]
    out = torch.empty((n, T), dtype=torch.float32, device=q.device)
    if n == 0 or T == 0:
        return out
    weights = weights.float()
    h_pad = triton.next_power_of_2(H)
    args = (q, *q.stride(), kv, *kv.stride(), kscale if kscale is not None else weights,
            weights, *weights.stride(), ks, ke, out, out.stride(0),
            n, T, H, n.bit_length(), T.bit_length())
    # D is a constant of the kernel: a runtime bound on the contiguous dim would stop the loads
    # from vectorising, and with them the cp.async pipelining of the key blocks.
    meta = dict(D=D, H_PAD=h_pad, BLOCK_D=max(32, triton.next_power_of_2(D)), HAS_SCALE=kscale is not None,
                IEEE=q.dtype == torch.float32, FILL_N=FILL)
    if config is None and (q.device.type != "cuda" or q.dtype == torch.float32):
        config = CONFIGS[0]
    if config is None:
        _tuned[lambda m: _grid(n, T, h_pad, m["BLOCK_N"], m["BLOCK_QH"], q.device, splits)](*args, **meta)
    else:
        if config["BLOCK_QH"] < h_pad:
            raise ValueError(f"config {config} has fewer columns than the {h_pad} (padded) heads")
        grid = _grid(n, T, h_pad, config["BLOCK_N"], config["BLOCK_QH"], q.device, splits)
        _indexer_kernel[grid](*args, **meta, **config)
    return out
