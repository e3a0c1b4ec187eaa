"""Sparse MLA timings at V3.2 shapes: torch reference, Triton (bf16 and FP8 KV), FlashMLA when importable."""

from __future__ import annotations

import torch

from cp_attn.bench.common import bench_ms
from cp_attn.bench.inputs import causal_topk
from cp_attn.ops import naive
from cp_attn.ops.kv_fp8 import pack_mla_kv

V32 = dict(H=128, kv_lora=512, rope=64, K=2048)


def make_inputs(n: int, T: int, H: int = 128, kv_lora: int = 512, rope: int = 64, K: int = 2048, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn((n, H, kv_lora + rope), device="cuda", generator=g).bfloat16()
    kv = torch.randn((T, kv_lora + rope), device="cuda", generator=g).bfloat16()
    idx = causal_topk(n, T, K, seed=seed)
    return q, kv, idx


def backends() -> dict:
    """name -> fn(q, kv, idx, scale, d_v); kv is packed to FP8 first for the *_fp8 names."""
    out = {"torch": naive.sparse_mla}
    from cp_attn.ops import sparse_mla_triton

    out["triton"] = sparse_mla_triton.sparse_mla
    out["triton_fp8"] = sparse_mla_triton.sparse_mla
    try:
        from cp_attn.ops import flashmla

        flashmla.load()
        out["flashmla"] = flashmla.sparse_mla
    except (ImportError, ValueError):
        pass
    return out


def run(sizes, names=None, peak_bf16: float | None = None, check: bool = True, rep: int = 100) -> list[dict]:
    """One record per (backend, n, T): ms, useful TFLOP/s (valid indices only), error vs torch."""
    records = []
    fns = backends()
    names = names or list(fns)
    scale = (192**-0.5)
    for n, T in sizes:
        q, kv, idx = make_inputs(n, T)
        valid = int((idx >= 0).sum())
        flop = 2.0 * valid * V32["H"] * (V32["kv_lora"] + V32["rope"] + V32["kv_lora"])
        kv8 = pack_mla_kv(kv, V32["kv_lora"])
        ref = None
        if check:  # the torch op on a slice of rows (the full n is slow in torch)
            rows = slice(n - 256, n)
            ref = naive.sparse_mla(q[rows], kv, idx[rows], scale, V32["kv_lora"])[0].float()
            ref8 = naive.sparse_mla(q[rows], kv8, idx[rows], scale, V32["kv_lora"])[0].float()
        for name in names:
            if name not in fns:
                continue
            fn = fns[name]
            src = kv8 if name.endswith("_fp8") else kv
            ms = bench_ms(lambda: fn(q, src, idx, scale, V32["kv_lora"]), rep=rep if name != "torch" else 20)
            rec = dict(op="sparse_mla", backend=name, n=n, keys=T, K=V32["K"], H=V32["H"], ms=ms,
                       tflops=flop / ms / 1e9, peak_tflops=peak_bf16)
            if check:
                out = fn(q[rows], src, idx[rows], scale, V32["kv_lora"])[0].float()
                want = ref8 if name.endswith("_fp8") else ref
                rec["rel_l2_vs_torch"] = float((out - want).norm() / want.norm())
            records.append(rec)
            print(rec, flush=True)
        del q, kv, idx, kv8
        torch.cuda.empty_cache()
    return records


def tune(n: int, T: int, configs: list[dict]) -> list[dict]:
    """Time the Triton kernel under each launch config (block sizes, warps, stages)."""
    from cp_attn.ops import sparse_mla_triton

    q, kv, idx = make_inputs(n, T)
    valid = int((idx >= 0).sum())
    flop = 2.0 * valid * 128 * (576 + 512)
    ref = naive.sparse_mla(q[-64:], kv, idx[-64:], 192**-0.5, 512)[0].float()
    out = []
    for cfg in configs:
        try:
            got = sparse_mla_triton.sparse_mla(q[-64:], kv, idx[-64:], 192**-0.5, 512, config=cfg)[0].float()
            err = float((got - ref).norm() / ref.norm())
            ms = bench_ms(lambda: sparse_mla_triton.sparse_mla(q, kv, idx, 192**-0.5, 512, config=cfg))
            rec = dict(config=cfg, ms=ms, tflops=flop / ms / 1e9, rel_l2=err)
        except Exception as e:  # a config that does not compile (smem, registers) is a result too
            rec = dict(config=cfg, error=f"{type(e).__name__}: {str(e)[:200]}")
        print(rec, flush=True)
        out.append(rec)
    return out


TUNE_CONFIGS = [
    dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=1),
    dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=3),
    dict(BLOCK_H=64, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_H=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_H=64, BLOCK_N=128, num_warps=8, num_stages=1),
    dict(BLOCK_H=128, BLOCK_N=32, num_warps=8, num_stages=2),
]
