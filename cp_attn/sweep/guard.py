"""The regression guard: compare a results file against a baseline and say what got worse.

It fails on
- a configuration that got slower by more than the threshold (median TTFT), beyond noise;
- a pair of partner configurations (cp_attn.sweep.report.PARTNERS: the deepep path against the fused
  one at the same cp and input, as in SGLang issue 22379; round_robin against in_seq) whose TTFT ratio
  moved by more than the threshold against one of them, beyond noise, even when each alone stays
  inside the threshold; unless the other got faster by more than the threshold, which explains the
  move (it is listed as a note);
- a configuration that ran in the baseline and fails now;
- a configuration of the baseline with no result now (a regression can hide in a configuration
  that is no longer measured).
Configurations only the results have, and configurations that got faster, are listed and do not fail it.

Noise: every record carries the min and max of its repeats. A change counts only when the ranges
do not overlap: for a configuration, the fastest repeat now is slower than the slowest baseline
repeat; for a pair, the range of possible ratios now (a.min / b.max .. a.max / b.min) lies wholly
outside the baseline's. With one repeat, min = max and only the threshold applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from cp_attn.sweep.records import Record
from cp_attn.sweep.report import (
    PARTNERS, config_id, hardware, identity_keys, label, latest, partner, varying_keys,
)


@dataclass
class Change:
    """A configuration whose median TTFT moved beyond the threshold and the noise."""

    config: str
    base_ms: float
    now_ms: float

    @property
    def change(self) -> float:
        return self.now_ms / self.base_ms - 1


@dataclass
class PairShift:
    pair: str
    """'moe.backend deepep vs fused at cp.size=2 ...'."""
    base_ratio: float
    now_ratio: float
    """TTFT of the first partner over the second's, in the baseline and now."""
    worse: str
    """The partner that got slower relative to the other."""

    @property
    def change(self) -> float:
        return self.now_ratio / self.base_ratio - 1


@dataclass
class Verdict:
    threshold: float
    matched: int = 0
    """Configurations found on both sides."""
    slower: list[Change] = field(default_factory=list)
    shifts: list[PairShift] = field(default_factory=list)
    faster: list[Change] = field(default_factory=list)
    """Configurations faster by more than the threshold, beyond noise (listed, not failing)."""
    now_failing: list[tuple[str, str]] = field(default_factory=list)
    """(configuration, reason) that ran in the baseline and fail now."""
    missing: list[str] = field(default_factory=list)
    """Configurations of the baseline with no record in the results."""
    new: list[str] = field(default_factory=list)
    """Configurations of the results with no record in the baseline (listed, not failing)."""
    fixed: list[str] = field(default_factory=list)
    """Configurations that failed in the baseline and run now."""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.slower or self.shifts or self.now_failing or self.missing)

    def text(self) -> str:
        t = f"{self.threshold:.0%}"
        out = [f"{'PASS' if self.ok else 'FAIL'}: {self.matched} configurations compared, threshold {t}"]
        out += [f"  slower: {s.config}: {s.base_ms:.4g} -> {s.now_ms:.4g} ms ({s.change:+.0%})" for s in self.slower]
        out += [f"  partner shift: {p.pair}: TTFT ratio {p.base_ratio:.3f} -> {p.now_ratio:.3f} ({p.change:+.0%}), "
                f"{p.worse} got slower relative to its partner" for p in self.shifts]
        out += [f"  now failing: {c}: {r}" for c, r in self.now_failing]
        out += [f"  faster: {s.config}: {s.base_ms:.4g} -> {s.now_ms:.4g} ms ({s.change:+.0%})" for s in self.faster]
        out += [f"  missing from the results: {c}" for c in self.missing]
        out += [f"  new (no baseline): {c}" for c in self.new]
        out += [f"  fixed (failed in the baseline): {c}" for c in self.fixed]
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def _ran(r: Record | None) -> bool:
    return r is not None and r.runnable and bool(r.ttft_ms)


def is_slower(base: Record, now: Record, threshold: float) -> bool:
    """Median TTFT up by more than the threshold, and the repeats' ranges apart."""
    b, n = base.ttft_ms, now.ttft_ms
    return n["median"] > b["median"] * (1 + threshold) and n["min"] > b["max"]


def is_faster(base: Record, now: Record, threshold: float) -> bool:
    """The mirror of is_slower."""
    return is_slower(now, base, threshold)


def _ratio_range(a: Record, b: Record) -> tuple[float, float, float]:
    """(low, median, high) of a's TTFT over b's."""
    ta, tb = a.ttft_ms, b.ttft_ms
    return ta["min"] / tb["max"], ta["median"] / tb["median"], ta["max"] / tb["min"]


def is_shifted(base: tuple[float, float, float], now: tuple[float, float, float], threshold: float) -> bool:
    """The ratio moved by more than the threshold either way, and the ranges are apart."""
    moved = now[1] > base[1] * (1 + threshold) or now[1] * (1 + threshold) < base[1]
    return moved and (now[0] > base[2] or now[2] < base[0])


def compare(results: Sequence[Record], baseline: Sequence[Record], threshold: float = 0.10) -> Verdict:
    """The verdict on `results` against `baseline` (see the module docstring)."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    keys = identity_keys(results, baseline)
    now, base = latest(results, keys), latest(baseline, keys)
    vary = varying_keys([*now, *base], keys)
    now_by = {config_id(r.config, keys): r for r in now}
    base_by = {config_id(r.config, keys): r for r in base}
    v = Verdict(threshold)
    for cid, b in base_by.items():
        name = label(b.config, vary)
        n = now_by.get(cid)
        if n is None:
            v.missing.append(name)
            continue
        v.matched += 1
        if _ran(b) and not _ran(n):
            v.now_failing.append((name, n.reason or "unknown"))
        elif _ran(n) and not _ran(b):
            v.fixed.append(name)
        elif _ran(b) and is_slower(b, n, threshold):
            v.slower.append(Change(name, b.ttft_ms["median"], n.ttft_ms["median"]))
        elif _ran(b) and is_faster(b, n, threshold):
            v.faster.append(Change(name, b.ttft_ms["median"], n.ttft_ms["median"]))
    v.new = [label(n.config, vary) for cid, n in now_by.items() if cid not in base_by]

    for key, (first, second) in PARTNERS.items():
        for a_now in now:
            if a_now.config.get(key) != first:
                continue
            b_now = partner(now, a_now, key, keys)
            a_base, b_base = base_by.get(config_id(a_now.config, keys)), None
            if a_base is not None:
                b_base = partner(base, a_base, key, keys)
            if not all(map(_ran, (a_now, b_now, a_base, b_base))):
                continue
            r_base, r_now = _ratio_range(a_base, b_base), _ratio_range(a_now, b_now)
            if not is_shifted(r_base, r_now, threshold):
                continue
            a_worse = r_now[1] > r_base[1]
            at = label(a_now.config, [k for k in vary if k != key])
            shift = PairShift(f"{key} {first} vs {second} at {at}", r_base[1], r_now[1], first if a_worse else second)
            better_base, better_now = (b_base, b_now) if a_worse else (a_base, a_now)
            if is_faster(better_base, better_now, threshold):  # the partner improved: no regression
                v.notes.append(f"{shift.pair}: TTFT ratio {shift.base_ratio:.3f} -> {shift.now_ratio:.3f} "
                               f"because {second if a_worse else first} got faster")
            else:
                v.shifts.append(shift)

    hw_now, hw_base = {hardware(r) for r in now}, {hardware(r) for r in base}
    if hw_now != hw_base:
        v.notes.append(f"different machines: results on {'; '.join(sorted(hw_now))}, "
                       f"baseline on {'; '.join(sorted(hw_base))}")
    return v
