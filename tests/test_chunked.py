"""Chunked prefill over a KV cache == one-shot prefill, per token, under real gloo process groups.

Reference: the single-process one-shot prefill (`cp_prefill` with `Comm.single()`, itself pinned to
transformers' DeepseekV32ForCausalLM by tests/test_reference_hf.py and to the dense-mask oracle by
tests/test_model.py) of the same seeded random tiny model (fp32) and token ids. A chunked run must give
every token the logits of the one-shot run within CHUNK_ATOL and, in every layer, the same top-k keys:
chunked indices are cache rows, one-shot ones batch rows, so both are mapped to (sequence, position)
and compared exactly (ties at the cut go to the lower index in both).

The CP matrix is pairwise, not exhaustive: for cp c (1..4) and chunk size j, the (mode, MoE backend)
pair is PAIRS[(c + j) % 4], so every (cp, chunk size), (cp, pair) and (chunk size, pair) combination
runs once: 16 chunked prefills, one spawn per cp (the cp 2 one also runs the bad inputs and the job).
Chunk sizes: 1, 7, a divisor (15) and a non-divisor (16) of the batch's 30 tokens; the batch packs several prompts per chunk, so chunks mix sequences with
and without a cached prefix, prefixes shorter than cp (chunk size 1 at cp 3, 4) and sequences with no
new token. The caller-owned-cache case adds spare capacity, a NaN-filled cache (a read of an unwritten
row would show) and hand-picked prefixes.
"""

from __future__ import annotations

import random

import pytest
import torch

from cp_attn.cache import KVCache, bytes_per_token
from cp_attn.checkpoint import RandomSource, build_model
from cp_attn.comm import Comm
from cp_attn.config import preset
from cp_attn.job import run_job
from cp_attn.layout import chunk_schedule, plan_prefix, plan_split
from cp_attn.ops.kv_fp8 import mla_fp8_width
from cp_attn.parallel import chunked_prefill, cp_prefill, expert_placement
from cp_attn.runconfig import InputSpec, PrefillConfig
from tests.spawn import run_ranks

# fp32 everywhere. A chunk changes only which rows share a matmul and how many keys the (masked)
# indexer scans: ~1e-7 relative per op, seen <= 4e-6 on logits of magnitude ~4. 2e-5 (as for
# CP, tests/test_cp_prefill.py) is far below any real bug (a wrong position, key or row moves logits
# by >= 1e-2).
CHUNK_ATOL = 2e-5
# FP8 cache (kv_dtype=fp8) against the one-shot prefill with FP8 KV: every token's latent and index key
# are quantised on their own (per-token / per-128 scales), so chunking changes their bytes only where a
# value lies within ~1e-7 relative of an e4m3 rounding boundary (not seen here); what is left is the
# fp32 difference above, seen <= 3e-6. A flipped e4m3 value would move logits by >= 1e-3.
FP8_ATOL = 2e-5
FP8_CHUNK = 7
SEED = 5
PAIRS = [("in_seq", "fused"), ("round_robin", "deepep"), ("in_seq", "deepep"), ("round_robin", "fused")]
CP_SIZES = [1, 2, 3, 4]
CHUNKS = [1, 7, 15, 16]


def _ids(lens: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(preset("tiny").vocab_size) for _ in range(n)] for n in lens]


# Longer than index_topk (8) and shorter than cp; 30 tokens: 15 divides it, 7 and 16 do not.
BATCH = _ids([14, 1, 3, 12], seed=1)
# Caller-owned cache: per step, the new tokens of each sequence (0: none); capacities leave room.
STEPS = [[3, 0, 1, 9, 0], [0, 2, 1, 0, 6], [5, 0, 2, 4, 1]]
STEP_LENS = [sum(col) for col in zip(*STEPS)]
STEP_IDS = _ids(STEP_LENS, seed=2)
STEP_SPARE = [4, 0, 3, 1, 2]


def _runs(cp: int) -> list[tuple[int, str, str]]:
    return [(chunk, *PAIRS[(cp + j) % len(PAIRS)]) for j, chunk in enumerate(CHUNKS)]


def _source() -> RandomSource:
    return RandomSource(preset("tiny"), seed=SEED)


def _to_seq_pos(idx: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """Rows (-1 = none) of a buffer whose sequence b starts at starts[b] -> [..., 2] (sequence, position)."""
    st = torch.tensor(starts)
    seq = torch.searchsorted(st, idx.long().clamp(min=0).flatten(), right=True).view(idx.shape) - 1
    pos = idx.long() - st[seq]
    return torch.stack([torch.where(idx >= 0, seq, -1), torch.where(idx >= 0, pos, -1)], dim=-1)


def _cumstarts(lens: list[int]) -> list[int]:
    return [sum(lens[:b]) for b in range(len(lens))]


def _model(backend: str, comm: Comm, cache: dict):
    if backend not in cache:
        pl = expert_placement(backend, _source().config, comm.rank, comm.size)
        cache[backend] = build_model(_source(), expert_ids=pl.expert_ids, expert_shard=pl.expert_shard)
    return cache[backend]


def _worker(comm: Comm) -> dict:
    models, results = {}, {}
    if comm.size == 2:  # bad input first: a rank left inside a collective would hang what follows
        results["bad"] = _bad_worker(comm)
        results["job"] = run_job(JOB_CFG, comm)
    for chunk, mode, backend in _runs(comm.size):
        model = _model(backend, comm, models)
        out = chunked_prefill(model, comm, BATCH, mode, backend, chunk, record_topk=True)
        results[chunk] = {
            "logits": out.split(model.logits(out.hidden)),
            "topk": {layer: _to_seq_pos(idx, list(out.cache.region_starts)) for layer, idx in out.topk.items()},
            "chunks": out.chunks, "ttft": out.ttft_s, "lengths": out.cache.lengths,
        }
    mode, backend = PAIRS[(comm.size + 1) % len(PAIRS)]
    model = _model(backend, comm, models)
    out = chunked_prefill(model, comm, BATCH, mode, backend, FP8_CHUNK, kv_dtype="fp8", record_topk=True)
    results["fp8"] = {
        "logits": out.split(model.logits(out.hidden)),
        "topk": {layer: _to_seq_pos(idx, list(out.cache.region_starts)) for layer, idx in out.topk.items()},
        "stored": (out.cache.latent[0].dtype, out.cache.latent[0].shape[1],
                   tuple(t.dtype for t in out.cache.index_k[0])),
    }
    # A caller-owned cache with spare rows, NaN-filled, fed hand-picked chunks (some sequences idle).
    mode, backend = PAIRS[comm.size % len(PAIRS)]
    model = _model(backend, comm, models)
    cache = KVCache.allocate(model.cfg, [n + s for n, s in zip(STEP_LENS, STEP_SPARE)], fill_nan=True)
    hidden, topk = [[] for _ in STEP_IDS], {}
    for new in STEPS:
        ids = [s[p : p + n] for s, p, n in zip(STEP_IDS, cache.lengths, new)]
        out = cp_prefill(model, comm, ids, mode, backend, cache=cache, record_topk=True)
        for b, h in enumerate(out.split(out.hidden)):
            hidden[b].append(h)
        for layer, idx in out.topk.items():
            for b, x in enumerate(out.split(_to_seq_pos(idx, list(cache.region_starts)))):
                topk.setdefault(layer, [[] for _ in STEP_IDS])[b].append(x)
    results["steps"] = {
        "logits": [model.logits(torch.cat(h)) for h in hidden],
        "topk": {layer: torch.cat([torch.cat(p) for p in parts]) for layer, parts in topk.items()},
        "lengths": cache.lengths,
    }
    return results


@pytest.fixture(scope="module")
def one_shot():
    """Single-process one-shot logits per sequence and top-k as (sequence, position), per batch."""
    model = build_model(_source())
    out = {}
    for name, ids, kv in (("batch", BATCH, "auto"), ("steps", STEP_IDS, "auto"), ("fp8", BATCH, "fp8")):
        ref = cp_prefill(model, Comm.single(), ids, "in_seq", "fused", record_topk=True, kv_dtype=kv)
        starts = _cumstarts([len(s) for s in ids])
        out[name] = {"logits": ref.split(model.logits(ref.hidden)),
                     "topk": {layer: _to_seq_pos(idx, starts) for layer, idx in ref.topk.items()}}
    return out


_spawned: dict[int, list[dict]] = {}


@pytest.fixture(scope="module")
def chunked_runs():
    def get(cp: int) -> list[dict]:
        if cp not in _spawned:
            _spawned[cp] = run_ranks(_worker, cp, timeout=300)
        return _spawned[cp]

    return get


def _assert_same(got: dict, ref: dict, where: str, atol: float = CHUNK_ATOL) -> None:
    for b, (g, r) in enumerate(zip(got["logits"], ref["logits"], strict=True)):
        torch.testing.assert_close(g, r, atol=atol, rtol=0, msg=lambda m: f"{where}, sequence {b}: {m}")
    assert sorted(got["topk"]) == sorted(ref["topk"]), f"{where}: layers recorded differ"
    for layer, r in ref["topk"].items():
        g = got["topk"][layer]
        bad = (g != r).any(-1).any(-1).nonzero().flatten().tolist()
        assert not bad, f"{where}, layer {layer}: top-k (sequence, position) differs at tokens {bad[:5]}"


CASES = [(cp, chunk, mode, backend) for cp in CP_SIZES for chunk, mode, backend in _runs(cp)]


@pytest.mark.multiproc
@pytest.mark.parametrize("cp,chunk,mode,backend", CASES, ids=[f"cp{c}-chunk{n}-{m}-{b}" for c, n, m, b in CASES])
def test_chunked_equals_one_shot(chunked_runs, one_shot, cp, chunk, mode, backend):
    for rank, res in enumerate(chunked_runs(cp)):
        got = res[chunk]
        _assert_same(got, one_shot["batch"], f"rank {rank}")
        assert got["chunks"] == chunk_schedule([len(s) for s in BATCH], chunk)
        assert got["lengths"] == [len(s) for s in BATCH]
        assert got["ttft"] == sorted(got["ttft"]) and got["ttft"][0] > 0  # FCFS: prompts finish in order


@pytest.mark.multiproc
@pytest.mark.parametrize("cp", CP_SIZES, ids=lambda c: f"cp{c}")
def test_caller_cache_with_mixed_prefixes_equals_one_shot(chunked_runs, one_shot, cp):
    for rank, res in enumerate(chunked_runs(cp)):
        _assert_same(res["steps"], one_shot["steps"], f"rank {rank}")
        assert res["steps"]["lengths"] == STEP_LENS


@pytest.mark.multiproc
@pytest.mark.parametrize("cp", CP_SIZES, ids=lambda c: f"cp{c}")
def test_fp8_cache_equals_one_shot_fp8(chunked_runs, one_shot, cp):
    """kv_dtype=fp8: the cache stores FlashMLA's packed latent and the (e4m3, scale) index key."""
    cfg = preset("tiny")
    for rank, res in enumerate(chunked_runs(cp)):
        _assert_same(res["fp8"], one_shot["fp8"], f"rank {rank}", atol=FP8_ATOL)
        assert res["fp8"]["stored"] == (torch.uint8, mla_fp8_width(cfg.kv_lora_rank, cfg.qk_rope_head_dim),
                                        (torch.float8_e4m3fn, torch.float32))


def test_the_matrix_is_pairwise_and_covers_the_edges():
    assert {(cp, (m, b)) for cp, _, m, b in CASES} == {(cp, p) for cp in CP_SIZES for p in PAIRS}
    assert {(n, (m, b)) for _, n, m, b in CASES} == {(n, p) for n in CHUNKS for p in PAIRS}
    assert {(cp, n) for cp, n, _, _ in CASES} == {(cp, n) for cp in CP_SIZES for n in CHUNKS}
    total = sum(len(s) for s in BATCH)
    assert 1 in CHUNKS and 7 in CHUNKS and total % 15 == 0 and total % 16 != 0 and total % 7 != 0
    assert max(len(s) for s in BATCH) > preset("tiny").index_topk        # sparse selection active
    assert any(0 < n < max(CP_SIZES) for n in map(len, BATCH))          # a prompt shorter than cp
    # the caller's steps: idle sequences, prefixes shorter than cp next to longer ones, no-prefix ones
    assert any(0 in step for step in STEPS)
    prefixes = [[sum(col[:k]) for col in zip(*STEPS)] for k in range(len(STEPS))]
    assert any(0 < p < max(CP_SIZES) for row in prefixes for p in row) and any(0 in row and max(row) > 8 for row in prefixes)


# ---- pure pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lens,n", [([5, 2, 4], 4), ([45], 15), ([1, 1, 1], 1), ([3, 9], 100)],
                         ids=["doc", "divisor", "ones", "one_chunk"])
def test_chunk_schedule_packs_the_concatenated_batch(lens, n):
    chunks = chunk_schedule(lens, n)
    assert [sum(c) for c in chunks[:-1]] == [n] * (len(chunks) - 1) and 0 < sum(chunks[-1]) <= n
    assert [sum(col) for col in zip(*chunks)] == lens
    # every sequence's pieces are contiguous and in order: it is active in one run of chunks
    for col in zip(*chunks):
        active = [i for i, x in enumerate(col) if x]
        assert active == list(range(active[0], active[-1] + 1))
    if lens == [5, 2, 4]:
        assert chunks == [[4, 0, 0], [1, 2, 1], [0, 0, 3]]


@pytest.mark.parametrize("cp", [1, 3, 4], ids=lambda c: f"cp{c}")
@pytest.mark.parametrize("mode", ["in_seq", "round_robin"])
def test_prefix_plan_without_prefix_is_the_plain_split(cp, mode):
    lens = [7, 1, 12, 3]
    plan = plan_split(lens, cp, mode)
    pp = plan_prefix(lens, [0] * len(lens), _cumstarts(lens), cp, mode)
    for r in range(cp):
        assert torch.equal(pp.positions(r), plan.positions(r))
        assert all(torch.equal(a, b) for a, b in zip(pp.key_range(r), plan.key_range(r)))
    assert torch.equal(pp.cache_rows, torch.arange(sum(lens)))


@pytest.mark.parametrize("cp", [1, 2, 4], ids=lambda c: f"cp{c}")
@pytest.mark.parametrize("mode", ["in_seq", "round_robin"])
def test_prefix_plan_counts_the_prefix(cp, mode):
    new, prefix, cap = [3, 0, 5, 1], [2, 4, 0, 9], [6, 4, 8, 12]
    starts = _cumstarts(cap)
    pp = plan_prefix(new, prefix, starts, cp, mode)
    seen = []
    for r in range(cp):
        tok = pp.token_index(r)
        real = tok >= 0
        pos, (ks, ke) = pp.positions(r), pp.key_range(r)
        rows = pp.cache_rows[tok[real]]                        # where each real row's KV is written
        seq = _to_seq_pos(rows, starts)[:, 0]
        assert torch.equal(rows, torch.tensor(starts)[seq] + pos[real])      # row = region + position
        assert torch.equal(ks[real], torch.tensor(starts)[seq]) and torch.equal(ke[real], rows + 1)
        assert bool((ks[~real] == ke[~real]).all())                           # padding: empty range
        seen += [(int(s), int(p)) for s, p in zip(seq, pos[real])]
    want = [(b, p) for b in range(4) for p in range(prefix[b], prefix[b] + new[b])]
    assert sorted(seen) == want                                 # every new token on exactly one rank


def test_prefix_plan_refuses_an_empty_chunk_and_bad_counts():
    with pytest.raises(ValueError, match="no new token"):
        plan_prefix([0, 0], [1, 2], [0, 5], 2, "in_seq")
    with pytest.raises(ValueError, match=r"prefix_lens\[1\] = -1"):
        plan_prefix([1, 1], [0, -1], [0, 5], 2, "in_seq")
    with pytest.raises(ValueError, match="one entry per sequence"):
        plan_prefix([1, 1], [0], [0, 5], 2, "in_seq")


# ---- the cache itself ----------------------------------------------------------------------------


def test_cache_bytes_per_token_at_v32_dims():
    v32 = preset("v32")
    assert bytes_per_token(v32, "bf16") == 61 * (576 * 2 + 128 * 2) == 61 * 1408
    assert bytes_per_token(v32, "fp8") == 61 * (656 + 132) == 61 * 788
    tiny = preset("tiny")
    for kv, dt in (("auto", torch.float32), ("bf16", torch.bfloat16), ("fp8", torch.float32)):
        cache = KVCache.allocate(tiny, [3, 5], kv, dt)
        assert cache.nbytes == 8 * bytes_per_token(tiny, kv, dt), kv


def test_cache_maps_rows_back_to_tokens():
    cache = KVCache.allocate(preset("tiny"), [3, 1, 4])
    seq, pos = cache.token_of(torch.tensor([[0, 2, 3], [4, 7, -1]]))
    assert seq.tolist() == [[0, 0, 1], [2, 2, -1]] and pos.tolist() == [[0, 2, 0], [0, 3, -1]]


def test_dense_mask_oracle_over_a_cache_equals_one_shot():
    """attn_impl=dense_mask reads the whole cache (masked): one process, chunks of 5."""
    model = build_model(_source())
    ids = BATCH[:2]
    ref = cp_prefill(model, Comm.single(), ids, "in_seq", "fused", attn_impl="dense_mask")
    out = chunked_prefill(model, Comm.single(), ids, "in_seq", "fused", 5, attn_impl="dense_mask")
    torch.testing.assert_close(out.hidden, ref.hidden, atol=CHUNK_ATOL, rtol=0)


def test_chunked_benchmark_record_runs_on_cpu():
    """cp_attn.bench.prefill.time_chunked_prefill (scripts/bench_prefill.py --chunked) on the tiny model."""
    from cp_attn.bench.prefill import time_chunked_prefill

    rec = time_chunked_prefill(build_model(_source()), 20, 8, kernels="torch")
    assert (rec["length"], rec["chunk_size"], rec["chunks"], len(rec["chunk_ms"])) == (20, 8, 3, 3)
    assert rec["one_shot_ttft_ms"] > 0 and rec["chunked_ttft_ms"] >= sum(rec["chunk_ms"]) * 0.99
    assert rec["chunking_cost"] > 0 and rec["cache_gib"] * 2**30 == 20 * bytes_per_token(preset("tiny"), "auto", torch.float32)


# ---- bad input: clear errors on every rank before any collective ------------------------------------


def _bad_cases() -> dict[str, tuple[dict, str]]:
    """name -> (what to run, text the error must contain)."""
    tiny = preset("tiny")
    return {
        "chunk_zero": (dict(chunk=0), "chunk_size must be an int >= 1"),
        "chunk_negative": (dict(chunk=-3), "chunk_size must be an int >= 1"),
        "beyond_max_positions": (dict(cache_cfg=tiny.replace(max_position_embeddings=1024), caps=[600, 4],
                                      lengths=[510, 0], new=[5, 1]), "max_position_embeddings=512"),
        "beyond_capacity": (dict(caps=[4, 4], lengths=[3, 0], new=[2, 1]), "capacity 4"),
        "other_shape": (dict(cache_cfg=tiny.replace(kv_lora_rank=48), caps=[4, 4]), "another model shape"),
        "other_layers": (dict(cache_cfg=tiny.replace(num_hidden_layers=2), caps=[4, 4]), "another model shape"),
        "other_kv_dtype": (dict(kv="fp8", caps=[4, 4]), "kv_dtype=fp8"),
        "other_batch": (dict(caps=[4, 4, 4]), "batch of 3 sequences"),
        "nothing_new": (dict(caps=[4, 4], new=[0, 0]), "no new token"),
        "job_chunk_zero": (dict(job=0), "chunk_size must be an int >= 1"),
    }


def _bad_worker(comm: Comm) -> dict[str, str]:
    model = build_model(_source())
    errors = {}
    for name, (case, _) in _bad_cases().items():
        try:
            if "job" in case:
                run_job(PrefillConfig(input=InputSpec(chunk_size=case["job"])), comm)
            elif "chunk" in case:
                chunked_prefill(model, comm, BATCH, "in_seq", "fused", case["chunk"])
            else:
                cache = KVCache.allocate(case.get("cache_cfg", model.cfg), case["caps"], case.get("kv", "auto"))
                cache.lengths = list(case.get("lengths", [0] * len(case["caps"])))
                new = case.get("new", [1, 1])
                cp_prefill(model, comm, [s[:n] for s, n in zip(BATCH, new)], "in_seq", "fused", cache=cache)
        except ValueError as e:
            errors[name] = str(e)
        else:
            errors[name] = "<no error>"
    comm.barrier()  # every rank got here: none is stuck in a collective
    return errors


@pytest.mark.multiproc
def test_bad_input_fails_on_every_rank_before_any_collective(chunked_runs):
    for rank, res in enumerate(chunked_runs(2)):
        errors = res["bad"]
        for name, (_, needle) in _bad_cases().items():
            assert needle in errors[name], f"rank {rank}, case {name}: {errors[name]!r} lacks {needle!r}"


# ---- the job ---------------------------------------------------------------------------------------


JOB_CFG = PrefillConfig(input=InputSpec(chunk_size=6), check=True)


@pytest.mark.multiproc
def test_job_prefills_in_chunks_with_the_one_shot_logits(chunked_runs):
    """input.chunk_size=6 on 2 ranks: check=true compares with the one-shot single-process logits."""
    lens = InputSpec().lengths
    report = chunked_runs(2)[0]["job"]
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] < CHUNK_ATOL
    assert report["argmax_match"] == 1.0
    assert (report["tokens"], report["chunk_size"], report["chunks"]) == (sum(lens), 6, -(-sum(lens) // 6))
    assert len(report["ttft_s"]) == len(lens) and report["ttft_s"] == sorted(report["ttft_s"])
    assert 0 < report["ttft_s"][-1] <= report["seconds"]
