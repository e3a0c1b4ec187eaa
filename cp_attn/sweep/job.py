"""One job of a sweep: the configuration Hydra composed for it -> one torchrun prefill -> one record.

The sweep's config (conf/sweep.yaml, `SweepConfig`) is the prefill job's config (conf/config.yaml,
`PrefillConfig`) plus the sweep's own fields, so every field of the job, today's and those added
later, is a sweep dimension with no change here. Each job writes its whole resolved run
configuration to `<job dir>/prefill_job.yaml` and starts scripts/prefill.py on it under torchrun:
the job runs exactly the configuration its record names, however Hydra composed it (groups,
experiments, sweeper params).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cp_attn.layout import canonical_mode
from cp_attn.runconfig import PrefillConfig
from cp_attn.sweep.launch import run_torchrun
from cp_attn.sweep.records import Record, append_record, flatten, from_report, git_commit, machine_info, now_utc

JOB_CONFIG = "prefill_job"
"""Name of the run configuration each job writes into its directory (a Hydra primary config)."""


@dataclass
class SweepConfig(PrefillConfig):
    """The prefill job's fields, plus:"""

    results: str = "outputs/sweep.jsonl"
    """JSON-lines file every job appends its record to (cp_attn.sweep.records.Record)."""
    job_timeout_s: float = 600.0
    """Wall-clock limit of one job, start-up included; past it the job's processes are killed and
    the job is recorded as a timeout."""


SWEEP_FIELDS = tuple(f.name for f in fields(SweepConfig) if f.name not in {g.name for g in fields(PrefillConfig)})
"""The sweep's own fields; everything else is the prefill job's."""


def split_config(cfg: DictConfig) -> tuple[SweepConfig, PrefillConfig]:
    """The composed config (its `hydra` node aside) checked against SweepConfig, and its prefill part."""
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    sweep = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), body))
    run = PrefillConfig(**{f.name: getattr(sweep, f.name) for f in fields(PrefillConfig)})
    return sweep, run


def job_run_config(run: PrefillConfig, report: Path) -> PrefillConfig:
    """The run as the job will see it: cp.size filled in (it is the rank count: 1 when unset), the
    split mode under its canonical name (so aliases match in reports), the report file set."""
    cp = run.cp
    try:
        cp.mode = canonical_mode(cp.mode)
    except ValueError:
        pass  # the job itself refuses it, and the record keeps what was asked for
    cp.size = cp.size or 1
    run.report = str(report)
    return run


def record_config(run: PrefillConfig) -> dict:
    """The flat dotted configuration a record carries (without the per-job report path)."""
    flat = flatten(asdict(run))
    flat.pop("report", None)
    return flat


def job_config_yaml(run: PrefillConfig, run_dir: Path) -> str:
    """A Hydra primary config for scripts/prefill.py: conf/config.yaml (its defaults and hydra
    settings), then every run field at the value this job composed; the prefill's own Hydra run
    directory inside the job's."""
    doc = {"defaults": ["config", "_self_"], **OmegaConf.to_container(OmegaConf.structured(run)),
           "hydra": {"run": {"dir": str(run_dir)}}}
    return OmegaConf.to_yaml(OmegaConf.create(doc))


def run_sweep_job(cfg: DictConfig, job_dir: str | Path, script: str | Path) -> Record:
    """Run the prefill `script` under torchrun for the configuration `cfg`, bounded by
    `job_timeout_s`; append the record to `results` and return it. A job that fails or hangs is a
    record with runnable=false and a reason, never an exception; one that fails after writing its
    report is runnable, with the failure in `exit_error`."""
    job_dir = Path(job_dir).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    sweep, run = split_config(cfg)
    report = job_dir / "report.json"
    report.unlink(missing_ok=True)
    run = job_run_config(run, report)
    (job_dir / f"{JOB_CONFIG}.yaml").write_text(job_config_yaml(run, job_dir / "prefill"))

    started = now_utc()
    log = job_dir / "job.log"
    result = run_torchrun(run.cp.size, script, ["--config-dir", str(job_dir), "--config-name", JOB_CONFIG],
                          timeout_s=sweep.job_timeout_s, log_path=log)
    machine = {**machine_info(), "load_1m": round(os.getloadavg()[0], 2)}  # how busy the machine was
    meta = dict(machine=machine, commit=git_commit(Path(script).resolve().parent), time=started,
                wall_s=round(result.seconds, 2), log=str(log))
    config = record_config(run)
    if report.is_file():  # written after the last timed forward and the check: the run is complete
        record = from_report(config, json.loads(report.read_text()), **meta)
        record.exit_error = None if result.ok else result.reason
    else:
        record = Record(config, runnable=False, reason=result.reason or "the job wrote no report", **meta)
    append_record(sweep.results, record)
    return record
