"""One-GPU prefill benchmarks and numerics: whole forwards timed per stage, FP8 KV against bf16 KV, and
one long prompt in chunks over a KV cache against one shot.

Both run cp = 1 through the same cp_prefill the CP ranks run (Comm.single()), so what is measured here
is what every rank does minus the collectives.
"""

from __future__ import annotations

import time

import torch

from cp_attn.checkpoint import RandomSource, build_model
from cp_attn.comm import Comm
from cp_attn.config import preset
from cp_attn.flops import prefill_flops
from cp_attn.inputs import random_prompts
from cp_attn.ops.kernels import get_kernels
from cp_attn.parallel import chunked_prefill, cp_prefill
from cp_attn.timing import StageTimer

PRESETS = {
    "v32_slim": {},
    # V3.2's real expert count; one dense and one MoE layer so 256 experts fit one 80 GB GPU.
    "v32_slim_e256": dict(num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=256),
}


def make_model(name: str, seed: int = 0):
    cfg = preset("v32_slim", **PRESETS[name])
    return build_model(RandomSource(cfg, seed=seed, device="cuda"), dtype=torch.bfloat16, device="cuda")


def time_prefill(model, lengths: list[int], kernels: str, kv_dtype: str = "auto", repeat: int = 2,
                 moe_backend: str = "fused") -> dict:
    """Warm up once, time `repeat` forwards (median), then one forward with per-stage times."""
    ids = random_prompts(lengths, model.cfg.vocab_size, seed=1)
    kset = get_kernels(kernels)
    run = lambda timer=None: cp_prefill(model, Comm.single(), ids, "in_seq", moe_backend,  # noqa: E731
                                        kernels=kset, timer=timer, kv_dtype=kv_dtype)
    torch.cuda.reset_peak_memory_stats()
    run()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timer = StageTimer(sync=True)
    run(timer)
    flops = prefill_flops(model.cfg, lengths)
    ms = sorted(times)[len(times) // 2] * 1e3
    stages = {k: v * 1e3 for k, v in timer.summary().items()}
    return {
        "lengths": lengths, "tokens": sum(lengths), "kernels": kernels, "kernel_stages": dict(kset.choice),
        "kv_dtype": kv_dtype, "moe_backend": moe_backend, "ms": ms, "ms_all": [t * 1e3 for t in times],
        "useful_tflops": flops["total"] / ms / 1e9,
        "stages_ms": stages,
        "stage_tflops": {k: flops[k] / stages[k] / 1e9 for k in ("attn.indexer", "attn.sparse_mla") if stages.get(k)},
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def topk_overlap(a: torch.Tensor, b: torch.Tensor, num_keys: int, chunk: int = 1024) -> float:
    """Mean over rows of |A & B| / |A| for two [T, K] index tensors (-1 = empty)."""
    hit = total = 0
    for s in range(0, a.shape[0], chunk):
        x, y = a[s : s + chunk].long(), b[s : s + chunk].long()
        mask = torch.zeros((x.shape[0], num_keys + 1), dtype=torch.bool, device=a.device)
        mask.scatter_(1, torch.where(x >= 0, x, num_keys), True)
        mask[:, num_keys] = False
        hit += int(mask.gather(1, torch.where(y >= 0, y, num_keys)).sum())
        total += int((x >= 0).sum())
    return hit / max(total, 1)


def time_chunked_prefill(model, length: int, chunk_size: int, kernels: str = "triton", kv_dtype: str = "auto",
                         moe_backend: str = "fused") -> dict:
    """One prompt of `length` tokens prefilled in one shot and in chunks of `chunk_size` over a KV cache:
    TTFT of each (one shot: the forward; chunked: until its last chunk is done, cp_attn.parallel.chunked),
    every chunk's time, peak memory (total and above what was allocated before: the weights), and the
    cost of chunking (chunked TTFT / one-shot TTFT). Each is warmed up once (kernel compilation at these
    shapes), then timed once. An OOM is recorded, not raised: running where one shot cannot is the point
    of chunking. Runs on the model's device; peak memory only on CUDA."""
    ids = random_prompts([length], model.cfg.vocab_size, seed=1)
    kset = get_kernels(kernels)
    device = model.embed_tokens.weight.device
    cuda = device.type == "cuda"
    runs = {
        "one_shot": lambda: cp_prefill(model, Comm.single(), ids, "in_seq", moe_backend, kernels=kset,
                                       kv_dtype=kv_dtype),
        # drop each chunk's hidden states, as a server does (it keeps only the KV cache)
        "chunked": lambda: chunked_prefill(model, Comm.single(), ids, "in_seq", moe_backend, chunk_size,
                                           kernels=kset, kv_dtype=kv_dtype, keep_hidden=False),
    }
    rec = {"length": length, "chunk_size": chunk_size, "chunks": -(-length // chunk_size), "kernels": kernels,
           "kernel_stages": dict(kset.choice), "kv_dtype": kv_dtype, "moe_backend": moe_backend}
    for name, run in runs.items():
        try:
            run()
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            out = run()
            if cuda:
                torch.cuda.synchronize(device)
            rec[f"{name}_ttft_ms"] = (time.perf_counter() - t0) * 1e3
            if cuda:
                peak = torch.cuda.max_memory_allocated(device)
                rec[f"{name}_peak_mem_gib"] = peak / 2**30
                rec[f"{name}_peak_above_weights_gib"] = (peak - base) / 2**30
            if name == "chunked":
                rec["chunk_ms"] = [t * 1e3 for t in out.chunk_s]
                rec["cache_gib"] = out.cache.nbytes / 2**30
            del out
        except torch.OutOfMemoryError as e:
            rec[f"{name}_error"] = f"OOM: {str(e)[:120]}"
        if cuda:
            torch.cuda.empty_cache()
    if "one_shot_ttft_ms" in rec and "chunked_ttft_ms" in rec:
        rec["chunking_cost"] = rec["chunked_ttft_ms"] / rec["one_shot_ttft_ms"]
    return rec


def compare_kv_dtypes(name: str, lengths: list[int], kernels: str = "triton", chunk: int = 2048) -> dict:
    """FP8 KV against bf16 KV on the same bf16 model and kernels, each also against the fp32 model
    (torch kernels, fp32 KV) as the scale of plain bf16 rounding: logits relative L2, argmax
    agreement, top-k overlap per layer. Random weights amplify any perturbation layer by layer, so
    read the FP8 figures against the bf16 ones beside them, not as absolutes."""
    ids = random_prompts(lengths, preset("v32_slim", **PRESETS[name]).vocab_size, seed=2)

    def forward(model, kset, kv):
        out = cp_prefill(model, Comm.single(), ids, "in_seq", "fused", kernels=kset, kv_dtype=kv, record_topk=True)
        return out.hidden, out.topk

    ref_model = build_model(RandomSource(preset("v32_slim", **PRESETS[name]), seed=0, device="cuda"),
                            dtype=torch.float32, device="cuda")
    ref_hidden, ref_topk = forward(ref_model, get_kernels("torch"), "auto")
    ref_logits = [ref_model.logits(ref_hidden[s : s + chunk]).float() for s in range(0, ref_hidden.shape[0], chunk)]
    del ref_model, ref_hidden
    torch.cuda.empty_cache()
    model = make_model(name)
    runs = {kv: forward(model, get_kernels(kernels), kv) for kv in ("bf16", "fp8")}
    T = ref_logits and sum(x.shape[0] for x in ref_logits)

    def versus(hidden_a, topk_a, ref_chunks, topk_b):
        err = ref = agree = 0.0
        for i, s in enumerate(range(0, T, chunk)):  # T x vocab fp32 logits are 8 GB at 16K tokens
            a = model.logits(hidden_a[s : s + chunk]).float()
            b = ref_chunks(i, s)
            err += float((a - b).pow(2).sum())
            ref += float(b.pow(2).sum())
            agree += float((a.argmax(-1) == b.argmax(-1)).sum())
        return {"logits_rel_l2": (err / ref) ** 0.5, "argmax_agreement": agree / T,
                "topk_overlap": {layer: topk_overlap(topk_a[layer], topk_b[layer], T) for layer in sorted(topk_b)}}

    vs_fp32 = lambda i, s: ref_logits[i]  # noqa: E731
    vs_bf16 = lambda i, s: model.logits(runs["bf16"][0][s : s + chunk]).float()  # noqa: E731
    return {
        "lengths": lengths, "kernels": kernels,
        **versus(*runs["fp8"], vs_bf16, runs["bf16"][1]),
        "fp8_vs_fp32": versus(*runs["fp8"], vs_fp32, ref_topk),
        "bf16_vs_fp32": versus(*runs["bf16"], vs_fp32, ref_topk),
    }


def profile_prefill(model, lengths: list[int], kernels: str = "triton", kv_dtype: str = "auto", top: int = 25) -> dict:
    """One warm forward under torch.profiler: the GPU kernels that take the time, summed by name."""
    from torch.profiler import ProfilerActivity, profile

    ids = random_prompts(lengths, model.cfg.vocab_size, seed=1)
    kset = get_kernels(kernels)
    run = lambda: cp_prefill(model, Comm.single(), ids, "in_seq", "fused", kernels=kset, kv_dtype=kv_dtype)  # noqa: E731
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return {"lengths": lengths, "kernels": kernels, "kv_dtype": kv_dtype, "gpu_ms_total": total,
            "top_kernels": [{"name": k[:90], "ms": ms, "calls": c, "share": ms / total} for k, ms, c in rows[:top]]}
