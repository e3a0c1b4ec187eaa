"""Turn sweep results into an ablation table, plots and, against a baseline, a verdict.

    python scripts/report.py --results outputs/sweep.jsonl                                # the table
    python scripts/report.py --results outputs/sweep.jsonl --out-md outputs/table.md --plots outputs/plots
    python scripts/report.py --results outputs/sweep.jsonl --baseline outputs/baseline.jsonl

Exits 1 when the guard finds a regression (cp_attn/sweep/guard.py says what counts), 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cp_attn.sweep.guard import compare
from cp_attn.sweep.plots import write_plots
from cp_attn.sweep.records import load_records
from cp_attn.sweep.report import render_markdown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, type=Path, help="JSON-lines records of scripts/sweep.py")
    ap.add_argument("--baseline", type=Path, help="records to compare against (exit 1 on a regression)")
    ap.add_argument("--threshold", type=float, default=0.10, help="relative slowdown that fails (default 0.10)")
    ap.add_argument("--out-md", type=Path, help="also write the table (and the verdict) to this markdown file")
    ap.add_argument("--plots", type=Path, help="write ttft.png, speedup.png, per_rank.png into this folder")
    args = ap.parse_args(argv)

    results = load_records(args.results)
    md = render_markdown(results)
    verdict = compare(results, load_records(args.baseline), args.threshold) if args.baseline else None
    if verdict is not None:
        md += f"\nAgainst `{args.baseline}`:\n\n```\n{verdict.text()}```\n"
    print(md, end="")
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(md)
    for path in write_plots(results, args.plots) if args.plots else []:
        print(f"wrote {path}")
    return 0 if verdict is None or verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
