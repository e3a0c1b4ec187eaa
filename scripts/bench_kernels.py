"""Time the sparse-attention stage kernels on one GPU and record them with the ceilings measured in
the same run.

    python scripts/bench_kernels.py --out docs/benchmarks/kernels.json
    python scripts/bench_kernels.py --ops sparse_mla --sizes 4096x16384 --out /tmp/k.json

Each record: {"op", "backend", "n", "keys", "ms", "tflops", "peak_tflops", "gpu", ...}; tflops counts
useful work only (valid indices for sparse MLA, in-range pairs for the indexer). GPU only.
"""

from __future__ import annotations

import argparse
import json

from cp_attn.bench.common import machine, matmul_peak_tflops, print_table, require_cuda, write_records

DEFAULT_SIZES = ["4096x16384", "4096x65536", "16384x16384", "16384x65536"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the records")
    ap.add_argument("--ops", default="sparse_mla,indexer_logits,topk_indices", help="comma-separated ops")
    ap.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="n x T pairs: query rows x keys")
    ap.add_argument("--backends", default=None, help="comma-separated backends (default: all available)")
    ap.add_argument("--tune", action="store_true", help="also time the Triton sparse MLA launch configs")
    args = ap.parse_args(argv)
    require_cuda("bench_kernels.py")

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    info = machine()
    peak_bf16, peak_fp8 = matmul_peak_tflops("bf16"), matmul_peak_tflops("fp8")
    print(f"{info.get('gpu')}: bf16 matmul {peak_bf16:.0f} TFLOP/s, fp8 {peak_fp8:.0f} TFLOP/s", flush=True)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    names = args.backends.split(",") if args.backends else None
    records = []
    ops = args.ops.split(",")
    if "sparse_mla" in ops:
        from cp_attn.bench import sparse_mla

        if args.tune:
            for rec in sparse_mla.tune(4096, 16384, sparse_mla.TUNE_CONFIGS):
                records.append(dict(op="sparse_mla_tune", backend="triton", n=4096, keys=16384, **rec,
                                    peak_tflops=peak_bf16))
        records += sparse_mla.run(sizes, names, peak_bf16)
    if {"indexer_logits", "topk_indices"} & set(ops):
        from cp_attn.bench import indexer

        for r in indexer.run(sorted({n for n, _ in sizes}), sorted({t for _, t in sizes})):
            if (r["n"], r["keys"]) in sizes:
                r["peak_tflops"] = peak_fp8 if r["op"].endswith("fp8") else peak_bf16
                records.append(r)
        print(indexer.table([r for r in records if r["op"].startswith(("indexer", "topk"))]))
    for r in records:
        r.setdefault("peak_tflops", peak_bf16)
        r.update(info, peak_bf16_tflops=peak_bf16, peak_fp8_tflops=peak_fp8)
    write_records(args.out, records)
    print_table([r for r in records if "backend" in r and "n" in r and "ms" in r],
                ("op", "backend", "n", "keys", "ms", "tflops", "peak_tflops"))
    print(json.dumps({"records": len(records), "out": args.out}))


if __name__ == "__main__":
    main()
