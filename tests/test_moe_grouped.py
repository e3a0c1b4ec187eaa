"""Grouped-GEMM routed experts (`MoE.routed_grouped`, cp_attn.model.moe_grouped) against the
per-expert loop (`MoE.routed_loop`).

Reference: the loop, itself checked token by token against a plain sum over experts and against
the unsharded layer in tests/test_moe.py, and end to end against transformers through the CP tests.
Both paths get the same ids and weights, so routing near-ties cannot separate them. On CPU
`torch._grouped_mm` runs every float dtype (one mm per group); the GPU tests at V3.2 shapes run
torch's CUTLASS kernels and are skipped without CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cp_attn.checkpoint import RandomSource, build_model, load_weights
from cp_attn.comm import Comm
from cp_attn.config import preset
from cp_attn.layout import plan_split
from cp_attn.model import moe_grouped
from cp_attn.model.moe import MoE, moe_local
from cp_attn.model.moe_grouped import check_impl, grouped_mm_runs, has_grouped_mm, resolve_impl
from cp_attn.parallel import expert_placement, make_moe_backend
from tests.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not has_grouped_mm(), reason="torch has no _grouped_mm")

# fp32, same products on both sides: only the order of the fp32 sum over a row's k choices differs
# (one index_add over all choices vs one per expert), a few ulp of O(1) outputs (seen <= 5e-7).
FP32_ATOL = 1e-5
FP32_RTOL = 1e-5
# bf16, per row: ||grouped - loop|| / ||loop||. Both paths round the gate/up outputs, silu*up and the
# down output to bf16 (2^-9 relative per rounding) but may accumulate in another order (CUTLASS vs
# cuBLAS tiles), so a bf16 value can land one ulp apart and the difference carries through the down
# GEMM. Simulated at 7168 -> 2048 with two fp32 accumulation orders: <= 8e-4 per row. 1e-2 leaves
# >10x headroom, while one wrong expert in a row's top-8 moves that row by ~0.3, a lost row by 1.
BF16_ROW_REL = 1e-2

TINY = preset("tiny", num_hidden_layers=2)  # layer 0 dense, layer 1 MoE: 12 experts, top-3, I = 24


def _moe(cfg=TINY, dtype=torch.float32, **kw) -> MoE:
    return build_model(RandomSource(cfg, seed=5), dtype=dtype, **kw).layers[1].mlp


def _routing(moe: MoE, n: int, seed: int, dtype=torch.float32):
    """x [n, H], the gate's ids with some -1s (pad rows and single choices), and its weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, moe.gate.weight.shape[1], generator=g).to(dtype)
    idx, w = moe.gate(x)
    if n:
        idx[::7] = -1                            # pad rows: route nowhere (FusedMoE does this)
        idx[3::5, 0] = -1                        # one choice elsewhere (DeepEP's -1 = not on this rank)
    return x, idx, w


def _row_rel(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    got, want = got.float(), want.float()
    return (got - want).norm(dim=-1) / want.norm(dim=-1).clamp(min=1e-30)


# Which experts a layer holds, as the backends place them on some rank; inter 25 makes unequal
# shards (13 | 12 over 2; fp32 rows are 4-aligned) whose widths need zero padding to the 16-byte stride _grouped_mm requires.
HOLDINGS = {
    "all": dict(),
    "fused-0of2-inter25": dict(inter=25, expert_shard=(0, 2)),
    "fused-0of3": dict(expert_shard=(0, 3)),
    "fused-2of4": dict(expert_shard=(2, 4)),
    "deepep-3of12": dict(expert_ids=[3, 4, 5]),
    "deepep-scattered": dict(expert_ids=[0, 5, 7, 11]),
    "one-expert": dict(expert_ids=[6]),
}


def _held(name: str, dtype=torch.float32) -> MoE:
    kw = dict(HOLDINGS[name])
    cfg = TINY.replace(moe_intermediate_size=kw.pop("inter", TINY.moe_intermediate_size))
    return _moe(cfg, dtype, moe_impl="grouped", **kw)


@pytest.mark.parametrize("n", [1, 5, 64], ids=lambda n: f"{n}-rows")
@pytest.mark.parametrize("holding", sorted(HOLDINGS))
def test_grouped_equals_loop_fp32(holding, n):
    moe = _held(holding)
    x, idx, w = _routing(moe, n, seed=n)
    want = moe.routed_loop(x, idx, w)
    got = moe.routed_grouped(x, idx, w)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)
    held = torch.isin(idx, torch.tensor(moe.expert_ids)).any(-1)
    assert (got[~held] == 0).all(), "a row with no expert here must get exactly nothing"
    if n > 1:
        assert got[held].abs().amax(-1).min() > 1e-3, "every row routed here must get its experts' output"


@pytest.mark.parametrize("holding", ["all", "fused-0of2-inter25", "deepep-scattered"])
def test_grouped_equals_loop_bf16(holding):
    moe = _held(holding, torch.bfloat16)
    x, idx, w = _routing(moe, 48, seed=2, dtype=torch.bfloat16)
    held = torch.isin(idx, torch.tensor(moe.expert_ids)).any(-1)
    want, got = moe.routed_loop(x, idx, w), moe.routed_grouped(x, idx, w)
    assert got.dtype == torch.bfloat16
    assert _row_rel(got[held], want[held]).max() < BF16_ROW_REL
    assert (got[~held] == 0).all()


def test_scatter_in_several_chunks(monkeypatch):
    monkeypatch.setattr(moe_grouped, "SCATTER_ROWS", 7)             # 64 rows x 3 choices: 28 chunks
    moe = _held("deepep-scattered")
    x, idx, w = _routing(moe, 64, seed=9)
    torch.testing.assert_close(moe.routed_grouped(x, idx, w), moe.routed_loop(x, idx, w), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_empty_input_and_all_ids_elsewhere():
    moe = _held("deepep-3of12")
    x, idx, w = _routing(moe, 0, seed=0)
    assert moe.routed_grouped(x, idx, w).shape == (0, TINY.hidden_size)
    x, idx, w = _routing(moe, 9, seed=1)
    nowhere = torch.where(torch.isin(idx, torch.tensor(moe.expert_ids)), -1, idx)
    assert (moe.routed_grouped(x, nowhere, w) == 0).all()
    assert (moe.routed_grouped(x, torch.full_like(idx, -1), w) == 0).all()


def test_partial_layers_sum_to_the_full_layer():
    """The deepep partition and the fused shards each add up to the unsplit loop layer."""
    full = _moe(moe_impl="loop")
    x, idx, w = _routing(full, 40, seed=3)
    want = full.routed_loop(x, idx, w)
    subsets = [[0, 5, 7], [1, 2, 3, 4], [6, 8, 9, 10, 11]]
    deepep = sum(_moe(expert_ids=s, moe_impl="grouped").routed_grouped(x, idx, w) for s in subsets)
    fused = sum(_moe(expert_shard=(i, 3), moe_impl="grouped").routed_grouped(x, idx, w) for i in range(3))
    torch.testing.assert_close(deepep, want, atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(fused, want, atol=FP32_ATOL, rtol=FP32_RTOL)


# ---- the stacked weights ----------------------------------------------------------------------


def test_stack_holds_the_only_copy_and_loading_writes_through_it():
    moe = _held("fused-0of2-inter25")
    stack = moe.stacked()
    assert stack.w13.shape == (12, 2 * 16, 64) and stack.w2.shape == (12, 64, 16)  # 13 padded to 16
    for slot, e in enumerate(moe.expert_ids):
        assert stack.backs(slot, moe.experts[str(e)]), f"expert {e} is not a view of the stack"
    assert (stack.w13[:, 13:16] == 0).all() and (stack.w2[:, :, 13:] == 0).all()
    # Reloading other weights by the per-expert names (what load_weights does) changes the stack.
    x, idx, w = _routing(moe, 30, seed=4)
    before = moe.routed_grouped(x, idx, w)
    model = build_model(RandomSource(TINY.replace(moe_intermediate_size=25), seed=5), expert_shard=(0, 2))
    load_weights(model, RandomSource(TINY.replace(moe_intermediate_size=25), seed=6))
    moe = model.layers[1].mlp
    stack = moe.stack_experts()
    load_weights(model, RandomSource(TINY.replace(moe_intermediate_size=25), seed=5))
    assert moe.stacked() is stack, "an in-place load must not need a restack"
    torch.testing.assert_close(moe.routed_grouped(x, idx, w), before, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_stack_is_rebuilt_when_weights_are_replaced():
    moe = _held("all")
    x, idx, w = _routing(moe, 20, seed=6)
    first = moe.stacked()
    moe.to(torch.bfloat16)                                            # new tensors for every weight
    xb = x.bfloat16()
    assert moe.stacked() is not first and moe.stacked().w13.dtype == torch.bfloat16
    assert (_row_rel(moe.routed_grouped(xb, idx, w), moe.routed_loop(xb, idx, w)) < BF16_ROW_REL).all()
    last = moe.experts["11"]
    last.down_proj.weight = torch.nn.Parameter(torch.zeros_like(last.down_proj.weight))
    only_11 = torch.full_like(idx, -1)
    only_11[:, 0] = 11
    assert (moe.routed_grouped(xb, only_11, w) == 0).all(), "a replaced expert weight must be seen"


# ---- choosing the path -----------------------------------------------------------------------


def test_impl_choice():
    assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "grouped"  # the CPU op runs fp32
    assert resolve_impl("loop", torch.device("cpu"), torch.float32) == "loop"
    assert not grouped_mm_runs("cuda", torch.float32), "CUDA fp32 takes torch's syncing fallback: loop"
    with pytest.raises(ValueError, match="'fast'"):
        check_impl("fast")
    with pytest.raises(ValueError, match="'fast'"):
        build_model(RandomSource(TINY), moe_impl="fast")


def test_loop_impl_never_stacks_and_routed_follows_impl():
    loop, grouped = _moe(moe_impl="loop"), _moe(moe_impl="grouped")
    x, idx, w = _routing(loop, 16, seed=7)
    torch.testing.assert_close(loop.routed(x, idx, w), loop.routed_loop(x, idx, w), atol=0, rtol=0)
    assert loop._stack is None
    torch.testing.assert_close(grouped.routed(x, idx, w), grouped.routed_grouped(x, idx, w), atol=0, rtol=0)


# ---- both backends, real process groups -------------------------------------------------------

LENS = [13, 4, 22]


BACKEND_RUNS = [("fused", "in_seq"), ("fused", "round_robin"), ("deepep", "in_seq")]


def _backend_worker(comm: Comm) -> dict:
    """This rank's rows of one MoE layer through each backend, once per impl."""
    torch.set_num_threads(1)
    x_all = torch.randn(sum(LENS), TINY.hidden_size, generator=torch.Generator().manual_seed(8))
    out = {}
    for backend, mode in BACKEND_RUNS:
        plan = plan_split(LENS, comm.size, mode)
        place = expert_placement(backend, TINY, comm.rank, comm.size)
        tokens = plan.token_index(comm.rank)
        x = x_all[tokens.clamp(min=0)]                                  # pad rows (-1) get token 0's row
        out[backend, mode] = {"tokens": tokens}
        for impl in ("loop", "grouped"):
            moe = _moe(expert_ids=place.expert_ids, expert_shard=place.expert_shard, moe_impl=impl)
            with torch.no_grad():
                out[backend, mode][impl] = make_moe_backend(backend, comm, plan, TINY)(moe, x)
    return out


@pytest.fixture(scope="module")
def backend_runs():
    return run_ranks(_backend_worker, 2, timeout=120)


@pytest.mark.multiproc
@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("backend,mode", BACKEND_RUNS, ids=[f"{b}-{m}" for b, m in BACKEND_RUNS])
def test_backends_equal_single_process_loop(backend_runs, backend, mode, impl):
    """2 gloo ranks, each holding its backend's part of the layer, against one process's loop."""
    full = _moe(moe_impl="loop")
    x = torch.randn(sum(LENS), TINY.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = moe_local(full, x)
    for rank, runs in enumerate(backend_runs):
        r = runs[backend, mode]
        real = r["tokens"] >= 0
        torch.testing.assert_close(r[impl][real], want[r["tokens"][real]], atol=FP32_ATOL, rtol=FP32_RTOL,
                                   msg=lambda m: f"rank {rank}: {m}")


# ---- GPU, V3.2 shapes ------------------------------------------------------------------------

V32 = preset("v32")  # hidden 7168, moe_intermediate_size 2048, top-8


def _gpu_moe(n_experts: int, **kw) -> MoE:
    """A bf16 MoE on the GPU with N(0, 1/fan_in) weights, allocated in bf16 from the start (256
    experts are 22.5 GB in bf16, twice that in fp32)."""
    cfg = V32.replace(n_routed_experts=n_experts, n_group=8, topk_group=4)
    with torch.device("meta"):
        moe = MoE(cfg, **kw)
    moe = moe.to(torch.bfloat16).to_empty(device="cuda").requires_grad_(False)
    g = torch.Generator(device="cuda").manual_seed(0)
    for p in moe.parameters():
        p.normal_(0, p.shape[-1] ** -0.5, generator=g)
    return moe


def _gpu_routing(n: int, n_experts: int, top_k: int = 8):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(n, V32.hidden_size, device="cuda", generator=g).bfloat16()
    idx = torch.rand(n, n_experts, device="cuda", generator=g).topk(top_k, dim=-1).indices  # distinct ids
    w = torch.rand(n, top_k, device="cuda", generator=g) * (2.5 / top_k)
    return x, idx, w


GPU_CASES = {  # name -> (experts in the model, MoE kwargs, tokens): 512 and 64 rows per expert
    "32-experts": (32, {}, 2048),
    "256-experts": (256, {}, 2048),
    "deepep-64of256": (256, {"expert_ids": range(64, 128)}, 2048),
    "fused-shard-1of4-32": (32, {"shard": (1, 4)}, 2048),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_grouped_equals_loop_bf16(case):
    n_experts, kw, n = GPU_CASES[case]
    moe = _gpu_moe(n_experts, **kw)
    x, idx, w = _gpu_routing(n, n_experts)
    idx[::16] = -1                                                  # pad rows
    held = torch.isin(idx, torch.tensor(moe.expert_ids, device="cuda")).any(-1)
    want, got = moe.routed_loop(x, idx, w), moe.routed_grouped(x, idx, w)
    rel = _row_rel(got[held], want[held])
    assert rel.max() < BF16_ROW_REL, f"worst row {rel.max():.2e}, median {rel.median():.2e}"
    assert (got[~held] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_grouped_path_never_syncs_the_host():
    moe = _gpu_moe(32)
    x, idx, w = _gpu_routing(1024, 32)
    assert resolve_impl("auto", x.device, x.dtype) == "grouped"
    moe.routed(x, idx, w)                                           # stacks the experts once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe.routed(x, idx, w)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- scripts/bench_moe.py --------------------------------------------------------------------


def _bench_script():
    spec = importlib.util.spec_from_file_location("bench_moe", ROOT / "scripts" / "bench_moe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_pieces_run_on_cpu_at_tiny_shapes():
    """The GPU benchmark's routing and timed bodies, at tiny shapes with a wall-clock timer."""
    b = _bench_script()
    idx, _ = b.balanced_routing(64, 32, 8, "cpu")
    assert torch.bincount(idx.flatten()).tolist() == [16] * 32
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "a token's experts must be distinct"
    with pytest.raises(ValueError, match="equal rows"):
        b.balanced_routing(5, 32, 8, "cpu")

    def once(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    cpu = torch.device("cpu")
    ms, flops = b.bench_gemm(once, cpu, 4, 8, H=64, I=32)
    assert set(ms) == {"loop", "grouped"} and flops == 2 * 32 * 64 * 32
    cfg = TINY.replace(num_experts_per_tok=8, n_routed_experts=16, n_group=4, topk_group=2)
    moe = b.random_moe(cfg, cpu)
    ms, flops = b.bench_routed(once, moe, 16)
    assert set(ms) == {"loop", "grouped"} and flops == 2 * 3 * 16 * 8 * 64 * 24
    ms, _ = b.bench_layer(once, moe, cfg, 16)
    assert set(ms) == {"loop", "grouped"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_refuses_without_cuda(tmp_path):
    out = tmp_path / "moe.json"
    r = subprocess.run([sys.executable, "scripts/bench_moe.py", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "needs a GPU" in r.stderr and not out.exists()
