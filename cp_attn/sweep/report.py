"""Ablation tables from sweep records, in the style of SGLang's DeepSeek ablation doc.

One row per configuration: the keys that vary across the sweep, whether it runs (✅, or ❌ with the
reason in a footnote), TTFT (median and the min..max of the repeats), tokens/s, and speed-ups:
over the cp = 1 run of the same configuration, and over its partners, the other split mode and
the other MoE backend at the same size and input. A speed-up over X is X's TTFT over this one's,
so above 1 means this configuration is faster.

Configurations are identified by their config dict minus the keys that do not change what is timed
(`NOT_IDENTITY`); when two files are compared, keys that only one file knows (fields added to the
job between the two) are left out too.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

from cp_attn.sweep.records import Record

NOT_IDENTITY = ("output.logits", "timeout_s", "check", "repeat", "report")
"""Config keys that do not change what is timed: records differing only in these are the same configuration."""

PARTNERS = {"moe.backend": ("deepep", "fused"), "cp.mode": ("round_robin", "in_seq")}
"""key -> the two values whose runs are compared at otherwise equal configurations (SGLang issue
22379: the expert-parallel path slowed 6x while the other stayed)."""

SAME_AT_CP1 = ("cp.mode", "moe.backend", "moe.deepep_impl")
"""Keys that do not change the computation on one rank: any cp = 1 run is the reference for them."""

KEY_ORDER = ("model.preset", "model.checkpoint", "cp.size", "cp.mode", "moe.backend", "moe.deepep_impl",
             "kernels", "kv_dtype", "model.dtype", "input.lengths", "input.file", "device")
"""Columns come in this order, then any other varying key alphabetically."""

INPUT_KEYS = ("input.lengths", "input.file", "input.seed")


# ---- identity and lookup ----------------------------------------------------------------------------


def identity_keys(*groups: Sequence[Record]) -> list[str]:
    """Keys that identify a configuration: present in every group (file), minus NOT_IDENTITY."""
    sets = [set().union(*(r.config for r in g)) for g in groups if g]
    common = set.intersection(*sets) if sets else set()
    return sorted(common - set(NOT_IDENTITY))


def config_id(config: dict[str, Any], keys: Sequence[str], drop: Iterable[str] = ()) -> str:
    """A hashable name of `config` over `keys` (minus `drop`)."""
    drop = set(drop)
    return json.dumps({k: config.get(k) for k in keys if k not in drop}, sort_keys=True)


def latest(records: Sequence[Record], keys: Sequence[str] | None = None) -> list[Record]:
    """One record per configuration, the last one in file order (a rerun replaces the earlier run)."""
    keys = identity_keys(records) if keys is None else keys
    by_id = {config_id(r.config, keys): r for r in records}
    return list(by_id.values())


def varying_keys(records: Sequence[Record], keys: Sequence[str] | None = None) -> list[str]:
    """The identity keys whose value differs between records, in KEY_ORDER."""
    keys = identity_keys(records) if keys is None else keys
    vary = [k for k in keys if len({json.dumps(r.config.get(k)) for r in records}) > 1]
    return sorted(vary, key=lambda k: (KEY_ORDER.index(k) if k in KEY_ORDER else len(KEY_ORDER), k))


def label(config: dict[str, Any], keys: Sequence[str]) -> str:
    """'cp.size=2 cp.mode=in_seq' over `keys` (the varying ones), or 'the only configuration'."""
    return " ".join(f"{k}={fmt_value(config.get(k))}" for k in keys) or "the only configuration"


def fmt_value(v: Any) -> str:
    """A config value as it is spelled on the command line: in_seq, 2, [37,16], null, true."""
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def find(records: Sequence[Record], config: dict[str, Any], keys: Sequence[str], changes: dict[str, Any],
         ignore: Iterable[str] = ()) -> Record | None:
    """The record whose config equals `config` with `changes` applied ({'cp.size': 1}), comparing
    only `keys` minus `ignore`; None when there is none."""
    want = {**config, **changes}
    target = config_id(want, keys, ignore)
    for r in records:
        if config_id(r.config, keys, ignore) == target:
            return r
    return None


def partner(records: Sequence[Record], rec: Record, key: str, keys: Sequence[str]) -> Record | None:
    """The other value of a PARTNERS key at an otherwise equal configuration."""
    a, b = PARTNERS[key]
    value = rec.config.get(key)
    if value not in (a, b):
        return None
    return find(records, rec.config, keys, {key: b if value == a else a})


def cp1_reference(records: Sequence[Record], rec: Record, keys: Sequence[str]) -> Record | None:
    """The cp = 1 run of `rec`'s configuration: the same split mode and backend when it was run,
    else any cp = 1 run that differs only in them (on one rank they compute the same thing)."""
    return (find(records, rec.config, keys, {"cp.size": 1})
            or find(records, rec.config, keys, {"cp.size": 1}, ignore=SAME_AT_CP1))


def speedup(ref: Record | None, rec: Record) -> float | None:
    """ref's median TTFT over rec's (> 1: rec is faster); None unless both ran."""
    if ref is None or not (ref.runnable and rec.runnable and ref.ttft_ms and rec.ttft_ms):
        return None
    return ref.ttft_ms["median"] / rec.ttft_ms["median"]


# ---- the table -------------------------------------------------------------------------------------


def _sort_key(rec: Record, keys: Sequence[str]) -> tuple:
    def one(v: Any) -> tuple:
        if isinstance(v, bool) or v is None:
            return (2, str(v))
        if isinstance(v, (int, float)):
            return (0, v)
        if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            return (0, sum(v), str(v))
        return (1, str(v))

    return tuple(one(rec.config.get(k)) for k in keys)


def sorted_records(records: Sequence[Record], keys: Sequence[str]) -> list[Record]:
    return sorted(records, key=lambda r: _sort_key(r, keys))


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(records: Sequence[Record]) -> str:
    """The ablation table (GitHub markdown, with footnotes for the reasons a configuration fails)."""
    records = latest(records)
    if not records:
        return "(no records)\n"
    keys = identity_keys(records)
    vary = varying_keys(records, keys)
    partners = [k for k in PARTNERS if k in vary]
    head = [*vary, "tokens", "runs", "TTFT ms", "min..max ms", "tokens/s", "vs cp 1",
            *[f"vs other {k.split('.')[-1]}" for k in partners]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: dict[str, int] = {}
    for rec in sorted_records(records, vary):
        cells = [_cell(fmt_value(rec.config.get(k))) for k in vary]
        if rec.runnable:
            t = rec.ttft_ms
            mark = "✅"
            if rec.exit_error:
                mark += f"[^{notes.setdefault(f'ran, then failed on exit: {rec.exit_error}', len(notes) + 1)}]"
            cells += [str(rec.tokens), mark, f"{t['median']:.4g}", f"{t['min']:.4g}..{t['max']:.4g}",
                      f"{rec.tokens_per_s:,.0f}", _x(speedup(cp1_reference(records, rec, keys), rec))]
            cells += [_x(speedup(partner(records, rec, k, keys), rec)) for k in partners]
        else:
            n = notes.setdefault(rec.reason or "unknown", len(notes) + 1)
            cells += ["", f"❌[^{n}]", "", "", "", ""] + [""] * len(partners)
        lines.append("| " + " | ".join(cells) + " |")
    fixed = [k for k in keys if k not in vary]
    if fixed:
        lines += ["", "All rows: " + ", ".join(f"`{k}={fmt_value(records[0].config.get(k))}`" for k in fixed) + "."]
    lines += [""] + [f"[^{n}]: {_cell(reason)}" for reason, n in notes.items()]
    return "\n".join(lines).rstrip() + "\n"


def hardware(rec: Record) -> str:
    """'4x NVIDIA H200' or 'AMD EPYC (2 CPUs)'."""
    m = rec.machine or {}
    return f"{m.get('gpus')}x {m['gpu']}" if m.get("gpu") else f"{m.get('cpu')} ({m.get('cpus')} CPUs)"


def machines(records: Sequence[Record]) -> list[str]:
    """The distinct machines and code versions of some records, one line each."""
    out = []
    for r in records:
        m = r.machine or {}
        line = f"{hardware(r)}, torch {m.get('torch')}, triton {m.get('triton')}, commit {str(r.commit)[:12]}"
        if line not in out:
            out.append(line)
    return out


def load_summary(records: Sequence[Record]) -> str | None:
    """'1-minute load average 0.8..5.2 while the jobs ran' when the records carry it."""
    loads = [r.machine["load_1m"] for r in records if (r.machine or {}).get("load_1m") is not None]
    return f"1-minute load average {min(loads):g}..{max(loads):g} while the jobs ran" if loads else None


def render_markdown(records: Sequence[Record]) -> str:
    """The table, then the machines and load it ran on: what scripts/report.py prints and
    docs/benchmarks.md shows (scripts/bench_tables.py)."""
    load = load_summary(records)
    return markdown_table(records) + "\nMachine: " + "; ".join(machines(records)) + (f" ({load})" if load else "") + "\n"
