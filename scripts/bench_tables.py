"""Render the committed benchmark records into docs/benchmarks.md (STYLE.md 16: tables are generated,
never typed). Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; this script
rewrites what is between them from the named records file and leaves the prose alone.

    python scripts/bench_tables.py            # rewrite docs/benchmarks.md in place
    python scripts/bench_tables.py --check    # exit 1 if the file is not what the records give
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def load(path: str) -> list[dict]:
    text = (ROOT / path).read_text()
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def md(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def kernels(path: str) -> str:
    recs = [r for r in load(path) if "ms" in r and not r["op"].endswith("_tune")]
    rows = [[r["op"], r["backend"], r["n"], r["keys"], r["ms"], r["tflops"] or "",
             f"{100 * r['tflops'] / r['peak_tflops']:.0f}%" if r["tflops"] else "", r.get("rel_l2_vs_torch", "")]
            for r in recs]
    head = recs[0] if recs else {}
    note = (f"\n\n{head.get('gpu')}, torch {head.get('torch')}, triton {head.get('triton')}, commit {head.get('commit')}; "
            f"ceilings measured in the same run: bf16 {head.get('peak_bf16_tflops', 0):.0f}, fp8 {head.get('peak_fp8_tflops', 0):.0f} TFLOP/s.")
    return md(["op", "backend", "n", "keys", "ms", "TFLOP/s", "of peak", "rel L2 vs torch"], rows) + note


def tune(path: str) -> str:
    recs = [r for r in load(path) if r["op"].endswith("_tune")]
    rows = [[r["op"].removesuffix("_tune"), " ".join(f"{k}={v}" for k, v in r["config"].items()),
             r.get("ms", ""), r.get("tflops", r.get("error", "")[:60])] for r in recs]
    return md(["op", "launch config", "ms", "TFLOP/s or error"], rows)


def prefill(path: str) -> str:
    recs = [r for r in load(path) if r.get("kind") == "prefill_1gpu"]
    base = {(r["model"], tuple(r["lengths"])): r["ms"] for r in recs if r.get("kernels") == "torch" and "ms" in r}
    rows = []
    for r in recs:
        if "ms" not in r:
            rows.append([r["model"], _lens(r["lengths"]), r["kernels"], r.get("kv_dtype"), r.get("error", ""), "", "", "", "", "", "", ""])
            continue
        st = r["stages_ms"]
        other = sum(st.values()) - sum(st.get(k, 0) for k in ("attn.indexer", "attn.sparse_mla", "moe", "mlp"))
        b = base.get((r["model"], tuple(r["lengths"])))
        rows.append([r["model"], _lens(r["lengths"]), r["kernels"], r.get("kv_dtype"), r["ms"],
                     f"{b / r['ms']:.1f}x" if b else "", r["useful_tflops"],
                     st.get("attn.indexer", 0), st.get("attn.sparse_mla", 0), st.get("moe", 0) + st.get("mlp", 0), other,
                     r["peak_mem_gib"]])
    return md(["model", "tokens", "kernels", "kv", "ms", "vs torch", "useful TFLOP/s", "indexer+top-k ms",
               "sparse MLA ms", "FFN ms", "other ms", "peak GiB"], rows)


def kv_accuracy(path: str) -> str:
    recs = [r for r in load(path) if r.get("kind") == "kv_fp8_accuracy"]
    rows = []
    for r in recs:
        for what, m in (("fp8 vs bf16 KV", r), ("fp8 KV vs fp32 model", r.get("fp8_vs_fp32")),
                        ("bf16 KV vs fp32 model", r.get("bf16_vs_fp32"))):
            if m:
                rows.append([r["model"], _lens(r["lengths"]), what, m["logits_rel_l2"], f"{100 * m['argmax_agreement']:.1f}%",
                             ", ".join(f"{100 * v:.1f}%" for v in m["topk_overlap"].values())])
    return md(["model", "tokens", "compared", "logits rel L2", "argmax agreement", "top-k overlap per layer"], rows)


def chunked(path: str) -> str:
    recs = [r for r in load(path) if r.get("kind") == "prefill_chunked_1gpu"]
    rows = [[r["model"], r["length"], r["chunk_size"], r["kernels"], r["kv_dtype"], r["one_shot_ttft_ms"], r["chunked_ttft_ms"],
             f"{100 * (r['chunking_cost'] - 1):+.1f}%", " / ".join(f"{x:.0f}" for x in r["chunk_ms"]),
             r["one_shot_peak_mem_gib"], r["chunked_peak_mem_gib"], r["cache_gib"]] for r in recs]
    return md(["model", "tokens", "chunk", "kernels", "kv", "one-shot TTFT ms", "chunked TTFT ms", "cost",
               "per-chunk ms", "one-shot peak GiB", "chunked peak GiB", "cache GiB"], rows)


def profile(path: str) -> str:
    out = []
    for r in (r for r in load(path) if r.get("kind") == "prefill_profile"):
        rows = [[k["name"][:70].replace("|", "/"), k["ms"], k["calls"], f"{100 * k['share']:.1f}%"] for k in r["top_kernels"][:12]]
        out.append(f"**{_lens(r['lengths'])} tokens, kernels={r['kernels']}, kv_dtype={r['kv_dtype']}: "
                   f"{r['gpu_ms_total']:.0f} ms of GPU time**\n\n" + md(["kernel", "ms", "calls", "share"], rows))
    return "\n\n".join(out)


def moe(path: str) -> str:
    recs = load(path)
    rows = [[r["op"], r["backend"], r.get("rows"), r.get("experts"), r["ms"], r["tflops"],
             f"{100 * r['tflops'] / r['peak_tflops']:.0f}%"] for r in recs if "ms" in r]
    return md(["op", "backend", "rows", "experts", "ms", "TFLOP/s", "of peak"], rows)


def sweep(path: str) -> str:
    """A results file of scripts/sweep.py, as scripts/report.py renders it."""
    from cp_attn.sweep.records import load_records
    from cp_attn.sweep.report import render_markdown

    return render_markdown(load_records(ROOT / path)).rstrip()


def _lens(lengths: list[int]) -> str:
    return str(lengths[0]) if len(lengths) == 1 else f"{sum(lengths)} ({len(lengths)} seqs)"


RENDER = {"kernels": kernels, "tune": tune, "prefill": prefill, "kv_accuracy": kv_accuracy, "moe": moe, "sweep": sweep,
          "chunked": chunked, "profile": profile}
MARK = re.compile(r"<!-- table:(\w+) (\S+) -->\n.*?<!-- /table:\1 -->", re.S)


def render(doc: str) -> str:
    return MARK.sub(lambda m: f"<!-- table:{m[1]} {m[2]} -->\n{RENDER[m[1]](m[2])}\n<!-- /table:{m[1]} -->", doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    old = DOC.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("docs/benchmarks.md is out of date with its records: run python scripts/bench_tables.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
