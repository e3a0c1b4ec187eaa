"""The prefill job behind scripts/prefill.py: validate, build this rank's model, run, report.

Kept out of the script so tests can call it directly with a composed config and a Comm.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from cp_attn.comm import Comm
from cp_attn.inputs import load_prompts, random_prompts
from cp_attn.layout import canonical_mode
from cp_attn.checkpoint import build_model
from cp_attn.flops import prefill_flops
from cp_attn.ops.kernels import get_kernels
from cp_attn.parallel import check_prefill_args, cp_prefill, expert_placement
from cp_attn.reference import run_single
from cp_attn.runconfig import PrefillConfig, resolve_device, resolve_dtype, weight_source
from cp_attn.timing import StageTimer


def load_inputs(cfg: PrefillConfig, vocab_size: int) -> list[list[int]]:
    if cfg.input.file:
        return load_prompts(cfg.input.file)
    return random_prompts(list(cfg.input.lengths), vocab_size, cfg.input.seed)


def save_atomic(obj, path: Path) -> None:
    """torch.save to a hidden name beside `path`, renamed once complete: a failed or killed run
    leaves no half-written file under the name the user asked for."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run_job(cfg: PrefillConfig, comm: Comm) -> dict:
    """Run one CP prefill on this rank. Returns the report (rank 0's carries the reference check).

    Everything that can be wrong with the request is checked here, on every rank, before the first
    collective: CP size, mode, backend, kernels, dtype, checkpoint/config, prompts.
    """
    if cfg.cp.size is not None and cfg.cp.size != comm.size:
        raise ValueError(f"cp.size={cfg.cp.size} but the job runs {comm.size} ranks (torchrun --nproc-per-node/--nnodes)")
    mode = canonical_mode(cfg.cp.mode)
    kernels = get_kernels(cfg.kernels)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    dtype = resolve_dtype(cfg.model.dtype, device)
    source = weight_source(cfg.model, device)
    model_cfg = source.config
    ids = check_prefill_args(model_cfg, comm.size, mode, cfg.moe.backend, load_inputs(cfg, model_cfg.vocab_size))

    placement = expert_placement(cfg.moe.backend, model_cfg, comm.rank, comm.size)
    model = build_model(source, expert_ids=placement.expert_ids, expert_shard=placement.expert_shard,
                        dtype=dtype, device=device, indexer_fp8_sim=cfg.model.indexer_fp8_sim)

    def forward(timer=None):
        return cp_prefill(model, comm, ids, mode, cfg.moe.backend, kernels=kernels,
                          deepep_impl=cfg.moe.deepep_impl, timer=timer)

    for _ in range(cfg.warmup):
        forward()
    timer = StageTimer(sync=device.type == "cuda") if cfg.stages else None
    comm.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = forward(timer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    comm.barrier()
    seconds = time.perf_counter() - t0
    flops = prefill_flops(model_cfg, out.plan.seq_lens)["total"]

    report = {
        "cp_size": comm.size,
        "mode": mode,
        "moe_backend": cfg.moe.backend,
        "sequences": len(ids),
        "tokens": out.plan.num_tokens,
        "seconds": round(seconds, 6),
        "tokens_per_s": round(out.plan.num_tokens / seconds, 1),
        # useful work (cp_attn.flops) of the whole group over wall time, and per rank
        "tflops": float(f"{flops / seconds / 1e12:.4g}"),
        "tflops_per_rank": float(f"{flops / seconds / 1e12 / comm.size:.4g}"),
        "max_abs_diff": None,  # the three *_diff / match fields are filled by check=true on rank 0
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "kernels": kernels.name,
    }
    if device.type == "cuda":
        report["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if timer is not None:
        report["stages_s"] = {k: round(v, 6) for k, v in timer.summary().items()}
    if comm.rank == 0 and (cfg.check or cfg.output.logits):
        logits = out.split(model.logits(out.hidden))
        if cfg.output.logits:
            Path(cfg.output.logits).parent.mkdir(parents=True, exist_ok=True)
            save_atomic({"logits": [x.cpu() for x in logits]}, Path(cfg.output.logits))
        if cfg.check:
            del model
            full = build_model(source, dtype=dtype, device=device, indexer_fp8_sim=cfg.model.indexer_fp8_sim)
            ref = run_single(full, ids, kernels=kernels)
            got, want = torch.cat(logits).float(), torch.cat(ref).float()
            report["max_abs_diff"] = float((got - want).abs().max())
            # bf16 runs: a rounding-level change can flip a near-tie in routing or top-k and move a
            # token's logits by O(1), so also report how typical tokens and the argmax fare.
            report["rel_l2_diff"] = float((got - want).norm() / want.norm())
            report["argmax_match"] = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    comm.barrier()  # the others wait for rank 0's check, so the whole job ends together
    return report
