"""The ablation table, the plots and the regression guard on synthetic results files.

The reference is arithmetic on the synthetic numbers: a grid of configurations whose TTFT is known,
then one change injected (a 2x slowdown, a partner-ratio shift inside the threshold, a missing
configuration, a new job field, noise) and the verdict each must give.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from cp_attn.sweep.guard import compare
from cp_attn.sweep.plots import FIGURES, write_plots
from cp_attn.sweep.records import Record, load_records, scaled, write_records
from cp_attn.sweep.report import label, markdown_table

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.10
SPREAD = 0.01
"""Relative half-width of the synthetic repeats' min..max range (quiet machine)."""
MACHINE = {"cpu": "Synthetic CPU", "cpus": 4, "gpu": None, "gpus": 0, "torch": "2.13.0", "triton": None}


def _rec(size: int, mode: str, moe: str, ms: float, spread: float = SPREAD, **extra) -> Record:
    config = {"model.preset": "tiny", "cp.size": size, "cp.mode": mode, "moe.backend": moe,
              "input.lengths": [37, 16, 5, 1], "repeat": 5, **extra}
    per_rank = [{"rank": r, "ms": ms, "rows": 59 // size + (r < 59 % size)} for r in range(size)]
    return Record(config, True, ttft_ms={"median": ms, "min": ms * (1 - spread), "max": ms * (1 + spread)},
                  tokens_per_s=59 / (ms / 1e3), tokens=59, sequences=4, per_rank=per_rank, machine=MACHINE,
                  commit="0" * 40)


def _grid(spread: float = SPREAD) -> list[Record]:
    """cp 1, 2, 4 x split modes x MoE backends; TTFT 100 ms / cp, deepep 5% faster at cp > 1."""
    return [_rec(c, mode, moe, 100.0 / c * (0.95 if moe == "deepep" and c > 1 else 1.0), spread)
            for c in (1, 2, 4) for mode in ("in_seq", "round_robin") for moe in ("fused", "deepep")]


def _pick(records: list[Record], size: int, mode: str, moe: str) -> Record:
    return next(r for r in records if (r.config["cp.size"], r.config["cp.mode"], r.config["moe.backend"]) == (size, mode, moe))


def _replace(records: list[Record], old: Record, new: Record) -> list[Record]:
    return [new if r is old else r for r in records]


def _report_cli(tmp: Path, results: list[Record], baseline: list[Record] | None, *extra: str) -> tuple[int, str]:
    write_records(tmp / "results.jsonl", results)
    argv = ["--results", str(tmp / "results.jsonl"), "--out-md", str(tmp / "out.md"), *extra]
    if baseline is not None:
        write_records(tmp / "baseline.jsonl", baseline)
        argv += ["--baseline", str(tmp / "baseline.jsonl")]
    main = runpy.run_path(str(ROOT / "scripts" / "report.py"))["main"]
    return main(argv), (tmp / "out.md").read_text()


# ---- the guard -----------------------------------------------------------------------------------------


def test_identical_files_pass(tmp_path):
    code, md = _report_cli(tmp_path, _grid(), _grid())
    assert code == 0 and "PASS: 12 configurations compared" in md


def test_a_2x_slowdown_of_one_config_fails_naming_it(tmp_path):
    base = _grid()
    victim = _pick(base, 4, "in_seq", "deepep")
    results = _replace(base, victim, scaled(victim, 2.0))
    v = compare(results, base, THRESHOLD)
    assert not v.ok
    assert [s.config for s in v.slower] == ["cp.size=4 cp.mode=in_seq moe.backend=deepep"]
    assert v.slower[0].change == pytest.approx(1.0)
    # it also moves deepep against fused at the same cp and mode (SGLang issue 22379), and in_seq
    # against round_robin for deepep at cp 4
    assert [(p.pair, p.worse) for p in v.shifts] == [
        ("moe.backend deepep vs fused at cp.size=4 cp.mode=in_seq", "deepep"),
        ("cp.mode round_robin vs in_seq at cp.size=4 moe.backend=deepep", "in_seq")]
    code, md = _report_cli(tmp_path, results, base)
    assert code == 1 and "slower: cp.size=4 cp.mode=in_seq moe.backend=deepep" in md


def test_a_partner_ratio_shift_inside_the_threshold_fails(tmp_path):
    base = _grid()
    ep, fused = _pick(base, 2, "round_robin", "deepep"), _pick(base, 2, "round_robin", "fused")
    results = _replace(_replace(base, ep, scaled(ep, 1.07)), fused, scaled(fused, 0.94))
    v = compare(results, base, THRESHOLD)
    assert v.slower == []  # each alone stays inside 10%
    assert [(p.pair, p.worse) for p in v.shifts] == [
        ("moe.backend deepep vs fused at cp.size=2 cp.mode=round_robin", "deepep")]
    assert v.shifts[0].change == pytest.approx(1.07 / 0.94 - 1)
    assert not v.ok
    code, _ = _report_cli(tmp_path, results, base)
    assert code == 1


def test_split_mode_pairs_are_guarded_too():
    base = _grid()
    rr, seq = _pick(base, 4, "round_robin", "fused"), _pick(base, 4, "in_seq", "fused")
    v = compare(_replace(_replace(base, rr, scaled(rr, 1.06)), seq, scaled(seq, 0.95)), base, THRESHOLD)
    assert v.slower == []
    assert [(p.pair, p.worse) for p in v.shifts] == [("cp.mode round_robin vs in_seq at cp.size=4 moe.backend=fused",
                                                      "round_robin")]


def test_a_partner_that_got_faster_is_no_regression():
    base = _grid()
    fused = _pick(base, 2, "in_seq", "fused")
    v = compare(_replace(base, fused, scaled(fused, 1 / 3)), base, THRESHOLD)
    assert v.ok, v.text()
    assert [s.config for s in v.faster] == ["cp.size=2 cp.mode=in_seq moe.backend=fused"]
    assert any("because fused got faster" in n for n in v.notes)


def test_noise_alone_does_not_fail():
    base = _grid(spread=0.15)
    # every config 12% slower by median, but the repeats' ranges overlap the baseline's
    v = compare([scaled(r, 1.12) for r in base], base, THRESHOLD)
    assert v.ok, v.text()
    # the same shift on a quiet machine is a regression
    quiet = _grid()
    assert len(compare([scaled(r, 1.12) for r in quiet], quiet, THRESHOLD).slower) == 12


def test_missing_configs_are_listed_and_a_vanished_one_fails(tmp_path):
    base = _grid()
    gone = _pick(base, 2, "in_seq", "fused")
    results = [r for r in base if r is not gone] + [_rec(8, "in_seq", "fused", 14.0)]
    v = compare(results, base, THRESHOLD)
    assert v.missing == ["cp.size=2 cp.mode=in_seq moe.backend=fused"]
    assert v.new == ["cp.size=8 cp.mode=in_seq moe.backend=fused"]
    assert not v.ok
    only_new = compare(base + [_rec(8, "in_seq", "fused", 14.0)], base, THRESHOLD)
    assert only_new.ok and only_new.new and not only_new.missing
    code, md = _report_cli(tmp_path, results, base)
    assert code == 1 and "missing from the results: cp.size=2 cp.mode=in_seq moe.backend=fused" in md


def test_a_config_that_now_fails_fails_the_guard():
    base = _grid()
    old = _pick(base, 2, "in_seq", "deepep")
    broken = Record(old.config, False, reason="torch.OutOfMemoryError: CUDA out of memory", machine=MACHINE)
    v = compare(_replace(base, old, broken), base, THRESHOLD)
    assert v.now_failing == [("cp.size=2 cp.mode=in_seq moe.backend=deepep", broken.reason)] and not v.ok


def test_a_job_field_added_since_the_baseline_still_matches():
    base = _grid()
    results = [Record(**{**r.__dict__, "config": {**r.config, "kv_dtype": "bf16"}}) for r in base]
    v = compare(results, base, THRESHOLD)
    assert v.ok and v.matched == 12 and not v.new and not v.missing


def test_a_rerun_replaces_the_earlier_record():
    base = _grid()
    slow = scaled(_pick(base, 1, "in_seq", "fused"), 3.0)
    assert compare(base + [slow], base, THRESHOLD).slower  # the later record is the one compared
    assert compare([slow] + base, base, THRESHOLD).ok


# ---- the table -----------------------------------------------------------------------------------------


def test_table_marks_failures_with_shared_footnotes_and_gives_speedups():
    recs = _grid()
    oom = "torch.OutOfMemoryError: CUDA out of memory"
    for size in (2, 4):
        old = _pick(recs, size, "round_robin", "deepep")
        recs = _replace(recs, old, Record(old.config, False, reason=oom, machine=MACHINE))
    aborted = _pick(recs, 1, "in_seq", "fused")  # ran and reported, then a rank aborted in teardown
    recs = _replace(recs, aborted, Record(**{**aborted.__dict__, "exit_error": "rank 1 killed by SIGABRT"}))
    md = markdown_table(recs)
    rows = {line.split(" | ")[0].strip("| ") + " " + " ".join(line.split(" | ")[1:3]): line
            for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    header = md.splitlines()[0]
    assert header.startswith("| cp.size | cp.mode | moe.backend | tokens | runs | TTFT ms")
    assert header.endswith("| vs cp 1 | vs other backend | vs other mode |")
    assert md.count("❌[^2]") == 2 and md.count(f"[^2]: {oom}") == 1
    assert "| 1 | in_seq | fused | 59 | ✅[^1] | 100 |" in md
    assert "[^1]: ran, then failed on exit: rank 1 killed by SIGABRT" in md
    cells = [c.strip() for c in rows["4 in_seq deepep"].strip("|").split("|")]
    # TTFT 25 * 0.95 ms; cp 1 ran in 100 ms; fused at cp 4 in 25 ms; round_robin deepep did not run
    assert cells[3:] == ["59", "✅", "23.75", "23.51..23.99", "2,484", "4.21x", "1.05x", ""]
    assert "model.preset=tiny" in md and "All rows" in md


def test_labels_name_only_what_varies():
    recs = [_rec(2, "in_seq", "fused", 10.0)]
    assert label(recs[0].config, []) == "the only configuration"


# ---- plots ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_legends_sit_outside_every_axes(name):
    longer = [_rec(c, "in_seq", "fused", 300.0 / c, ) for c in (1, 2, 4)]
    recs = _grid() + [Record(**{**r.__dict__, "config": {**r.config, "input.lengths": [177]}, "tokens": 177})
                      for r in longer]
    fig = FIGURES[name](recs)
    FigureCanvasAgg(fig).draw()
    legends = [leg for ax in fig.axes if (leg := ax.get_legend()) is not None]
    assert legends
    for leg in legends:
        for ax in fig.axes:
            assert not leg.get_window_extent().overlaps(ax.get_window_extent()), f"{name}: legend over axes"


def test_write_plots_and_the_cli_write_pngs(tmp_path):
    assert [p.name for p in write_plots(_grid(), tmp_path / "a")] == ["ttft.png", "speedup.png", "per_rank.png"]
    code, _ = _report_cli(tmp_path, _grid(), None, "--plots", str(tmp_path / "b"))
    assert code == 0
    for p in (tmp_path / "b").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_files_round_trip(tmp_path):
    write_records(tmp_path / "r.jsonl", _grid())
    assert load_records(tmp_path / "r.jsonl") == _grid()
    (tmp_path / "bad.jsonl").write_text('{"config": {}, "runnable": true}\n{"oops"\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_records(tmp_path / "bad.jsonl")
