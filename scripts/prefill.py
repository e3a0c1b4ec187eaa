"""Context-parallel prefill of DeepSeek V3.2 under torchrun (CP size = world size).

    torchrun --nproc-per-node 2 scripts/prefill.py                       # tiny random model, CPU, gloo
    torchrun --nproc-per-node 4 scripts/prefill.py cp=round_robin moe=deepep check=true
    torchrun --nproc-per-node 4 scripts/prefill.py model.checkpoint=DIR input.file=prompts.json output.logits=out.pt

Rank 0 prints one JSON line with the report. gloo on CPU and NCCL on GPU are chosen automatically.
A refused request exits 1 with one line naming the bad value, the last thing torchrun prints
(cp_attn.cli); other errors keep their traceback.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from cp_attn.cli import reasons_last, run_hydra_main
from cp_attn.comm import destroy_distributed, init_distributed
from cp_attn.job import run_job
from cp_attn.runconfig import from_omegaconf, refuse_multirun_under_torchrun, register_resolvers

register_resolvers()  # ${rank_zero_only:...}: every rank shares one run dir, only rank 0 writes .hydra/


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    refuse_multirun_under_torchrun()  # sweeps: scripts/sweep.py, one torchrun job per configuration
    with reasons_last():
        run_cfg = from_omegaconf(cfg)
        comm = init_distributed(run_cfg.backend, run_cfg.timeout_s)
        try:
            report = run_job(run_cfg, comm)
            if comm.rank == 0:
                print(json.dumps(report), flush=True)
        finally:
            destroy_distributed()


if __name__ == "__main__":
    run_hydra_main(main)
