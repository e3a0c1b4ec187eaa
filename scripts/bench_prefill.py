"""One-GPU prefill end to end: kernels=torch beside kernels=triton, per-stage times, useful TFLOP/s
against the bf16 matmul rate measured in the same run, peak memory; and FP8 KV against bf16 KV.

    python scripts/bench_prefill.py --out docs/benchmarks/prefill_1gpu.jsonl
    python scripts/bench_prefill.py --models v32_slim --lengths 4096 16384 --kernels triton --out /tmp/p.jsonl
    python scripts/bench_prefill.py --compare-kv 4096 --out docs/benchmarks/kv_fp8_accuracy.jsonl
    python scripts/bench_prefill.py --models v32_slim --kernels triton --chunked 65536:16384 --out /tmp/c.jsonl

GPU only. One JSON line per run, each carrying the GPU, versions, commit and the measured ceiling.
"""

from __future__ import annotations

import argparse
import itertools
import json

from cp_attn.bench.common import machine, matmul_peak_tflops, require_cuda


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSONL file to append the records to")
    ap.add_argument("--models", nargs="+", default=["v32_slim", "v32_slim_e256"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 32768, 65536],
                    help="one sequence of each length")
    ap.add_argument("--mixed", default="8192,4096,2048,1024,512,256", help="a mixed batch ('' for none)")
    ap.add_argument("--kernels", nargs="+", default=["torch", "triton"])
    ap.add_argument("--kv-dtypes", nargs="+", default=["auto"])
    ap.add_argument("--torch-max-tokens", type=int, default=16384, help="skip kernels=torch above this (slow)")
    ap.add_argument("--compare-kv", nargs="*", type=int, default=None,
                    help="instead: FP8 vs bf16 KV accuracy on v32_slim at these lengths")
    ap.add_argument("--chunked", nargs="+", default=None, metavar="LENGTH:CHUNK",
                    help="instead: one prompt of LENGTH tokens in one shot and in chunks of CHUNK over a KV cache "
                         "(TTFT, peak memory, cost of chunking)")
    ap.add_argument("--profile", nargs="*", type=int, default=None,
                    help="instead: the GPU kernels of one kernels=triton forward of v32_slim at these lengths")
    args = ap.parse_args(argv)
    chunked = [_length_chunk(ap, x) for x in args.chunked] if args.chunked is not None else None
    require_cuda("bench_prefill.py")
    import torch

    from cp_attn.bench import prefill

    info = dict(machine(), peak_bf16_tflops=matmul_peak_tflops("bf16"))
    print(json.dumps(info), flush=True)
    out = open(args.out, "a")

    def emit(rec):
        rec.update(info)
        out.write(json.dumps(rec) + "\n")
        out.flush()
        print(json.dumps({k: v for k, v in rec.items() if k not in info}), flush=True)

    if chunked is not None:
        for name in args.models:
            model = prefill.make_model(name)
            for (L, N), kernels, kv in itertools.product(chunked, args.kernels, args.kv_dtypes):
                if kernels == "torch" and L > args.torch_max_tokens:
                    continue
                emit(dict(kind="prefill_chunked_1gpu", model=name, **prefill.time_chunked_prefill(model, L, N, kernels, kv)))
            del model
            torch.cuda.empty_cache()
        return
    if args.profile is not None:
        model = prefill.make_model("v32_slim")
        for L in args.profile or [16384]:
            for kv in args.kv_dtypes:
                emit(dict(kind="prefill_profile", model="v32_slim", **prefill.profile_prefill(model, [L], kv_dtype=kv)))
        return
    if args.compare_kv is not None:
        for L in args.compare_kv or [4096]:
            emit(dict(kind="kv_fp8_accuracy", model="v32_slim", **prefill.compare_kv_dtypes("v32_slim", [L])))
        return
    batches = [[L] for L in args.lengths] + ([[int(x) for x in args.mixed.split(",")]] if args.mixed else [])
    for name in args.models:
        model = prefill.make_model(name)
        for lengths in batches:
            for kernels in args.kernels:
                if kernels == "torch" and sum(lengths) > args.torch_max_tokens:
                    continue
                for kv in args.kv_dtypes:
                    try:
                        rec = prefill.time_prefill(model, lengths, kernels, kv)
                    except torch.OutOfMemoryError as e:
                        rec = dict(lengths=lengths, kernels=kernels, kv_dtype=kv, error=f"OOM: {str(e)[:120]}")
                    torch.cuda.empty_cache()
                    emit(dict(kind="prefill_1gpu", model=name, **rec))
        del model
        torch.cuda.empty_cache()


def _length_chunk(ap: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    """'65536:16384' -> (65536, 16384); anything else is a usage error naming it."""
    try:
        length, chunk = (int(x) for x in text.split(":"))
    except ValueError:
        ap.error(f"--chunked takes LENGTH:CHUNK, e.g. 65536:16384; got {text!r}")
    if length < 1 or chunk < 1:
        ap.error(f"--chunked {text!r}: LENGTH and CHUNK must be >= 1")
    return length, chunk


if __name__ == "__main__":
    main()
