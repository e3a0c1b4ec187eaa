"""Plots for the notebooks: token layouts, per-rank loads, indexer scores and picks, timings, GPU records.

Every function draws on the matplotlib Axes it is given and returns it; what to plot comes from the
library (cp_attn.layout, cp_attn.layout.balance, cp_attn.explore, cp_attn.launch_local), never from
logic kept here. Conventions: categories (ranks, CP sizes) sit at integer x positions with integer
labels; legends go below the axes (`legend_below`) so they never cover a bar.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from cp_attn.explore import CutTies, IndexerTrace, parallel_efficiency
from cp_attn.layout import RankLoad, SplitPlan, relative

PAD_COLOR = "#d9d9d9"
STAGE_COLORS = {"indexer": "tab:blue", "sparse MLA": "tab:orange", "MoE / MLP": "tab:green",
                "gathers": "tab:red", "projections": "tab:gray", "other": "tab:brown"}
"""Colors of the `cp_attn.explore.STAGE_GROUPS` groups."""
SERIES_COLORS = {"in_seq": "tab:blue", "round_robin": "tab:orange", "contiguous": "tab:gray",
                 "fused": "tab:green", "deepep": "tab:purple"}


def seq_colors(n: int) -> list:
    """n light colors, one per sequence of a batch (Pastel1, repeating past 9)."""
    return [plt.get_cmap("Pastel1")(b % 9) for b in range(n)]


def rank_colors(n: int) -> list:
    """n distinct colors, one per rank (tab10, then tab20 past 10 ranks)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def legend_below(ax: Axes, handles=None, ncol: int | None = None, side: str = "bottom", **kw) -> Axes:
    """A legend for the whole figure, outside every axes and label (never over a bar or a cell): under
    the figure (`side='bottom'`) or on its right, at the top (`side='right'`, one column).

    Uses the figure's constrained layout (switched on here if the figure has no layout engine) to make
    room; without `handles`, the labelled artists of `ax`."""
    fig = ax.figure
    if fig.get_layout_engine() is None:
        fig.set_layout_engine("constrained")
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
        kw.setdefault("labels", labels)
    if side == "bottom":
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol or min(len(handles), 6), frameon=False, **kw)
    elif side == "right":
        fig.legend(handles=handles, loc="outside right upper", ncol=ncol or 1, frameon=False, **kw)
    else:
        raise ValueError(f"side must be 'bottom' or 'right', got {side!r}")
    return ax


def _cells(ax: Axes, grid: np.ndarray, colors: list, labels: np.ndarray | None, fontsize: float = 7) -> None:
    """Draw an integer grid (-1 = padding) as colored cells, cell (i, j) centred on (j, i)."""
    cmap = ListedColormap([PAD_COLOR, *colors])
    ax.imshow(grid + 1, cmap=cmap, vmin=0, vmax=len(colors), aspect="auto", interpolation="nearest")
    if labels is not None:
        for (i, j), text in np.ndenumerate(labels):
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize)


def _int_ticks(ax: Axes, axis: str, ticks: Sequence[int], labels: Sequence | None = None) -> None:
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    set_ticks(list(ticks), [str(t) for t in (labels if labels is not None else ticks)])


def plot_ownership(ax: Axes, plans: Mapping[str, SplitPlan], legend: bool = True) -> Axes:
    """One strip per plan over the global token order: each token colored (and numbered) by the rank
    that computes it; round_robin's padding rows, which belong to no token, sit past the end in grey.
    White lines separate sequences; x ticks mark where each sequence starts."""
    plans = dict(plans)
    first = next(iter(plans.values()))
    C, T = first.cp_size, first.num_tokens
    width = max(p.cp_size * p.shard_size if p.mode == "round_robin" else T for p in plans.values())
    owner = np.full((len(plans), width), -2)
    for m, plan in enumerate(plans.values()):
        for r in range(C):
            tok = plan.token_index(r)
            real = tok[tok >= 0].numpy()
            owner[m, real] = r
            n_pad = int((tok < 0).sum())
            if n_pad:  # round_robin: pad row i of rank r stands where token r + i C would be
                slots = (r + torch.arange(plan.num_rows(r)) * C)[tok < 0].numpy()
                owner[m, slots] = -1
    labels = np.where(owner >= 0, owner.astype(str), np.where(owner == -1, "p", ""))
    grid = np.where(owner == -2, -1, owner)
    _cells(ax, grid, rank_colors(C), labels, fontsize=8 if width <= 80 else 6)
    for b in first.cu_seqlens.tolist():
        ax.axvline(b - 0.5, color="white", lw=3)
    for b, (s, L) in enumerate(zip(first.cu_seqlens.tolist(), first.seq_lens)):
        ax.text(s + L / 2 - 0.5, -0.62, f"seq {b} ({L})", ha="center", va="bottom", fontsize=8)
    _int_ticks(ax, "x", first.cu_seqlens.tolist())
    _int_ticks(ax, "y", range(len(plans)), list(plans))
    ax.set_xlabel("global token (ticks: where each sequence starts; 'p' = padding row)")
    handles = [Patch(color=c, label=f"rank {r}") for r, c in enumerate(rank_colors(C))]
    return legend_below(ax, [*handles, Patch(color=PAD_COLOR, label="padding")]) if legend else ax


def plot_buffer(ax: Axes, token_grid: torch.Tensor, seq_of_token: torch.Tensor, title: str) -> Axes:
    """A rank-major buffer [C, S] of global token ids (-1 = padding) as a grid: one row per rank, cells
    numbered by token and colored by the sequence the token belongs to."""
    grid = token_grid.long().numpy()
    seq = np.where(grid >= 0, seq_of_token.numpy()[np.clip(grid, 0, None)], -1)
    _cells(ax, seq, seq_colors(int(seq_of_token.max()) + 1), np.where(grid >= 0, grid.astype(str), "pad"))
    _int_ticks(ax, "y", range(grid.shape[0]), [f"rank {r}" for r in range(grid.shape[0])])
    _int_ticks(ax, "x", range(grid.shape[1]))
    ax.set_title(title, fontsize=10)
    return ax


def seq_legend(ax: Axes, n_seq: int) -> Axes:
    """The legend for `plot_buffer`'s sequence colors."""
    handles = [Patch(color=c, label=f"seq {b}") for b, c in enumerate(seq_colors(n_seq))]
    return legend_below(ax, [*handles, Patch(color=PAD_COLOR, label="padding")])


def grouped_bars(ax: Axes, categories: Sequence, series: Mapping[str, Sequence[float]], *, xlabel: str = "",
                 ylabel: str = "", ref: float | None = None, colors: Mapping[str, str] | None = None,
                 fmt: str | None = None) -> Axes:
    """One group of bars per category (at integer x, labelled by the category), one bar per series.
    `ref` draws a dashed horizontal reference line (e.g. 1.0 = a perfect split); `fmt` labels each bar."""
    n = len(series)
    width = 0.8 / max(n, 1)
    colors = {**SERIES_COLORS, **(colors or {})}
    x = np.arange(len(categories))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (i - (n - 1) / 2) * width, list(values), width, label=name, color=colors.get(name))
        if fmt:
            labels = [format(round(v) if fmt.endswith("d") else v, fmt) for v in values]   # "d": counts held as floats
            ax.bar_label(bars, labels, fontsize=7, padding=1)
    if ref is not None:
        ax.axhline(ref, color="black", lw=0.8, ls="--")
    _int_ticks(ax, "x", x, list(categories))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.12)
    return ax


def stacked_bars(ax: Axes, categories: Sequence, parts: Mapping[str, Sequence[float]], *, xlabel: str = "",
                 ylabel: str = "", colors: Mapping[str, str] | None = None) -> Axes:
    """One bar per category (integer x), stacked from `parts` in order (name -> value per category)."""
    x = np.arange(len(categories))
    bottom = np.zeros(len(categories))
    for name, values in parts.items():
        values = np.asarray(list(values), dtype=float)
        ax.bar(x, values, 0.6, bottom=bottom, label=name, color=(colors or {}).get(name))
        bottom += values
    _int_ticks(ax, "x", x, list(categories))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


SELECTION_COLORS = ["white", "#cfd8e3", "tab:blue", "tab:orange", "tab:red"]
SELECTION_LABELS = ["not a causal key", "causal, not selected", "selected (top-k)",
                    "tie at the cut, selected", "tie at the cut, left out"]
LOAD_LABELS = {"rows": "rows", "indexer_keys": "indexer work (keys scored)",
               "attended_keys": "sparse attention work (keys read)"}


def plot_rank_loads(ax: Axes, loads: Mapping[str, Sequence[RankLoad]], field: str, *, fmt: str | None = None) -> Axes:
    """Per rank, one `RankLoad` field of several splits as a share of that split's mean (dashed line:
    1.0, a perfect split); the tallest bar is the rank everyone waits for."""
    C = len(next(iter(loads.values())))
    series = {name: relative([getattr(x, field) for x in per_rank]) for name, per_rank in loads.items()}
    return grouped_bars(ax, range(C), series, xlabel="rank", ylabel=f"{LOAD_LABELS.get(field, field)} / mean",
                        ref=1.0, fmt=fmt)


def plot_row_scores(ax: Axes, trace: IndexerTrace, ties: CutTies, t: int, legend: bool = True) -> Axes:
    """Query t's scores over its causal keys as bars (selected or not), the cut score (the K-th best) as a
    dashed line, and the keys tied exactly at the cut as diamonds: taken, or left out. Tied scores are
    often exactly 0, where a bar has no height, hence the markers."""
    keys = trace.causal[t].nonzero().flatten()
    scores = trace.logits[t, keys].numpy()
    sel, tied = trace.selected[t, keys].numpy(), ties.tied_keys[t, keys].numpy()
    x = np.arange(len(keys))
    ax.bar(x, scores, 0.8, color=[SELECTION_COLORS[2] if s else SELECTION_COLORS[1] for s in sel])
    ax.axhline(float(scores[sel].min()), color="black", lw=0.8, ls="--")
    for cat, mask in ((3, tied & sel), (4, tied & ~sel)):
        ax.scatter(x[mask], scores[mask], s=45, marker="D", color=SELECTION_COLORS[cat], edgecolor="black", zorder=3)
    step = max(1, len(keys) // 16)
    _int_ticks(ax, "x", range(0, len(keys), step), keys[::step].tolist())
    ax.set_xlabel(f"key s (causal keys of query t = {t})")
    ax.set_ylabel("score I[t, s]")
    handles = [Patch(color=SELECTION_COLORS[1], label=SELECTION_LABELS[1]),
               Patch(color=SELECTION_COLORS[2], label=SELECTION_LABELS[2]),
               Line2D([], [], ls="--", color="black", lw=0.8, label="cut: the K-th best score")]
    handles += [Line2D([], [], ls="", marker="D", markersize=7, color=SELECTION_COLORS[c], markeredgecolor="black",
                       label=SELECTION_LABELS[c]) for c in (3, 4) if (tied & (sel if c == 3 else ~sel)).any()]
    return legend_below(ax, handles, ncol=3, fontsize=8) if legend else ax


def plot_scores(ax: Axes, trace: IndexerTrace, title: str = "indexer scores I[t, s]") -> Axes:
    """The indexer's scores as a heatmap, query t down, key s across; white outside the causal range,
    diverging colors around 0 (ReLU makes exact zeros common)."""
    scores = trace.logits.numpy().copy()
    scores[~np.isfinite(scores)] = np.nan
    lim = float(np.nanmax(np.abs(scores))) or 1.0
    im = ax.imshow(scores, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim), interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, shrink=0.8, label="score")
    ax.set_xlabel("key s")
    ax.set_ylabel("query t")
    ax.set_title(title, fontsize=10)
    return ax


def plot_selection(ax: Axes, trace: IndexerTrace, ties: CutTies | None = None, title: str = "keys each query selects",
                   legend: bool = True) -> Axes:
    """Which keys each query reads: dense causal attention reads every shaded cell, sparse attention only
    the selected ones. With `ties`, the keys tied at a row's cut are marked (taken, or left out)."""
    causal, sel = trace.causal.numpy(), trace.selected.numpy()
    cat = np.where(sel, 2, np.where(causal, 1, 0))
    if ties is not None:  # only rows where the tie straddles the cut: there the order decided
        tied = (ties.tied_keys & ties.at_cut[:, None]).numpy()
        cat = np.where(tied & sel, 3, np.where(tied, 4, cat))
    ax.imshow(cat, cmap=ListedColormap(SELECTION_COLORS), vmin=0, vmax=4, interpolation="nearest")
    ax.set_xlabel("key s")
    ax.set_ylabel("query t")
    ax.set_title(title, fontsize=10)
    shown = sorted(set(np.unique(cat).tolist()) | {0, 1, 2})
    handles = [Patch(facecolor=SELECTION_COLORS[i], edgecolor="grey", label=SELECTION_LABELS[i]) for i in shown]
    return legend_below(ax, handles, ncol=3, fontsize=8) if legend else ax


def plot_efficiency(ax: Axes, runs: Sequence[dict], *, group: Sequence[str] = ("mode", "moe_backend")) -> Axes:
    """`cp_attn.explore.parallel_efficiency` of result records against CP size (100% = ideal scaling), one
    line per `group` combination: color from the first key (the split mode), line style from the second
    (the MoE backend); x ticks are the CP sizes measured."""
    lines = parallel_efficiency(runs, group)
    sizes = sorted({c for pts in lines.values() for c, _ in pts})
    extra = iter(["-.", ":"])
    styles = {"fused": "-", "deepep": "--"}
    for key, pts in sorted(lines.items()):
        ls = styles.setdefault(key[-1], next(extra, "-"))
        ax.plot([c for c, _ in pts], [e for _, e in pts], marker="o", color=SERIES_COLORS.get(key[0]), ls=ls,
                label=" + ".join(key))
    ax.axhline(100, color="black", lw=0.8, ls=":", label="ideal")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    _int_ticks(ax, "x", sizes)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlabel("CP size C (GPUs)")
    ax.set_ylabel("parallel efficiency (%)")
    return ax
