"""Sweep prefill configurations: one torchrun job per configuration, one JSON record per job.

    python scripts/sweep.py -m cp.size=1,2 cp=in_seq,round_robin moe=fused,deepep repeat=5 results=outputs/sweep.jsonl
    python scripts/sweep.py -m +experiment=cpu_tiny results=outputs/sweep.jsonl  # a preset grid (conf/experiment/)
    python scripts/report.py --results outputs/sweep.jsonl  # table, plots, guard

Run it without torchrun: each job starts its own `cp.size` ranks (gloo on CPU, NCCL on GPUs).
Every field of scripts/prefill.py's config can be swept; `job_timeout_s` bounds each job.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cp_attn.runconfig import register_resolvers
from cp_attn.sweep.job import run_sweep_job

register_resolvers()
PREFILL = Path(__file__).resolve().with_name("prefill.py")


@hydra.main(version_base="1.3", config_path="../conf", config_name="sweep")
def main(cfg: DictConfig):
    return run_sweep_job(cfg, HydraConfig.get().runtime.output_dir, PREFILL)


if __name__ == "__main__":
    main()
