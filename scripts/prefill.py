"""Context-parallel prefill of DeepSeek V3.2 under torchrun (CP size = world size).

    torchrun --nproc-per-node 2 scripts/prefill.py                       # tiny random model, CPU, gloo
    torchrun --nproc-per-node 4 scripts/prefill.py cp=round_robin moe=deepep check=true
    torchrun --nproc-per-node 4 scripts/prefill.py model.checkpoint=DIR input.file=prompts.json output.logits=out.pt

Rank 0 prints one JSON line with the report. gloo on CPU and NCCL on GPU are chosen automatically.
"""

from __future__ import annotations

import json
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from cp_attn.comm import destroy_distributed, init_distributed
from cp_attn.job import run_job
from cp_attn.runconfig import PrefillConfig

# Hydra writes its .hydra/ folder from rank 0 only; every rank shares one run dir.
OmegaConf.register_new_resolver("rank_zero_only", lambda v: v if os.environ.get("RANK", "0") == "0" else None, replace=True)


def to_config(cfg: DictConfig) -> PrefillConfig:
    """Validate the composed YAML against the dataclasses (unknown keys and wrong types fail)."""
    schema = OmegaConf.structured(PrefillConfig)
    merged = OmegaConf.merge(schema, OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    return OmegaConf.to_object(merged)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_cfg = to_config(cfg)
    comm = init_distributed(run_cfg.backend, run_cfg.timeout_s)
    try:
        report = run_job(run_cfg, comm)
        if comm.rank == 0:
            print(json.dumps(report), flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
