"""cp_attn.explore: the indexer traces of a real forward, ties at the top-k cut, result records.

References: the top-k the forward itself records (`reference_prefill`, the `on_topk` observer) and the
top-k property (no unselected causal key scores above a selected one); hand-built score rows whose ties
are known; the committed GPU results file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cp_attn.checkpoint import RandomSource, build_model
from cp_attn.config import preset
from cp_attn.explore import IndexerTrace, cut_ties, group_stages, load_records, parallel_efficiency, trace_indexer
from cp_attn.inputs import random_prompts
from cp_attn.launch_local import reference_prefill

ROOT = Path(__file__).resolve().parents[1]
NEG = float("-inf")


@pytest.fixture(scope="module")
def traced():
    cfg = preset("tiny")
    ids = random_prompts([30, 1, 12], cfg.vocab_size, seed=5)
    return cfg, ids, trace_indexer(build_model(RandomSource(cfg, seed=0)), ids)


def test_trace_has_every_layer_and_the_forward_s_own_topk(traced):
    cfg, ids, traces = traced
    ref = reference_prefill(ids, model=cfg)                      # the forward's own on_topk record
    assert sorted(traces) == list(range(cfg.num_hidden_layers))
    for layer, tr in traces.items():
        T = sum(map(len, ids))
        assert tr.logits.shape == (T, T) and tr.topk.shape == (T, cfg.index_topk)
        assert torch.equal(tr.topk, ref.topk[layer])


def test_trace_scores_only_causal_keys_and_topk_takes_the_best(traced):
    _, _, traces = traced
    for tr in traces.values():
        causal, sel = tr.causal, tr.selected
        assert torch.isfinite(tr.logits[causal]).all() and (tr.logits[~causal] == NEG).all()
        assert not (sel & ~causal).any()
        worst_taken = torch.where(sel, tr.logits, float("inf")).amin(-1)
        best_left = torch.where(causal & ~sel, tr.logits, NEG).amax(-1)
        assert (best_left <= worst_taken).all()
        assert torch.equal(sel.sum(-1), causal.sum(-1).clamp(max=tr.topk.shape[1]))


def test_real_ties_at_the_cut_are_broken_lowest_index_first(traced):
    _, _, traces = traced
    seen = 0
    for tr in traces.values():
        ties = cut_ties(tr)
        assert ties.lowest_first[ties.at_cut].all()
        seen += int(ties.at_cut.sum())
    assert seen, "this batch was picked because ReLU zeros tie at the cut in some rows"


def _trace(rows: list[list[float]], topk: list[list[int]]) -> IndexerTrace:
    """A one-sequence trace from score rows (causal prefix of each row; the rest -inf)."""
    T = len(rows)
    logits = torch.full((T, T), NEG)
    for t, row in enumerate(rows):
        logits[t, : len(row)] = torch.tensor(row)
    return IndexerTrace(logits, torch.tensor(topk, dtype=torch.int32), torch.zeros(T, dtype=torch.long),
                        torch.arange(1, T + 1))


# Row 4 has 5 causal keys, K = 3: key 0 (3.0) and key 4 (1.0) beat the three keys tied at 0.0; one of those fits.
ROWS = [[1.0], [1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0, 1.0]]


def test_cut_ties_on_known_rows():
    tr = _trace(ROWS, [[0, -1, -1], [0, 1, -1], [0, 1, 2], [0, 1, 2], [0, 1, 4]])
    ties = cut_ties(tr)
    assert ties.has_cut.tolist() == [False, False, False, True, True]
    assert ties.tied.tolist() == [0, 0, 0, 2, 3]        # rows without a cut have no tie; row 3: keys 1 and 3
    assert ties.taken.tolist() == [0, 0, 0, 1, 1]
    assert ties.at_cut.tolist() == [False, False, False, True, True]
    assert ties.lowest_first.tolist()[3:] == [True, True]


def test_cut_ties_flags_a_tie_broken_the_other_way():
    ties = cut_ties(_trace(ROWS, [[0, -1, -1], [0, 1, -1], [0, 1, 2], [0, 2, 3], [0, 3, 4]]))
    assert ties.at_cut.tolist()[3:] == [True, True]
    assert ties.lowest_first.tolist()[3:] == [False, False]


def test_load_records_splits_the_machine_line_from_the_runs():
    machine, runs = load_records(ROOT / "docs/results/h200x4_v32slim_bench16k.jsonl")
    assert machine["device"] == "NVIDIA H200" and machine["bf16_matmul_tflops"] > 0
    assert len(runs) == 9 and {r["cp_size"] for r in runs} == {1, 2, 4}
    machine, runs = load_records(ROOT / "docs/results/h200x4_v32slim_compare.jsonl")
    assert machine is None and [r["dtype"] for r in runs] == ["torch.float32", "torch.bfloat16"]


def test_load_records_names_a_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"cp_size": 1, "seconds": 1.0}) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"r\.jsonl:3 is not a JSON line"):
        load_records(path)


def test_group_stages_keeps_every_second():
    stages = {"attn.indexer": 1.0, "attn.sparse_mla": 2.0, "moe": 0.5, "mlp": 0.25, "attn.gather": 0.125,
              "final.gather": 0.0625, "embed": 0.01, "attn.proj": 0.02, "attn.out_proj": 0.04, "new.stage": 0.3}
    groups = group_stages(stages)
    assert list(groups) == ["indexer", "sparse MLA", "MoE / MLP", "gathers", "projections", "other"]
    assert groups["MoE / MLP"] == 0.75 and groups["gathers"] == 0.1875 and groups["other"] == 0.3
    assert sum(groups.values()) == pytest.approx(sum(stages.values()))
    assert "other" not in group_stages({"attn.indexer": 1.0})


def test_parallel_efficiency_of_the_committed_16k_records():
    """docs/benchmarks.md's table: 2472 ms at C = 1; 687 ms (in_seq + fused) and 651 ms (in_seq + deepep) at 4."""
    _, runs = load_records(ROOT / "docs/results/h200x4_v32slim_bench16k.jsonl")
    eff = parallel_efficiency(runs)
    assert eff["in_seq", "fused"][0] == (1, 100.0)
    assert [c for c, _ in eff["in_seq", "fused"]] == [1, 2, 4] and [c for c, _ in eff["round_robin", "deepep"]] == [2, 4]
    assert eff["in_seq", "fused"][-1][1] == pytest.approx(100 * 2472 / (4 * 687), abs=0.1)
    assert eff["in_seq", "deepep"][-1][1] == pytest.approx(100 * 2472 / (4 * 651), abs=0.1)
    with pytest.raises(ValueError, match="no records"):
        parallel_efficiency([])
