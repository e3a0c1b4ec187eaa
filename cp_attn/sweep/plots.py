"""PNG plots of sweep records: TTFT against tokens, speed-up against CP size, per-rank time and rows.

matplotlib's object API only (no pyplot state), so these run headless and inside notebooks alike.
Legends sit outside the axes, so they cover no data; token counts and CP sizes are the ticks.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from cp_attn.sweep.records import Record
from cp_attn.sweep.report import (
    INPUT_KEYS, cp1_reference, fmt_value, identity_keys, latest, sorted_records, speedup, varying_keys,
)


def short_label(config: dict, keys: Sequence[str], sep: str = " ") -> str:
    """'size=2 mode=in_seq' (last part of each dotted key), or 'all' when nothing varies."""
    return sep.join(f"{k.rsplit('.', 1)[-1]}={fmt_value(config.get(k))}" for k in keys) or "all"


def values_label(config: dict, keys: Sequence[str]) -> str:
    """The values alone, one per line ('2\nin_seq\n[37,16]'), for crowded tick labels."""
    return "\n".join(fmt_value(config.get(k)) for k in keys) or "all"


def _keys_axis_label(keys: Sequence[str]) -> str:
    return " / ".join(keys) if keys else "configuration"


def _ran(records: Sequence[Record]) -> tuple[list[Record], list[str], list[str]]:
    ran = [r for r in latest(records) if r.runnable and r.ttft_ms]
    keys = identity_keys(ran)
    return ran, keys, varying_keys(ran, keys)


def _legend_outside(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small", frameon=False)


def _int_ticks(axis, values: Sequence[int]) -> None:
    axis.set_major_locator(FixedLocator(sorted(set(values))))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(lambda v, _: f"{v:.0f}")


def _yerr(rs: Sequence[Record]) -> list[list[float]]:
    return [[r.ttft_ms["median"] - r.ttft_ms["min"] for r in rs], [r.ttft_ms["max"] - r.ttft_ms["median"] for r in rs]]


def ttft_figure(records: Sequence[Record]) -> Figure | None:
    """TTFT (median, min..max bars) against the batch's tokens, one line per configuration; one bar
    per configuration when every run had the same tokens. None when nothing ran."""
    ran, _, vary = _ran(records)
    if not ran:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    tokens = sorted({r.tokens for r in ran})
    if len(tokens) > 1:
        group_keys = [k for k in vary if k not in INPUT_KEYS]
        groups: dict[str, list[Record]] = defaultdict(list)
        for r in sorted_records(ran, group_keys):
            groups[short_label(r.config, group_keys)].append(r)
        for name, rs in groups.items():
            rs = sorted(rs, key=lambda r: r.tokens)
            ax.errorbar([r.tokens for r in rs], [r.ttft_ms["median"] for r in rs], yerr=_yerr(rs),
                        marker="o", capsize=3, label=name)
        if tokens[-1] / tokens[0] >= 8:
            ax.set_xscale("log", base=2)
        _int_ticks(ax.xaxis, tokens)
        ax.set_xlabel("tokens in the batch")
    else:
        rs = sorted_records(ran, vary)
        ax.bar(range(len(rs)), [r.ttft_ms["median"] for r in rs], yerr=_yerr(rs), capsize=3, color="tab:blue")
        ax.set_xticks(range(len(rs)), [values_label(r.config, vary) for r in rs], fontsize="small")
        ax.set_xlabel(f"{_keys_axis_label(vary)} ({tokens[0]} tokens)")
    ax.set_ylabel("TTFT ms (median; bars: min..max)")
    ax.set_title("Prefill time to first token")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def speedup_figure(records: Sequence[Record]) -> Figure | None:
    """Speed-up over cp = 1 against the CP size, one line per configuration; None with one size."""
    ran, keys, vary = _ran(records)
    sizes = sorted({r.config.get("cp.size") for r in ran})
    if len(sizes) < 2:
        return None
    group_keys = [k for k in vary if k != "cp.size"]
    groups: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in sorted_records(ran, [*group_keys, "cp.size"]):
        s = speedup(cp1_reference(ran, r, keys), r)
        if s is not None:
            groups[short_label(r.config, group_keys)].append((r.config["cp.size"], s))
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ax.plot(sizes, sizes, "k--", lw=1, label="ideal (= CP size)")
    for name, pts in groups.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    _int_ticks(ax.xaxis, sizes)
    ax.set_xlabel("CP size (ranks)")
    ax.set_ylabel("speed-up over cp = 1 (TTFT ratio)")
    ax.set_title("Speed-up over one rank")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def per_rank_figure(records: Sequence[Record]) -> Figure | None:
    """Per configuration with cp > 1: every rank's rows and time (load balance); None if there is none."""
    ran, _, vary = _ran(records)
    multi = [r for r in sorted_records(ran, vary) if r.per_rank and len(r.per_rank) > 1]
    if not multi:
        return None
    max_c = max(len(r.per_rank) for r in multi)
    width = 0.8 / max_c
    fig = Figure(figsize=(max(8, 1.2 * len(multi)), 6))
    ax_rows, ax_ms = fig.subplots(2, 1, sharex=True)
    for rank in range(max_c):
        xs, rows, ms = [], [], []
        for i, r in enumerate(multi):
            if rank < len(r.per_rank):
                c = len(r.per_rank)
                xs.append(i + (rank - (c - 1) / 2) * width)
                rows.append(r.per_rank[rank]["rows"])
                ms.append(r.per_rank[rank]["ms"])
        ax_rows.bar(xs, rows, width, label=f"rank {rank}", color=f"C{rank % 10}")
        ax_ms.bar(xs, ms, width, color=f"C{rank % 10}")
    ax_rows.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_rows.set_ylabel("rows (real tokens)")
    ax_ms.set_ylabel("time to end of forward, ms")
    ax_ms.set_xticks(range(len(multi)), [values_label(r.config, vary) for r in multi], fontsize="small")
    ax_ms.set_xlabel(_keys_axis_label(vary))
    ax_rows.set_title("Per-rank load: rows and time")
    for ax in (ax_rows, ax_ms):
        ax.grid(alpha=0.3, axis="y")
    _legend_outside(ax_rows)
    return fig


FIGURES = {"ttft": ttft_figure, "speedup": speedup_figure, "per_rank": per_rank_figure}


def write_plots(records: Sequence[Record], out_dir: str | Path) -> list[Path]:
    """ttft.png, speedup.png and per_rank.png in `out_dir` (each only when it has something to show)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in FIGURES.items():
        fig = make(records)
        if fig is not None:
            fig.savefig(out_dir / f"{name}.png", dpi=110, bbox_inches="tight")  # "tight": the outside legend stays in
            written.append(out_dir / f"{name}.png")
    return written
