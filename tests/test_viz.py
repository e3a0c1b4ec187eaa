"""cp_attn.viz draws what the library computed, with integer category ticks and legends that cover
nothing. Checked on the drawn artists (headless Agg): cell colors against the layout, bar heights
against the values, tick labels, and the legend's box against every axes' box."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cp_attn import viz  # noqa: E402
from cp_attn.explore import IndexerTrace, cut_ties  # noqa: E402
from cp_attn.layout import plan_split, rank_loads  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _legend_covers_nothing(fig) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends, "the figure has no legend"
    for leg in legends:
        box = leg.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), "a legend covers an axes"
            assert not box.overlaps(ax.xaxis.label.get_window_extent(renderer)), "a legend covers an axis label"


def _xtick_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


def test_ownership_colors_every_token_by_its_rank():
    seq_lens, C = [7, 2, 4], 3
    plans = {m: plan_split(seq_lens, C, m) for m in ("in_seq", "round_robin")}
    fig, ax = plt.subplots(figsize=(8, 2), layout="constrained")
    viz.plot_ownership(ax, plans)
    grid = np.asarray(ax.images[0].get_array())             # value = rank + 1, 0 = padding
    for m, plan in enumerate(plans.values()):
        for r in range(C):
            tok = plan.token_index(r)
            assert (grid[m, tok[tok >= 0].numpy()] == r + 1).all()
    assert (grid[1, 13:] == 0).all() and grid.shape[1] == 15    # round_robin: 13 tokens + 2 padding rows
    assert _xtick_labels(ax) == ["0", "7", "9", "13"]          # where each sequence starts, and T
    _legend_covers_nothing(fig)


def test_grouped_bars_put_categories_on_integer_ticks():
    fig, ax = plt.subplots(layout="constrained")
    viz.grouped_bars(ax, [1, 2, 4], {"a": [3.0, 2.0, 1.0], "b": [1.0, 1.0, 5.0]}, xlabel="C", ref=1.0, fmt="d")
    assert list(ax.get_xticks()) == [0, 1, 2] and _xtick_labels(ax) == ["1", "2", "4"]
    heights = [p.get_height() for p in ax.patches]
    assert heights == [3.0, 2.0, 1.0, 1.0, 1.0, 5.0]
    assert [t.get_text() for t in ax.texts] == ["3", "2", "1", "1", "1", "5"]
    assert len(ax.lines) == 1 and ax.lines[0].get_ydata()[0] == 1.0
    viz.legend_below(ax)
    _legend_covers_nothing(fig)


def test_rank_loads_are_drawn_relative_to_the_mean():
    loads = {"in_seq": rank_loads(plan_split([64], 4, "in_seq"), 8),
             "round_robin": rank_loads(plan_split([64], 4, "round_robin"), 8)}
    fig, axes = plt.subplots(1, 2, layout="constrained")
    viz.plot_rank_loads(axes[0], loads, "indexer_keys")
    viz.plot_rank_loads(axes[1], loads, "attended_keys")
    for ax in axes:
        heights = np.array([p.get_height() for p in ax.patches]).reshape(2, 4)
        assert np.allclose(heights.mean(1), 1.0)
        assert _xtick_labels(ax) == ["0", "1", "2", "3"]
    in_seq_attended = [x.attended_keys for x in loads["in_seq"]]
    assert np.allclose(np.array([p.get_height() for p in axes[1].patches])[:4],
                       np.array(in_seq_attended) / np.mean(in_seq_attended))
    viz.legend_below(axes[0])
    _legend_covers_nothing(fig)


def test_stacked_bars_stack_in_order():
    fig, ax = plt.subplots(layout="constrained")
    viz.stacked_bars(ax, range(2), {"x": [1, 2], "y": [3, 4]}, colors=viz.STAGE_COLORS)
    bottoms = [p.get_y() for p in ax.patches]
    assert bottoms == [0, 0, 1, 2] and _xtick_labels(ax) == ["0", "1"]


def _toy_trace() -> IndexerTrace:
    logits = torch.tensor([[1.0, -torch.inf, -torch.inf],
                           [0.0, 2.0, -torch.inf],
                           [0.0, 0.0, 1.0]])
    return IndexerTrace(logits, torch.tensor([[0, -1], [0, 1], [0, 2]], dtype=torch.int32),
                        torch.zeros(3, dtype=torch.long), torch.arange(1, 4))


def test_selection_marks_selected_and_tied_keys():
    trace = _toy_trace()
    fig, ax = plt.subplots(layout="constrained")
    viz.plot_selection(ax, trace, cut_ties(trace))
    cat = np.asarray(ax.images[0].get_array())
    # row 2 keeps key 2 (1.0) and, of keys 0 and 1 tied at 0.0, key 0
    assert cat.tolist() == [[2, 0, 0], [2, 2, 0], [3, 4, 2]]
    _legend_covers_nothing(fig)


def test_row_scores_mark_the_tie_with_markers():
    trace = _toy_trace()
    fig, ax = plt.subplots(layout="constrained")
    viz.plot_row_scores(ax, trace, cut_ties(trace), 2)
    taken, left = ax.collections
    assert taken.get_offsets().tolist() == [[0.0, 0.0]] and left.get_offsets().tolist() == [[1.0, 0.0]]
    assert _xtick_labels(ax) == ["0", "1", "2"]
    _legend_covers_nothing(fig)


def test_scores_heatmap_leaves_non_causal_cells_blank():
    fig, ax = plt.subplots(layout="constrained")
    viz.plot_scores(ax, _toy_trace())
    data = np.ma.getdata(ax.images[0].get_array())
    assert np.isnan(data[0, 1]) and data[1, 1] == 2.0


def test_efficiency_is_relative_to_the_fastest_smallest_run():
    runs = [dict(cp_size=1, mode="in_seq", moe_backend="fused", seconds=4.0),
            dict(cp_size=2, mode="in_seq", moe_backend="fused", seconds=2.5),
            dict(cp_size=2, mode="round_robin", moe_backend="deepep", seconds=2.0),
            dict(cp_size=4, mode="in_seq", moe_backend="fused", seconds=1.25)]
    fig, ax = plt.subplots(layout="constrained")
    viz.plot_efficiency(ax, runs)
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["in_seq + fused"].get_ydata()) == [100.0, 80.0, 80.0]
    assert list(lines["round_robin + deepep"].get_ydata()) == [100.0]
    assert _xtick_labels(ax) == ["1", "2", "4"]
    viz.legend_below(ax, ncol=3)
    _legend_covers_nothing(fig)
    with pytest.raises(ValueError, match="no records"):
        viz.plot_efficiency(ax, [])


def test_legend_side_is_checked():
    fig, ax = plt.subplots()
    ax.plot([0, 1], label="x")
    viz.legend_below(ax, side="right")
    assert fig.get_layout_engine() is not None
    _legend_covers_nothing(fig)
    with pytest.raises(ValueError, match="side must be"):
        viz.legend_below(ax, side="top")
