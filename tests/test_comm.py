"""Collectives of `cp_attn.comm.Comm` with real tensors on real gloo process groups of C = 2, 3, 4 ranks.

Reference: the plain single-process result computed here in the parent from the same seeded inputs
(`x[token_index]`, concatenations, sums over ranks). Each world size runs ONE spawn (`_comm_checks`
does every collective and returns the raw outputs); the tests below assert on the cached outputs.
C = 1 runs the same worker in-process on `Comm.single()` (no process group), which must behave as a
world of one.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from cp_attn.comm import Comm
from cp_attn.layout import plan_split
from tests.spawn import RankError, run_ranks

BATCHES = {"T1": (1,), "varlen": (1, 2, 13, 3, 7)}  # T < C; and sequences shorter than C = 2, 3, 4
MODES = ["round_robin", "in_seq"]
A2A_PATTERNS = ["mixed", "sparse", "none"]
RS_ROWS = 2  # rows per rank of the reduce-scatter output


# ---- seeded inputs, the same in every rank and in the parent --------------------------------------


def full_tensor(T: int, dtype=torch.float32) -> torch.Tensor:
    """[T, 2, 3] the whole batch in global token order."""
    g = torch.Generator().manual_seed(1234 + T)
    return torch.randn(T, 2, 3, generator=g).to(dtype)


def uneven_rows(rank: int) -> torch.Tensor:
    """[rank, 2]: rank 0 holds no rows; row i of rank r is (100 r + i, -(100 r + i))."""
    v = torch.arange(rank, dtype=torch.float32) + 100 * rank
    return torch.stack([v, -v], dim=1)


def rs_input(rank: int, C: int) -> torch.Tensor:
    """[C * RS_ROWS, 3] integer-valued, so any summation order is exact."""
    return torch.arange(C * RS_ROWS * 3, dtype=torch.float32).view(C * RS_ROWS, 3) * (rank + 1) + rank


def a2a_counts(pattern: str, C: int) -> list[list[int]]:
    """counts[s][d]: rows rank s sends to rank d."""
    if pattern == "mixed":  # zeros on odd senders' even destinations
        return [[(3 * s + 2 * d + 1) % 4 for d in range(C)] for s in range(C)]
    if pattern == "sparse":  # rank 0 sends nothing, the last rank receives nothing
        return [[0 if s == 0 or d == C - 1 else s + d for d in range(C)] for s in range(C)]
    return [[0] * C for _ in range(C)]


def a2a_rows(src: int, dst: int, n: int) -> torch.Tensor:
    """[n, 3] long: row j of what `src` sends to `dst` is (src, dst, j)."""
    j = torch.arange(n, dtype=torch.long)
    return torch.stack([torch.full_like(j, src), torch.full_like(j, dst), j], dim=1)


# ---- the worker: every collective, once per world size --------------------------------------------


def _comm_checks(comm: Comm) -> dict:
    C, r = comm.size, comm.rank
    out: dict = {"rank": r, "size": C}
    for name, seq_lens in BATCHES.items():
        for mode in MODES:
            plan, key = plan_split(seq_lens, C, mode), (name, mode)
            x = full_tensor(plan.num_tokens)
            local = comm.shard(x, plan)  # [n_r, 2, 3]
            out["shard", key] = local
            out["gather", key] = comm.gather(local, plan)
            out["gather_async", key] = comm.gather_async(local, plan).wait()
            tok = plan.token_index(r)
            nan_local = torch.full_like(local, float("nan"))  # pad rows stay NaN: the gather must drop them
            nan_local[tok >= 0] = x[tok[tok >= 0]]
            out["gather_nan_pads", key] = comm.gather(nan_local, plan)
            out["gather_bf16", key] = comm.gather(comm.shard(full_tensor(plan.num_tokens, torch.bfloat16), plan), plan)

    equal = uneven_rows(r + 1)[:1].expand(3, 2).contiguous()  # [3, 2] on every rank
    out["all_gather_equal"] = comm.all_gather(equal)
    out["all_gather_equal_async"] = comm.all_gather_async(equal).wait()
    out["all_gather_uneven"] = comm.all_gather(uneven_rows(r), rows=C)
    out["all_gather_uneven_async"] = comm.all_gather_async(uneven_rows(r), rows=C).wait()

    out["reduce_scatter"] = comm.reduce_scatter(rs_input(r, C))
    out["reduce_scatter_async"] = comm.reduce_scatter_async(rs_input(r, C)).wait()

    for pattern in A2A_PATTERNS:
        send = a2a_counts(pattern, C)[r]
        recv = comm.exchange_counts(send)
        x = torch.cat([a2a_rows(r, d, n) for d, n in enumerate(send)])
        out["exchange_counts", pattern] = recv
        out["all_to_all", pattern] = comm.all_to_all(x, send, recv)
        out["all_to_all_async", pattern] = comm.all_to_all_async(x, send, recv).wait()
    comm.barrier()
    return out


WORLDS = [
    pytest.param(1, id="single"),
    *(pytest.param(C, id=f"cp{C}", marks=pytest.mark.multiproc) for C in (2, 3, 4)),
]


@pytest.fixture(scope="module", params=WORLDS)
def world(request) -> tuple[int, list[dict]]:
    """(C, [rank 0's outputs, ...]); one spawn per C for the whole module."""
    C = request.param
    if C == 1:
        comm = Comm.single()
        assert comm.group is None and (comm.rank, comm.size) == (0, 1)
        assert not dist.is_initialized()
        return C, [_comm_checks(comm)]
    return C, run_ranks(_comm_checks, C, timeout=120)


def assert_same(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype, f"{what}: {got.shape} {got.dtype}"
    if got.is_floating_point():
        assert not got.isnan().any(), f"{what}: NaN rows (unwritten or pads)"
    assert torch.equal(got, expected), f"{what}: {got} != {expected}"


batch_mode = pytest.mark.parametrize(
    "batch, mode", [pytest.param(b, m, id=f"{b}-{m}") for b in BATCHES for m in MODES]
)


# ---- tests ----------------------------------------------------------------------------------------


def test_ranks(world):
    C, results = world
    assert [(res["rank"], res["size"]) for res in results] == [(r, C) for r in range(C)]


@batch_mode
def test_shard(world, batch, mode):
    C, results = world
    plan = plan_split(BATCHES[batch], C, mode)
    x = full_tensor(plan.num_tokens)
    for r, res in enumerate(results):
        tok = plan.token_index(r)
        expected = torch.where((tok >= 0).view(-1, 1, 1), x[tok.clamp(min=0)], 0.0)  # pad rows are 0
        assert_same(res["shard", (batch, mode)], expected, f"rank {r} shard")


@batch_mode
@pytest.mark.parametrize("variant", ["gather", "gather_async", "gather_nan_pads", "gather_bf16"])
def test_gather_restores_global_order(world, batch, mode, variant):
    C, results = world
    dtype = torch.bfloat16 if variant == "gather_bf16" else torch.float32
    x = full_tensor(sum(BATCHES[batch]), dtype)
    for r, res in enumerate(results):
        assert_same(res[variant, (batch, mode)], x, f"rank {r} {variant}")


@pytest.mark.parametrize("variant", ["all_gather_equal", "all_gather_equal_async"])
def test_all_gather_equal_rows(world, variant):
    C, results = world
    expected = torch.cat([uneven_rows(s + 1)[:1].expand(3, 2) for s in range(C)])  # [3 C, 2] rank-major
    for r, res in enumerate(results):
        assert_same(res[variant], expected, f"rank {r} {variant}")


@pytest.mark.parametrize("variant", ["all_gather_uneven", "all_gather_uneven_async"])
def test_all_gather_uneven_rows_padded(world, variant):
    C, results = world
    expected = torch.zeros(C * C, 2)  # rank s's s rows at s*C, then zero pad rows up to `rows` = C
    for s in range(C):
        expected[s * C : s * C + s] = uneven_rows(s)
    for r, res in enumerate(results):
        assert_same(res[variant], expected, f"rank {r} {variant}")


@pytest.mark.parametrize("variant", ["reduce_scatter", "reduce_scatter_async"])
def test_reduce_scatter(world, variant):
    C, results = world
    total = sum(rs_input(s, C) for s in range(C))  # [C * RS_ROWS, 3]
    for r, res in enumerate(results):
        assert_same(res[variant], total[r * RS_ROWS : (r + 1) * RS_ROWS], f"rank {r} {variant}")


@pytest.mark.parametrize("pattern", A2A_PATTERNS)
def test_exchange_counts(world, pattern):
    C, results = world
    counts = a2a_counts(pattern, C)
    for r, res in enumerate(results):
        assert res["exchange_counts", pattern] == [counts[s][r] for s in range(C)], f"rank {r}"


@pytest.mark.parametrize("pattern", A2A_PATTERNS)
@pytest.mark.parametrize("variant", ["all_to_all", "all_to_all_async"])
def test_all_to_all(world, pattern, variant):
    C, results = world
    counts = a2a_counts(pattern, C)
    for r, res in enumerate(results):
        expected = torch.cat([a2a_rows(s, r, counts[s][r]) for s in range(C)])  # rank-major by sender
        assert_same(res[variant, pattern], expected, f"rank {r} {variant}")


# ---- Comm.single() specifics (in-process) ---------------------------------------------------------


def test_single_outputs_never_alias_inputs():
    """A real collective writes a fresh buffer; the local copy must not hand back the input itself."""
    comm, x = Comm.single(), torch.arange(12.0).view(4, 3)
    plan = plan_split([4], 1, "in_seq")
    outs = {
        "all_gather": comm.all_gather(x),
        "gather": comm.gather(x, plan),
        "reduce_scatter": comm.reduce_scatter(x),
        "all_to_all": comm.all_to_all(x, [4], [4]),
    }
    for name, y in outs.items():
        assert torch.equal(y, x), name
        y.add_(1)
        assert torch.equal(x, torch.arange(12.0).view(4, 3)), f"{name} returned a view of its input"
    comm.barrier()


def test_pending_wait_is_idempotent():
    pending = Comm.single().all_gather_async(torch.ones(2, 3), rows=3)
    first = pending.wait()
    assert pending.wait() is first
    assert torch.equal(first, torch.tensor([[1.0] * 3, [1.0] * 3, [0.0] * 3]))


# ---- the spawn helper itself ----------------------------------------------------------------------


def _fail_on_rank_1(comm: Comm) -> None:
    if comm.rank == 1:
        raise ValueError("boom on rank 1")
    comm.barrier()  # rank 0 waits for a peer that is gone


def _sleep_forever(comm: Comm) -> None:
    time.sleep(3600)


@pytest.mark.multiproc
def test_run_ranks_reports_the_failing_rank():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"(?s)failed on rank 1.*ValueError: boom on rank 1"):
        run_ranks(_fail_on_rank_1, 2, timeout=60)
    assert time.monotonic() - start < 30, "a failure on one rank must not wait for the gloo timeout"


@pytest.mark.multiproc
def test_run_ranks_kills_a_hang():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"within 2 s"):
        run_ranks(_sleep_forever, 2, timeout=2)
    assert time.monotonic() - start < 10
