"""Routed experts on one GPU: the per-expert loop against grouped GEMMs (cp_attn.model.moe_grouped).

    python scripts/bench_moe.py --out moe.json

Times, in bf16 at V3.2's expert shape (hidden 7168 -> moe_intermediate_size 2048):
  gemm    one grouped GEMM [rows, 7168] x [E, 7168, 2048] (torch._grouped_mm) against one torch.mm per
          expert over the same, already sorted rows ("loop": the best a loop can do, no sync);
  routed  MoE.routed_loop vs MoE.routed_grouped (sort, gate|up GEMM, SwiGLU, down GEMM, weighted
          scatter), with every expert getting exactly `rows / E` rows;
          both at 32 experts x 512 rows each and 256 experts x 64 rows each (2048 tokens, top-8);
  layer   the whole MoE layer (gate + routed + shared expert, `moe_local`) for 4096 and 16384
          tokens, top-8 by the real gate with random weights, at 32 and 256 experts.
and the bf16 matmul ceiling of the same run (an 8192^3 torch.mm). Prints a table and writes a JSON
list of records {"op", "backend", "rows", "experts", "ms", "tflops", "peak_tflops", "gpu", "torch",
"triton", "commit"}; rows = routed rows (tokens x 8) for gemm/routed, tokens for layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from cp_attn.bench.common import machine
from cp_attn.config import ModelConfig, preset
from cp_attn.flops import layer_flops
from cp_attn.model.moe import MoE, moe_local

ROOT = Path(__file__).resolve().parents[1]

TOP_K = 8
ROUTED_SHAPES = [(32, 512), (256, 64)]   # (experts, rows per expert)
LAYER_TOKENS = [4096, 16384]
LAYER_EXPERTS = [32, 256]


def moe_config(n_experts: int) -> ModelConfig:
    """V3.2's MoE layer with `n_experts` routed experts in 8 groups (top-4 groups, top-8 experts)."""
    return preset("v32", n_routed_experts=n_experts, n_group=8, topk_group=4, num_hidden_layers=2)


def random_moe(cfg: ModelConfig, device: torch.device) -> MoE:
    """A bf16 MoE with N(0, 1/fan_in) weights, allocated in bf16 from the start (256 experts are
    22.5 GB in bf16); the router's correction bias stays fp32 as in build_model."""
    with torch.device("meta"):
        moe = MoE(cfg)
    moe = moe.to(torch.bfloat16).to_empty(device=device).requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    for p in moe.parameters():
        p.normal_(0, p.shape[-1] ** -0.5, generator=g)
    moe.gate.e_score_correction_bias = 0.05 * torch.randn(cfg.n_routed_experts, device=device, generator=g)
    return moe


def balanced_routing(n_tokens: int, n_experts: int, top_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [n, k] with k distinct experts per token and exactly n k / E rows per expert (E | n k,
    k <= E), and weights [n, k] fp32 summing to 2.5 per token."""
    if (n_tokens * top_k) % n_experts or top_k > n_experts:
        raise ValueError(f"{n_tokens} tokens x top-{top_k} cannot give every one of {n_experts} experts equal rows")
    idx = torch.arange(n_tokens * top_k, device=device).view(n_tokens, top_k) % n_experts
    w = torch.full((n_tokens, top_k), 2.5 / top_k, device=device)
    return idx, w


def timer() -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn: triton.testing.do_bench (L2 flushed between runs) or CUDA events."""
    try:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")
    except ImportError:
        def events(fn, warmup: int = 5, reps: int = 30) -> float:
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return sorted(times)[len(times) // 2]

        return events


def peak_tflops(bench, device) -> float:
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / bench(lambda: a @ b) / 1e9


def bench_gemm(bench, device, n_experts: int, per_expert: int, H: int = 7168,
               I: int = 2048) -> tuple[dict[str, float], float]:
    """One H -> I projection of `per_expert` sorted rows per expert: grouped vs one mm each."""
    rows = n_experts * per_expert
    x = torch.randn(rows, H, device=device, dtype=torch.bfloat16)
    w = torch.randn(n_experts, I, H, device=device, dtype=torch.bfloat16) * H**-0.5   # nn.Linear layout
    offs = torch.arange(1, n_experts + 1, device=device, dtype=torch.int32) * per_expert
    parts = x.split(per_expert)
    return {
        "grouped": bench(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs)),
        "loop": bench(lambda: [p @ w[e].t() for e, p in enumerate(parts)]),
    }, 2 * rows * H * I


def bench_routed(bench, moe: MoE, n_tokens: int) -> tuple[dict[str, float], float]:
    """routed_loop vs routed_grouped at balanced routing; FLOPs of the three expert GEMMs."""
    device = moe.gate.weight.device
    x = torch.randn(n_tokens, moe.gate.weight.shape[1], device=device, dtype=torch.bfloat16)
    idx, w = balanced_routing(n_tokens, moe.n_experts, TOP_K, device)
    moe.stacked()
    ms = {"loop": bench(lambda: moe.routed_loop(x, idx, w)), "grouped": bench(lambda: moe.routed_grouped(x, idx, w))}
    I = moe.experts["0"].gate_proj.weight.shape[0]
    return ms, 2 * 3 * n_tokens * TOP_K * x.shape[1] * I


def bench_layer(bench, moe: MoE, cfg: ModelConfig, n_tokens: int) -> tuple[dict[str, float], float]:
    """gate + routed + shared per impl; FLOPs as cp_attn.flops counts a MoE layer."""
    x = torch.randn(n_tokens, cfg.hidden_size, device=moe.gate.weight.device, dtype=torch.bfloat16)
    ms = {}
    for impl in ("loop", "grouped"):
        moe.impl = impl
        ms[impl] = bench(lambda: moe_local(moe, x))
    return ms, layer_flops(cfg, cfg.first_k_dense_replace, [n_tokens])["moe"]  # the first MoE layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the records")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py times CUDA kernels and needs a GPU; torch.cuda.is_available() is False here")
    if not hasattr(torch, "_grouped_mm"):
        sys.exit(f"torch {torch.__version__} has no torch._grouped_mm; nothing to compare the loop with")
    device = torch.device("cuda")
    torch.manual_seed(0)
    bench = timer()
    peak = peak_tflops(bench, device)
    meta = {k: v for k, v in machine().items() if k in ("gpu", "torch", "triton", "commit")}
    records = []

    def add(op: str, rows: int, experts: int, ms: dict[str, float], flops: float) -> None:
        for backend, t in ms.items():
            records.append({"op": op, "backend": backend, "rows": rows, "experts": experts, "ms": round(t, 4),
                            "tflops": round(flops / t / 1e9, 1), "peak_tflops": round(peak, 1), **meta})
            r = records[-1]
            print(f"{op:7s} {backend:8s} {experts:4d} experts {rows:7d} rows {r['ms']:9.3f} ms "
                  f"{r['tflops']:7.1f} TFLOP/s ({r['tflops'] / peak:5.1%} of {peak:.0f})", flush=True)

    for n_experts, per_expert in ROUTED_SHAPES:
        ms, flops = bench_gemm(bench, device, n_experts, per_expert)
        add("gemm", n_experts * per_expert, n_experts, ms, flops)
        torch.cuda.empty_cache()
    for n_experts in sorted({e for e, _ in ROUTED_SHAPES} | set(LAYER_EXPERTS)):
        cfg = moe_config(n_experts)
        moe = random_moe(cfg, device)
        for e, per_expert in ROUTED_SHAPES:
            if e == n_experts:
                n_tokens = n_experts * per_expert // TOP_K
                ms, flops = bench_routed(bench, moe, n_tokens)
                add("routed", n_tokens * TOP_K, n_experts, ms, flops)
        if n_experts in LAYER_EXPERTS:
            for n_tokens in LAYER_TOKENS:
                ms, flops = bench_layer(bench, moe, cfg, n_tokens)
                add("layer", n_tokens, n_experts, ms, flops)
        del moe
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
