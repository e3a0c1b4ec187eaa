"""One JSON line per sweep job: what ran, whether it ran, how fast, and where.

A results file is JSON lines of `Record`s, appended as jobs finish. The same configuration may
appear more than once (a rerun appends); readers keep the last record of each configuration.
"""

from __future__ import annotations

import copy
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from cp_attn.atomic import write_text


@dataclass
class Record:
    config: dict[str, Any]
    """The job's whole run configuration as a flat dict with dotted keys ('cp.size': 2)."""
    runnable: bool
    """Whether the job finished and reported."""
    reason: Optional[str] = None
    """Why it did not: the exception line ('ValueError: ...'), 'OOM: ...', 'timeout: ...', a signal."""
    ttft_ms: Optional[dict[str, float]] = None
    """{median, min, max} over the timed forwards: the prefill, embedding to final hidden states."""
    tokens_per_s: Optional[float] = None
    """Tokens of the batch over the median TTFT."""
    tokens: Optional[int] = None
    """Tokens in the batch (all sequences)."""
    sequences: Optional[int] = None
    per_rank: Optional[list[dict[str, Any]]] = None
    """[{rank, ms, rows}]: each rank's median time to the end of its forward, and its real rows."""
    stages_ms: Optional[dict[str, float]] = None
    """Rank 0's time per stage and forward (stages=true), else None."""
    check: Optional[dict[str, float]] = None
    """{max_abs_diff, rel_l2_diff, argmax_match} against the single-process forward (check=true)."""
    machine: dict[str, Any] = field(default_factory=dict)
    """CPU model and count, GPU name and count, torch and triton versions; the 1-minute load average
    when the job ended (`load_1m`: above the CPU count, other work shared the cores)."""
    commit: Optional[str] = None
    """`git rev-parse HEAD` of the code that ran, '+dirty' when the tree had changes."""
    time: Optional[str] = None
    """When the job started (UTC, ISO 8601)."""
    wall_s: Optional[float] = None
    """The job's wall time, start-up included."""
    log: Optional[str] = None
    """The job's log (its ranks' stdout and stderr)."""
    exit_error: Optional[str] = None
    """Set when the job failed only after rank 0 had written its complete report (a rank aborting in
    process-group teardown, say): the configuration ran and its numbers stand, the exit did not."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Record":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def from_report(config: dict[str, Any], report: Mapping[str, Any], **meta: Any) -> Record:
    """The record of a job that ran, from the JSON report of cp_attn.job.run_job (rank 0's)."""
    times = report.get("times_s") or [report["seconds"]]
    ms = [1e3 * t for t in times]
    median = statistics.median(ms)
    check = {k: report[k] for k in ("max_abs_diff", "rel_l2_diff", "argmax_match") if report.get(k) is not None}
    machine = dict(meta.pop("machine", {}))
    if report.get("device_name") and not machine.get("gpu"):
        machine["gpu"] = report["device_name"]
    return Record(
        config=config,
        runnable=True,
        ttft_ms={"median": round(median, 4), "min": round(min(ms), 4), "max": round(max(ms), 4)},
        tokens_per_s=round(report["tokens"] / (median / 1e3), 1),
        tokens=report["tokens"],
        sequences=report.get("sequences"),
        per_rank=[{"rank": r["rank"], "ms": round(1e3 * r["seconds"], 4), "rows": r["rows"]}
                  for r in report.get("per_rank", [])],
        stages_ms={k: round(1e3 * v, 4) for k, v in report["stages_s"].items()} if "stages_s" in report else None,
        check=check or None,
        machine=machine,
        **meta,
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'cp': {'size': 2}} -> {'cp.size': 2}; lists stay values. An empty mapping leaves no key."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def append_record(path: str | Path, record: Record) -> None:
    """Append one line in one write, flushed to disk: a crash never leaves half a record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(record.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_records(path: str | Path) -> list[Record]:
    """Every record of a results file, in file order; ValueError naming the line for a bad one."""
    records = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(Record.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}:{i} is not a sweep record: {e}") from None
    return records


def scaled(record: Record, factor: float) -> Record:
    """A copy of `record` as if every timed forward took `factor` times as long (for what-ifs and
    for checking the guard: a 2x slowdown is scaled(r, 2.0))."""
    r = copy.deepcopy(record)
    if r.ttft_ms:
        r.ttft_ms = {k: v * factor for k, v in r.ttft_ms.items()}
    if r.tokens_per_s:
        r.tokens_per_s = r.tokens_per_s / factor
    for pr in r.per_rank or []:
        pr["ms"] *= factor
    if r.stages_ms:
        r.stages_ms = {k: v * factor for k, v in r.stages_ms.items()}
    return r


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    """A whole results file at once (under a temporary name, then renamed)."""
    write_text(path, "".join(r.to_json() + "\n" for r in records))


# ---- where it ran -------------------------------------------------------------------------------


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1)
def machine_info() -> dict[str, Any]:
    """CPU model and count, GPU name and count, torch and triton versions. The sweep's own process
    never touches CUDA (the GPUs belong to the jobs): the name comes from nvidia-smi, and a job's
    report fills it in where nvidia-smi is missing (see from_report)."""
    import torch

    gpus = torch.cuda.device_count()
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "gpu": _gpu_name() if gpus else None,
        "gpus": gpus,
        "torch": torch.__version__,
        "triton": _version("triton"),
    }


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def git_commit(repo: str | Path) -> str | None:
    """HEAD of the git checkout at `repo`, with '+dirty' when tracked files differ from it; None
    outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")
