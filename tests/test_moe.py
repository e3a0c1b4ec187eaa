"""DeepSeek V3.2 MoE (`cp_attn.model.moe`), single process, `preset('tiny')` shapes.

Reference, per test:
- the gate: a plain-Python transcription of DESIGN.md section 2's gate (sigmoid, correction bias for
  selection only, group top-2 scores, topk_group, normalise, scale), and hand-worked cases;
- sharded and subset MoE layers (what the fused and deepep backends hold): the unsharded layer with
  every expert, built from the same seeded weights.
"""

from __future__ import annotations

import pytest
import torch

from cp_attn.checkpoint import RandomSource, build_model
from cp_attn.config import ModelConfig, preset
from cp_attn.model import Gate, moe_local
from cp_attn.model.layers import shard_range

# One fp32 layer vs its reference: a few ulp of O(1) values.
FP32_ATOL = 1e-5
FP32_RTOL = 1e-5

TINY = preset("tiny")

# ---- MoE gate -----------------------------------------------------------------------------------


def ref_gate(s: list[float], bias: list[float], cfg: ModelConfig) -> dict[int, float]:
    """DESIGN.md's gate for one token: expert id -> routing weight."""
    E, G = cfg.n_routed_experts, cfg.n_group
    per = E // G
    b = [si + bi for si, bi in zip(s, bias)]
    group_score = [sum(sorted(b[g * per : (g + 1) * per], reverse=True)[:2]) for g in range(G)]
    kept = sorted(range(G), key=lambda g: -group_score[g])[: cfg.topk_group]
    candidates = [e for e in range(E) if e // per in kept]          # dropped groups never compete
    chosen = sorted(candidates, key=lambda e: -b[e])[: cfg.num_experts_per_tok]
    total = sum(s[e] for e in chosen) if cfg.norm_topk_prob else 1.0
    return {e: s[e] / total * cfg.routed_scaling_factor for e in chosen}


def gate_with_scores(cfg: ModelConfig, scores: list[list[float]], bias: list[float]) -> tuple[Gate, torch.Tensor]:
    """A gate whose weight is [I | 0], fed x = logit(scores): sigmoid(x W^T) == scores."""
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, : cfg.n_routed_experts] = torch.eye(cfg.n_routed_experts)
        gate.e_score_correction_bias.copy_(torch.tensor(bias))
    x = torch.zeros(len(scores), cfg.hidden_size)
    x[:, : cfg.n_routed_experts] = torch.logit(torch.tensor(scores, dtype=torch.float64)).float()
    return gate, x


def gate_as_dicts(gate: Gate, x: torch.Tensor) -> list[dict[int, float]]:
    idx, w = gate(x)
    assert idx.shape == w.shape == (x.shape[0], gate.top_k)
    return [dict(zip(i.tolist(), ww.tolist())) for i, ww in zip(idx, w)]


# Tiny: 12 experts in 4 groups of 3, topk_group 2, 3 experts a token, routed_scaling_factor 2.5.
HAND_SCORES = [0.9, 0.05, 0.05,  0.6, 0.6, 0.1,  0.5, 0.45, 0.52,  0.1, 0.1, 0.1]
# Group scores (top-2 sums): 0.95, 1.2, 1.02, 0.2 -> keep groups 1 and 2; expert 0 (the best single
# score, 0.9) is in dropped group 0 and must not be chosen.


@pytest.mark.parametrize(
    "bias,want",
    [
        ([0.0] * 12, {3, 4, 8}),
        ([-1.0] * 12, {3, 4, 8}),  # all biased scores < 0: dropped groups must be -inf, not 0
        ([0.0] * 9 + [0.6] * 3, {9, 10, 11}),  # bias lifts group 3 (score 1.4) and its experts
        ([0.0] * 6 + [0.0, 0.2, 0.0] + [0.0] * 3, {3, 4, 7}),  # bias reorders inside a kept group
    ],
    ids=["no-bias", "negative-bias", "bias-changes-groups", "bias-changes-experts"],
)
def test_gate_hand_case(bias, want):
    gate, x = gate_with_scores(TINY, [HAND_SCORES], bias)
    (got,) = gate_as_dicts(gate, x)
    assert set(got) == want
    ref = ref_gate(HAND_SCORES, bias, TINY)
    assert set(ref) == want
    for e in want:  # weights from the unbiased scores, normalised, times 2.5
        assert got[e] == pytest.approx(ref[e], rel=FP32_RTOL)
    assert sum(got.values()) == pytest.approx(TINY.routed_scaling_factor, rel=FP32_RTOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gate_matches_plain_python_reference(seed):
    g = torch.Generator().manual_seed(seed)
    cfg = TINY
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=g) * cfg.hidden_size**-0.5)
        bias = 0.3 * torch.randn(cfg.n_routed_experts, generator=g)  # comparable to score spreads
        gate.e_score_correction_bias.copy_(bias)
    x = torch.randn(64, cfg.hidden_size, generator=g)
    scores = torch.sigmoid(x.double() @ gate.weight.double().T).tolist()
    got = gate_as_dicts(gate, x)
    changed = 0
    for t in range(x.shape[0]):
        ref = ref_gate(scores[t], bias.tolist(), cfg)
        assert set(got[t]) == set(ref), f"token {t}"
        for e in ref:
            assert got[t][e] == pytest.approx(ref[e], rel=FP32_RTOL)
        changed += set(ref) != set(ref_gate(scores[t], [0.0] * cfg.n_routed_experts, cfg))
    assert changed > 0, "the correction bias must change some selections for this test to mean anything"


# ---- MoE sharding -------------------------------------------------------------------------------

MOE_CFG = TINY.replace(num_hidden_layers=2)  # layer 0 dense, layer 1 MoE


def moe_input(seed: int = 0) -> torch.Tensor:
    return torch.randn(40, TINY.hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("inter", [24, 25], ids=["inter24", "inter25"])
@pytest.mark.parametrize("n", [2, 3, 4], ids=lambda n: f"{n}-shards")
def test_expert_shards_sum_to_full_moe(inter, n):
    cfg = MOE_CFG.replace(moe_intermediate_size=inter)
    source = RandomSource(cfg, seed=1)
    x = moe_input()
    with torch.no_grad():
        full = moe_local(build_model(source).layers[1].mlp, x)
        parts, widths = [], []
        for i in range(n):
            moe = build_model(source, expert_shard=(i, n)).layers[1].mlp
            widths.append(moe.experts["0"].gate_proj.weight.shape[0])
            start, stop = shard_range(inter * cfg.n_shared_experts, i, n)
            assert moe.shared_experts.down_proj.weight.shape[1] == stop - start
            parts.append(moe_local(moe, x))
    assert sum(widths) == inter and len(set(widths)) == (1 if inter % n == 0 else 2)
    assert all((p - full).abs().max() > 1e-3 for p in parts), "each shard alone is only part of the output"
    torch.testing.assert_close(sum(parts), full, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_expert_subset_computes_only_its_experts():
    source = RandomSource(MOE_CFG, seed=2)
    x = moe_input(1)
    full = build_model(source).layers[1].mlp
    subsets = [[0, 5, 7], [1, 2, 3, 4], [6, 8, 9, 10, 11]]  # a partition of the 12 experts
    with torch.no_grad():
        idx, w = full.gate(x)
        partial = []
        for ids in subsets:
            moe = build_model(source, expert_ids=ids).layers[1].mlp
            assert moe.expert_ids == ids
            got = moe.routed(x, idx, w)
            want = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for k in range(idx.shape[1]):
                    e = int(idx[t, k])
                    if e in ids:
                        want[t] += w[t, k] * full.experts[str(e)](x[t : t + 1])[0]
            torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)
            partial.append(got)
        torch.testing.assert_close(sum(partial), full.routed(x, idx, w), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_moe_rejects_unknown_expert_ids():
    with pytest.raises(ValueError, match="12"):
        build_model(RandomSource(MOE_CFG), expert_ids=[0, 12])
