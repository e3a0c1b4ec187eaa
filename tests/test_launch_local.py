"""cp_attn.launch_local: the CP prefill started from Python, checked against the single-process reference.

Reference: `reference_prefill`, the same batch through `ForwardContext.single` (no process group, every
expert), itself checked against transformers in tests/test_reference_hf.py. Each rank's rows must be the
pure layout's (`plan_split`), its logits equal the reference to fp32 rounding and its top-k sets exactly.
One spawn per test; bad input must fail in the caller before any process starts.
"""

from __future__ import annotations

import pytest
import torch

import cp_attn.launch_local as launch
from cp_attn.comm import Comm
from cp_attn.config import preset
from cp_attn.inputs import random_prompts
from cp_attn.launch_local import RankResult, reference_prefill, run_cp_prefill, run_cp_prefill_sizes, run_gather
from cp_attn.layout import plan_split

# fp32; CP changes only summation order (see tests/test_cp_prefill.py for the derivation).
CP_ATOL = 2e-5
BATCH = [23, 1, 9, 3]


def _check_against_reference(ranks: list[RankResult], ref: RankResult, seq_lens, mode: str) -> None:
    plan = plan_split(seq_lens, len(ranks), mode)
    for r, res in enumerate(ranks):
        tok = plan.token_index(r)
        assert res.rank == r
        assert (res.rows, res.pad_rows) == (int((tok >= 0).sum()), int((tok < 0).sum()))
        assert res.seconds > 0 and res.stages_s["attn.indexer"] > 0
        assert [x.shape[0] for x in res.logits] == list(seq_lens)
        assert res.max_abs_diff(ref) < CP_ATOL, f"rank {r}"
        assert res.same_topk(ref), f"rank {r}: top-k differs"


@pytest.mark.multiproc
def test_sizes_share_one_set_of_processes_and_match_the_reference():
    runs = run_cp_prefill_sizes(BATCH, [3, 1, 2], "round_robin", "deepep", warmup=1, timeout=240)
    ref = reference_prefill(BATCH)
    assert sorted(runs) == [1, 2, 3]
    for C, ranks in runs.items():
        assert len(ranks) == C
        _check_against_reference(ranks, ref, BATCH, "round_robin")


@pytest.mark.multiproc
def test_one_size_from_token_ids_and_a_model_config():
    cfg = preset("tiny", index_topk=5, num_hidden_layers=2)
    ids = random_prompts([17, 2, 6], cfg.vocab_size, seed=3)
    ranks = run_cp_prefill(ids, 2, "in_seq", "fused", model=cfg, seed=7, timeout=180)
    ref = reference_prefill(ids, model=cfg, seed=7)
    _check_against_reference(ranks, ref, [17, 2, 6], "in_seq")
    assert sorted(ref.topk) == [0, 1] and ref.topk[0].shape == (25, 5)
    other_weights = reference_prefill(ids, model=cfg, seed=8)
    assert ranks[0].max_abs_diff(other_weights) > 1e-2       # the seed reached the ranks


@pytest.mark.multiproc
@pytest.mark.parametrize("mode", ["in_seq", "round_robin"])
def test_gather_restores_global_order(mode):
    seq_lens, C = [5, 1, 3], 2
    plan = plan_split(seq_lens, C, mode)
    x = torch.randn(plan.num_tokens, 3, generator=torch.Generator().manual_seed(0))
    results = run_gather(x, seq_lens, C, mode)
    slots = plan.gathered_token_index
    for r, res in enumerate(results):
        tok = plan.token_index(r)
        assert torch.equal(res.local[tok >= 0], x[tok[tok >= 0]]) and (res.local[tok < 0] == 0).all()
        assert torch.equal(res.buffer[slots >= 0], x[slots[slots >= 0]]) and (res.buffer[slots < 0] == 0).all()
        assert torch.equal(res.gathered, x)


BAD = {
    "unknown-mode": (dict(batch=BATCH, cp_sizes=[2], mode="diagonal"), "unknown CP split mode"),
    "unknown-backend": (dict(batch=BATCH, cp_sizes=[2], moe_backend="ring"), "unknown MoE backend"),
    "experts-not-divisible": (dict(batch=BATCH, cp_sizes=[5], moe_backend="deepep"), "divisible by the CP size"),
    "token-outside-vocab": (dict(batch=[[1, 2, 9999]], cp_sizes=[2]), "outside the vocabulary"),
    "empty-sequence": (dict(batch=[[1], []], cp_sizes=[2]), "is empty"),
    "no-sizes": (dict(batch=BATCH, cp_sizes=[]), "non-empty list of ints"),
    "size-zero": (dict(batch=BATCH, cp_sizes=[0]), "ints >= 1"),
    "repeated-size": (dict(batch=BATCH, cp_sizes=[2, 2]), "repeats"),
    "negative-warmup": (dict(batch=BATCH, cp_sizes=[2], warmup=-1), "warmup must be"),
    "unknown-kernels": (dict(batch=BATCH, cp_sizes=[2], kernels="cuda-magic"), "unknown kernel set"),
    "unknown-preset": (dict(batch=BATCH, cp_sizes=[2], model="huge"), "unknown model preset"),
}


@pytest.mark.parametrize("kw,match", BAD.values(), ids=BAD.keys())
def test_bad_input_fails_before_any_process_starts(monkeypatch, kw, match):
    def no_spawn(*a, **k):
        raise AssertionError("a process was started for bad input")

    monkeypatch.setattr(launch, "run_ranks", no_spawn)
    with pytest.raises(ValueError, match=match):
        run_cp_prefill_sizes(**kw)


def test_gather_checks_the_tensor_against_the_batch(monkeypatch):
    monkeypatch.setattr(launch, "run_ranks", lambda *a, **k: pytest.fail("spawned"))
    with pytest.raises(ValueError, match="x has 4 rows but the batch"):
        run_gather(torch.zeros(4, 2), [2, 3], 2, "in_seq")


def test_run_ranks_refuses_bad_sizes_and_backends():
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        launch.run_ranks(print, 0)
    with pytest.raises(ValueError, match="unknown process-group backend"):
        launch.run_ranks(print, 1, backend="mpi")


def test_import_root_lets_spawned_ranks_import_test_modules():
    from tests import spawn

    assert launch._import_root(spawn.run_ranks) is not None            # cp_attn's own root
    assert launch._import_root(test_import_root_lets_spawned_ranks_import_test_modules) == str(
        __import__("pathlib").Path(__file__).resolve().parents[1])


def test_subgroup_of_a_single_process():
    comm = Comm.single()
    assert comm.subgroup(1) is comm
    for bad in (0, 2, True):
        with pytest.raises(ValueError, match="needs 1 <= size <= 1"):
            comm.subgroup(bad)


def test_rank_result_comparisons():
    ref = RankResult(0, 2, 0, 1.0, {}, [torch.zeros(2, 3)], {0: torch.tensor([[0, -1], [0, 1]])})
    close = RankResult(0, 2, 0, 1.0, {}, [torch.full((2, 3), 1e-6)], {0: torch.tensor([[0, -1], [0, 1]])})
    other = RankResult(0, 2, 0, 1.0, {}, None, {0: torch.tensor([[0, -1], [1, 0]])})
    assert close.max_abs_diff(ref) == pytest.approx(1e-6) and close.same_topk(ref)
    assert not other.same_topk(ref) and not RankResult(0, 2, 0, 1.0, {}).same_topk(ref)
    with pytest.raises(ValueError, match="need logits"):
        other.max_abs_diff(ref)
