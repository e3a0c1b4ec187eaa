"""Where does a CP run part from the single-process run? Per layer: how many rows' top-k sets differ;
per token: how far the logits moved. For judging bf16/FP8 kernels and real-size numerics, where a
rounding-level change can flip a near-tie in routing or top-k.

    torchrun --nproc-per-node 4 scripts/compare_cp.py model=v32_slim model.dtype=fp32 input.lengths=[3000]

Takes the same Hydra overrides as scripts/prefill.py; rank 0 prints one JSON line.
"""

from __future__ import annotations

import json
import os

import hydra
from omegaconf import DictConfig

from cp_attn.checkpoint import build_model
from cp_attn.comm import Comm, destroy_distributed, init_distributed
from cp_attn.job import load_inputs
from cp_attn.layout import canonical_mode
from cp_attn.parallel import cp_prefill, expert_placement
from cp_attn.runconfig import from_omegaconf, register_resolvers, resolve_device, resolve_dtype, weight_source

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run = from_omegaconf(cfg)
    comm = init_distributed(run.backend, run.timeout_s)
    try:
        device = resolve_device(run.device, int(os.environ.get("LOCAL_RANK", 0)))
        dtype = resolve_dtype(run.model.dtype, device)
        source = weight_source(run.model, device)
        ids = load_inputs(run, source.config.vocab_size)
        mode = canonical_mode(run.cp.mode)
        pl = expert_placement(run.moe.backend, source.config, comm.rank, comm.size)
        model = build_model(source, expert_ids=pl.expert_ids, expert_shard=pl.expert_shard, dtype=dtype, device=device)
        out = cp_prefill(model, comm, ids, mode, run.moe.backend, record_topk=True)
        logits = model.logits(out.hidden)
        comm.barrier()
        if comm.rank == 0:
            del model
            full = build_model(source, dtype=dtype, device=device)
            ref = cp_prefill(full, Comm.single(), ids, mode, run.moe.backend, record_topk=True)
            ref_logits = full.logits(ref.hidden)
            per_token = (logits - ref_logits).abs().amax(-1)                          # [T]
            report = {
                "cp_size": comm.size, "dtype": str(dtype), "tokens": int(per_token.numel()),
                "topk_rows_differing": {l: int((out.topk[l] != ref.topk[l]).any(-1).sum()) for l in sorted(ref.topk)},
                "topk_keys_differing": {
                    l: int(sum(len(set(a.tolist()) ^ set(b.tolist())) // 2 for a, b in zip(out.topk[l], ref.topk[l])))
                    for l in sorted(ref.topk)
                },
                "tokens_diff_gt": {str(t): int((per_token > t).sum()) for t in (1e-4, 1e-3, 1e-2, 1e-1)},
                "max_abs_diff": float(per_token.max()),
                "median_token_max_diff": float(per_token.median()),
                "worst_tokens": per_token.topk(min(5, per_token.numel())).indices.tolist(),
            }
            print(json.dumps(report), flush=True)
        comm.barrier()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
