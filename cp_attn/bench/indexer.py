"""The indexer stage on one GPU: logits (bf16 and FP8) and top-k, torch against Triton.

Cases are the LAST n query rows of one causal sequence of T keys (row i sees keys [0, T - n + i]),
V3.2's indexer (64 heads x 128, K = 2048). Times are medians of `triton.testing.do_bench`; TFLOP/s
count useful work only, 2 H D per in-range (row, key) pair. The torch ops run as `kernels=torch`
runs them, TORCH_CHUNK query rows at a time (their [rows, H, T] fp32 scores bound the memory); the
Triton ops take all n rows in one call. Top-k is timed on logits from the Triton bf16 kernel.

    records = run()                     # list of dicts, one per (op, backend, n, keys)
    print(table(records))
    check()                             # GPU correctness against the naive ops; raises on failure
"""

from __future__ import annotations

import torch

from cp_attn.bench.common import bench_ms, machine
from cp_attn.ops import naive
from cp_attn.ops.kv_fp8 import quantize_index_k, quantize_index_q

H, D, K = 64, 128, 2048
"""V3.2's index heads, index head dim, top-k."""
TORCH_CHUNK = 1024
"""Query rows per torch call, as KernelSet.query_chunk for kernels=torch."""
TORCH_MAX_ROWS = 4096
"""Default: torch backends are timed only up to this many rows (16K rows x 64K keys take minutes)."""


def causal_rows(n: int, T: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """(ks, ke) of the last n rows of a causal sequence of T keys."""
    ke = torch.arange(T - n, T, device=device) + 1
    return torch.zeros_like(ke), ke


def inputs(n: int, T: int, dtype: str, seed: int = 0, device: str = "cuda"):
    """(q, k, w) at V3.2 shapes: bf16 q [n, H, D], k [T, D]; or the FP8 form (e4m3 q with its
    scale folded into w, k = (e4m3 [T, D], fp32 scale [T])). Weights carry the model's H^-0.5 D^-0.5."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, H, D, generator=g, device=device, dtype=torch.bfloat16)
    k = torch.randn(T, D, generator=g, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, H, generator=g, device=device) * (H**-0.5 * D**-0.5)
    if dtype == "bf16":
        return q, k, w
    qv, qs = quantize_index_q(q)
    return qv, quantize_index_k(k), w * qs


def environment() -> dict:
    """What the numbers ran on: GPU, torch and triton versions, the commit (cp_attn.bench.common)."""
    return machine()


def _median_ms(fn) -> float:
    return bench_ms(fn, rep=200)


def _chunked(fn, n: int):
    """Call fn(slice) for TORCH_CHUNK rows at a time."""
    return lambda: [fn(slice(s, s + TORCH_CHUNK)) for s in range(0, n, TORCH_CHUNK)]


def bench_logits(n: int, T: int, dtype: str, backend: str) -> dict:
    """One indexer-logits record: dtype 'bf16' or 'fp8', backend 'torch' or 'triton'."""
    from cp_attn.ops.indexer_triton import indexer_logits

    q, k, w = inputs(n, T, dtype)
    ks, ke = causal_rows(n, T)
    if backend == "torch":
        fn = _chunked(lambda sl: naive.indexer_logits(q[sl], k, w[sl], ks[sl], ke[sl]), n)
    else:
        fn = lambda: indexer_logits(q, k, w, ks, ke)  # noqa: E731
    ms = _median_ms(fn)
    flops = 2 * H * D * int((ke - ks).sum())
    return {"op": f"indexer_logits_{dtype}", "backend": backend, "n": n, "keys": T, "ms": round(ms, 4),
            "tflops": round(flops / ms / 1e9, 1)}


def bench_topk(n: int, T: int, backend: str) -> dict:
    """One top-k record: backend 'torch' (the tie-exact naive op), 'torch.topk' (torch.topk on the
    masked logits alone: no tie rule, no -1 padding) or 'triton'."""
    from cp_attn.ops.indexer_triton import indexer_logits
    from cp_attn.ops.topk_triton import topk_indices

    q, k, w = inputs(n, T, "bf16")
    ks, ke = causal_rows(n, T)
    logits = indexer_logits(q, k, w, ks, ke)
    if backend == "torch":
        fn = _chunked(lambda sl: naive.topk_indices(logits[sl], ks[sl], ke[sl], K), n)
    elif backend == "torch.topk":
        fn = _chunked(lambda sl: logits[sl].topk(K, dim=-1), n)
    else:
        fn = lambda: topk_indices(logits, ks, ke, K)  # noqa: E731
    return {"op": "topk", "backend": backend, "n": n, "keys": T, "ms": round(_median_ms(fn), 4), "tflops": None}


def run(ns=(4096, 16384), keys=(16384, 65536), backends=("torch", "triton"),
        torch_max_rows: int = TORCH_MAX_ROWS, extra: dict | None = None) -> list[dict]:
    """Every (op, backend, n, keys) record; torch backends only where n <= torch_max_rows.
    `extra` (e.g. matmul ceilings measured in the same run) is merged into every record."""
    env = {**environment(), **(extra or {})}
    records = []
    for T in keys:
        for n in ns:
            if n > T:
                continue
            for backend in backends:
                if backend.startswith("torch") and n > torch_max_rows:
                    continue
                for dtype in ("bf16", "fp8"):
                    records.append({**bench_logits(n, T, dtype, backend), **env})
                for b in (("torch", "torch.topk") if backend == "torch" else (backend,)):
                    records.append({**bench_topk(n, T, b), **env})
                torch.cuda.empty_cache()
    return records


def table(records: list[dict]) -> str:
    """A text table of the records, and the Triton top-k's share of the Triton indexer stage
    (FP8 logits + top-k) per case, against the 25% target."""
    lines = [f"{'op':<22} {'backend':<11} {'n':>6} {'keys':>6} {'ms':>9} {'TFLOP/s':>8}"]
    for r in records:
        tf = "" if r["tflops"] is None else f"{r['tflops']:.1f}"
        lines.append(f"{r['op']:<22} {r['backend']:<11} {r['n']:>6} {r['keys']:>6} {r['ms']:>9.3f} {tf:>8}")
    by = {(r["op"], r["backend"], r["n"], r["keys"]): r["ms"] for r in records}
    for (op, backend, n, T), ms in by.items():
        logits = by.get(("indexer_logits_fp8", "triton", n, T))
        if op == "topk" and backend == "triton" and logits:
            lines.append(f"triton top-k share of the FP8 indexer stage at n={n}, keys={T}: "
                         f"{ms / (ms + logits):.1%} (target <= 25%)")
    return "\n".join(lines)


def check(n: int = 256, T: int = 8192) -> list[str]:
    """Triton against the naive ops on the GPU (causal rows plus an empty and a one-key row);
    returns one line per check and raises AssertionError on the first failure."""
    from cp_attn.ops.indexer_triton import indexer_logits
    from cp_attn.ops.topk_triton import topk_indices

    ks, ke = causal_rows(n, T)
    ks[0], ke[0] = 7, 7
    ks[1], ke[1] = T // 2, T // 2 + 1
    report = []
    for dtype, rel in (("bf16", 2e-5), ("fp8", 2e-3)):   # tests/test_indexer_kernels.py: GPU_REL
        q, k, w = inputs(n, T, dtype, seed=1)
        out, ref = indexer_logits(q, k, w, ks, ke), naive.indexer_logits(q, k, w, ks, ke)
        kf = k[0].float() * k[1][:, None] if isinstance(k, tuple) else k.float()
        mag = torch.einsum("nh,nhd->nd", w.abs(), q.float().abs()) @ kf.abs().T
        fin = torch.isfinite(ref)
        assert torch.equal(fin, torch.isfinite(out)), f"{dtype} logits: -inf pattern differs"
        worst = float(((out - ref).abs()[fin] / (rel * mag[fin] + 1e-30)).max())
        assert worst <= 1.0, f"{dtype} logits: error {worst:.3g}x the tolerance"
        idx = topk_indices(out, ks, ke, K)
        assert torch.equal(idx, naive.topk_indices(out, ks, ke, K)), f"{dtype} top-k differs from naive"
        report.append(f"{dtype}: logits within {worst:.2g} of tolerance {rel:g} x magnitude; top-k exact")
    return report
