"""The prefill job behind scripts/prefill.py: validate, build this rank's model, run, report.

Kept out of the script so tests can call it directly with a composed config and a Comm.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from cp_attn.atomic import atomic_path, write_text
from cp_attn.comm import Comm
from cp_attn.inputs import load_prompts, random_prompts
from cp_attn.layout import canonical_mode, plan_split
from cp_attn.model.moe_grouped import resolve_impl
from cp_attn.checkpoint import build_model
from cp_attn.flops import prefill_flops
from cp_attn.model.context import check_kv_dtype
from cp_attn.ops.kernels import check_kernels_device, get_kernels
from cp_attn.parallel import check_chunk_size, check_prefill_args, chunked_prefill, cp_prefill, expert_placement
from cp_attn.reference import OUTPUT_TOKENS, run_single, select_tokens
from cp_attn.runconfig import PrefillConfig, resolve_device, resolve_dtype, weight_source
from cp_attn.timing import StageTimer


def load_inputs(cfg: PrefillConfig, vocab_size: int) -> list[list[int]]:
    if cfg.input.file:
        return load_prompts(cfg.input.file)
    return random_prompts(list(cfg.input.lengths), vocab_size, cfg.input.seed)


def rank_rows(out, cp_size: int, mode: str) -> list[int]:
    """Real (non-padding) rows each rank computed: one plan for a one-shot prefill, one per chunk."""
    plans = [out.plan] if hasattr(out, "plan") else [plan_split([n for n in c if n], cp_size, mode) for c in out.chunks]
    return [sum(int((p.token_index(r) >= 0).sum()) for p in plans) for r in range(cp_size)]


def save_atomic(obj, path: Path) -> None:
    """torch.save under a temporary name, renamed once complete (cp_attn.atomic): a failed or killed
    run leaves no half-written file under the name the user asked for."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def run_job(cfg: PrefillConfig, comm: Comm) -> dict:
    """Run one CP prefill on this rank. Returns the report (rank 0's carries the reference check).

    Everything that can be wrong with the request is checked here, on every rank, before the first
    collective: CP size, mode, backend, kernels, dtype, checkpoint/config, prompts.
    """
    if cfg.cp.size is not None and cfg.cp.size != comm.size:
        raise ValueError(f"cp.size={cfg.cp.size} but the job runs {comm.size} ranks (torchrun --nproc-per-node/--nnodes)")
    if cfg.warmup < 0 or cfg.repeat < 1:
        raise ValueError(f"warmup={cfg.warmup} and repeat={cfg.repeat}: need warmup >= 0 and repeat >= 1")
    if cfg.output.tokens not in OUTPUT_TOKENS:
        raise ValueError(f"unknown output.tokens {cfg.output.tokens!r}; expected one of {list(OUTPUT_TOKENS)}")
    mode = canonical_mode(cfg.cp.mode)
    check_chunk_size(cfg.input.chunk_size)
    kernels = get_kernels(cfg.kernels, vars(cfg.kernel_stage))
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    check_kernels_device(kernels, device)
    check_kv_dtype(cfg.kv_dtype)
    dtype = resolve_dtype(cfg.model.dtype, device)
    source = weight_source(cfg.model, device)
    model_cfg = source.config
    ids = check_prefill_args(model_cfg, comm.size, mode, cfg.moe.backend, load_inputs(cfg, model_cfg.vocab_size))

    placement = expert_placement(cfg.moe.backend, model_cfg, comm.rank, comm.size)
    model = build_model(source, expert_ids=placement.expert_ids, expert_shard=placement.expert_shard,
                        dtype=dtype, device=device, indexer_fp8_sim=cfg.model.indexer_fp8_sim, moe_impl=cfg.moe.impl)

    def forward(timer=None):
        if cfg.input.chunk_size:  # keep every chunk's hidden states only when logits are wanted
            return chunked_prefill(model, comm, ids, mode, cfg.moe.backend, cfg.input.chunk_size, kernels=kernels,
                                   deepep_impl=cfg.moe.deepep_impl, timer=timer, kv_dtype=cfg.kv_dtype,
                                   overlap_gather=cfg.overlap_gather, keep_hidden=cfg.check or bool(cfg.output.logits))
        return cp_prefill(model, comm, ids, mode, cfg.moe.backend, kernels=kernels, deepep_impl=cfg.moe.deepep_impl,
                          timer=timer, kv_dtype=cfg.kv_dtype, overlap_gather=cfg.overlap_gather)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(cfg.warmup):
        forward()
    timer = StageTimer(sync=device.type == "cuda") if cfg.stages else None
    times, own = [], []  # per repeat: the group's wall time, this rank's until its forward returned
    for _ in range(cfg.repeat):
        comm.barrier()
        sync()
        t0 = time.perf_counter()
        out = forward(timer)
        sync()
        own.append(time.perf_counter() - t0)
        comm.barrier()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    rank_seconds = comm.all_gather_object(statistics.median(own))
    flops = prefill_flops(model_cfg, out.seq_lens)["total"]

    report = {
        "cp_size": comm.size,
        "mode": mode,
        "moe_backend": cfg.moe.backend,
        "moe_impl": resolve_impl(cfg.moe.impl, device, dtype),
        "sequences": len(ids),
        "tokens": out.num_tokens,
        "seconds": round(seconds, 6),  # median of the `repeat` timed forwards
        "times_s": [round(t, 6) for t in times],
        "tokens_per_s": round(out.num_tokens / seconds, 1),
        # useful work (cp_attn.flops) of the whole group over wall time, and per rank
        "tflops": float(f"{flops / seconds / 1e12:.4g}"),
        "tflops_per_rank": float(f"{flops / seconds / 1e12 / comm.size:.4g}"),
        "max_abs_diff": None,  # the three *_diff / match fields are filled by check=true on rank 0
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "kernels": kernels.name,
        "kernel_stages": dict(kernels.choice),
        "kv_dtype": cfg.kv_dtype,
        "overlap_gather": cfg.overlap_gather,
        # each rank's median forward time and the real (non-padding) rows it computed
        "per_rank": [
            {"rank": r, "seconds": round(t, 6), "rows": rows}
            for r, (t, rows) in enumerate(zip(rank_seconds, rank_rows(out, comm.size, mode)))
        ],
    }
    if cfg.input.chunk_size:  # a prompt's TTFT: until the chunk holding its last token was done
        report.update(chunk_size=cfg.input.chunk_size, chunks=len(out.chunks),
                      ttft_s=[round(t, 6) for t in out.ttft_s])
    if device.type == "cuda":
        report["device_name"] = torch.cuda.get_device_name(device)
        report["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if timer is not None:  # per forward: the timer summed all `repeat` of them
        report["stages_s"] = {k: round(v / cfg.repeat, 6) for k, v in timer.summary().items()}
    if comm.rank == 0 and (cfg.check or cfg.output.logits):
        hidden, rows = select_tokens(out.hidden, out.seq_lens, cfg.output.tokens)
        logits = list(model.logits(hidden).split(rows))
        if cfg.output.logits:
            Path(cfg.output.logits).parent.mkdir(parents=True, exist_ok=True)
            save_atomic({"logits": [x.cpu() for x in logits]}, Path(cfg.output.logits))
        if cfg.check:
            del model
            full = build_model(source, dtype=dtype, device=device, indexer_fp8_sim=cfg.model.indexer_fp8_sim,
                               moe_impl=cfg.moe.impl)
            ref = run_single(full, ids, tokens=cfg.output.tokens, kernels=kernels, kv_dtype=cfg.kv_dtype)
            got, want = torch.cat(logits).float(), torch.cat(ref).float()
            report["max_abs_diff"] = float((got - want).abs().max())
            # bf16 runs: a rounding-level change can flip a near-tie in routing or top-k and move a
            # token's logits by O(1), so also report how typical tokens and the argmax fare.
            report["rel_l2_diff"] = float((got - want).norm() / want.norm())
            report["argmax_match"] = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    if comm.rank == 0 and cfg.report:
        write_json(cfg.report, report)
    comm.barrier()  # the others wait for rank 0's check, so the whole job ends together
    return report


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as JSON, all of it or nothing (cp_attn.atomic)."""
    write_text(path, json.dumps(obj) + "\n")
