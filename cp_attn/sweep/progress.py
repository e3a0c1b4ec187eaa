"""A progress bar over the jobs of a sweep, as a Hydra callback (conf/sweep.yaml, hydra.callbacks).

Hydra's basic sweeper runs the jobs one after another in this process; the callback counts them the
way the sweeper expands them (hydra.sweeper.params, then the command line's sweeps) and prints one
line per finished job: its overrides, ✅ and its TTFT, or ❌ and the reason.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cp_attn.sweep.job import SWEEP_FIELDS


def count_jobs(config: DictConfig) -> int:
    """How many jobs a multirun of `config` (its top-level config, with hydra.overrides.task and
    hydra.sweeper.params) launches: the product of every swept key's number of values."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(config, "hydra.overrides.task") or [])
    per_key: dict[str, int] = {}
    for o in OverridesParser.create().parse_overrides(lines):
        per_key[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    total = 1
    for n in per_key.values():
        total *= n
    return total


def describe(job_return: Any) -> str:
    """'✅ 12.3 ms (9 ms .. 14 ms)' or '❌ reason' for a finished job."""
    if job_return.status != JobStatus.COMPLETED:
        err = job_return._return_value  # the exception the task function raised
        return f"❌ sweep error: {type(err).__name__}: {err}"
    rec = job_return.return_value
    if not rec.runnable:
        return f"❌ {rec.reason}"
    t = rec.ttft_ms
    then = f"; then, on exit: {rec.exit_error}" if rec.exit_error else ""
    return f"✅ {t['median']:.4g} ms ({t['min']:.4g} .. {t['max']:.4g}), {rec.tokens_per_s:,.0f} tok/s{then}"


class SweepProgress(Callback):
    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.results: str | None = None
        self.ran = self.failed = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.results = OmegaConf.select(config, "results")
        self.bar = tqdm(total=count_jobs(config), unit="job", desc="sweep", dynamic_ncols=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        ok = job_return.status == JobStatus.COMPLETED and job_return.return_value.runnable
        self.ran, self.failed = self.ran + ok, self.failed + (not ok)
        shown = [o for o in job_return.overrides if o.split("=")[0].lstrip("+~") not in SWEEP_FIELDS]
        num = OmegaConf.select(config, "hydra.job.num")  # None outside a multirun
        line = f"{'' if num is None else f'#{num} '}{' '.join(shown) or '(defaults)'}: {describe(job_return)}"
        tqdm.write(line)
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        print(f"{self.ran} ran, {self.failed} did not; records appended to {self.results}\n"
              f"table, plots and guard: python scripts/report.py --results {self.results}", flush=True)
