"""Time the indexer stage on one GPU (cp_attn.bench.indexer): logits bf16/FP8 and top-k, torch
against Triton, the last n rows of a causal sequence of T keys. Prints a table; --out appends the
records as JSON lines; --quick only checks Triton against the naive ops on the GPU.

    python scripts/bench_indexer.py --quick
    python scripts/bench_indexer.py --out docs/results/indexer.jsonl
"""

from __future__ import annotations

import argparse
import json

from cp_attn.bench import indexer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the GPU correctness check")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384], help="query rows")
    p.add_argument("--keys", type=int, nargs="+", default=[16384, 65536], help="causal sequence lengths T")
    p.add_argument("--torch-max-rows", type=int, default=indexer.TORCH_MAX_ROWS,
                   help="skip the torch ops above this many rows")
    p.add_argument("--out", help="append the records to this JSONL file")
    args = p.parse_args()

    for line in indexer.check():
        print("check:", line)
    if args.quick:
        return
    records = indexer.run(args.n, args.keys, torch_max_rows=args.torch_max_rows)
    print(indexer.table(records))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
