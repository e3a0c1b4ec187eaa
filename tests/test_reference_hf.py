"""cp_attn's single-process reference against an implementation nobody here wrote.

Reference: transformers' `DeepseekV32ForCausalLM` in fp32, eager attention and eager experts, run
on one sequence at a time (tests/hf_reference.py). Both sides read the same `save_pretrained`
checkpoint of a tiny random V3.2 (YaRN on, group-limited routing with a random correction bias,
random norms and LayerNorm bias, index_topk = 8 below the longer sequences).

Checked: per-token logits of `cp_attn.reference_logits`, the indexer's selected key set of every
layer, position and sequence (cp_attn through `cp_prefill` on one rank), the config reading that
both rest on, and the input errors.

Ties. The indexer's ReLU makes exact-zero scores common (all 4 heads clipped), so the k-th and
(k+1)-th best keys of a row can tie, and two correct implementations then keep different keys
(and everything downstream differs). The sequences below were chosen (by a search over token
seeds) so that no compared row has a near-tie at its cut; `test_no_near_tie_at_topk_cut` asserts
it, so the set and logits comparisons can be neither flaky nor a coin toss.
"""

from __future__ import annotations

import pytest
import torch

import cp_attn
from cp_attn.checkpoint import SafetensorsSource, build_model
from cp_attn.comm import Comm
from cp_attn.model.rope import rope_inv_freq
from cp_attn.ops import KernelSet, naive
from cp_attn.parallel import cp_prefill
from tests.hf_reference import (
    TIE_FREE_MODEL_SEED as MODEL_SEED,
    TIE_FREE_SEQUENCES as SEQUENCES,
    causal_sets,
    hf_logits,
    hf_topk_sets,
    make_hf_checkpoint,
    seeded_tokens,
)

# SEQUENCES: name -> (length, token seed). Lengths 1 and 5 are below index_topk (K = 8): every causal
# key is selected. 23 and 40 exceed K (selection matters), and 40 runs past YaRN's
# original_max_position_embeddings = 32. The token seeds of the long ones were picked so that no
# row of any layer has a near-tie at its top-k cut (about 1 in 70 random length-40 prompts qualify).

# fp32 logits of magnitude ~4-5: the two implementations differ only in summation order (absorbed
# vs naive MLA, fused vs per-expert MoE) and in cp_attn's extra Hadamard rotation in the indexer,
# i.e. a few fp32 ulps per op over 3 layers. Observed max |diff| ~3.3e-6 (7.5e-7 of the largest
# |logit|). 1e-5 of the largest |logit| leaves >10x headroom; any real error (a wrong RoPE layout,
# scale, routing or selection) moves logits by 1e-2 or more.
LOGITS_ATOL_REL = 1e-5
# A row's k-th and (k+1)-th best index scores must differ by more than this fraction of the row's
# largest |score|. cp_attn's and HF's index scores differ by rounding only (measured <= 2.4e-6 on
# scores up to ~5, i.e. ~5e-7 relative), so a gap 200x that cannot be flipped by rounding.
TOPK_TIE_MARGIN_REL = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(checkpoint dir, HF model, config, the batch of sequences)."""
    path, model = make_hf_checkpoint(tmp_path_factory.mktemp("hf_v32") / "ckpt", seed=MODEL_SEED)
    seqs = [seeded_tokens(n, s, model.config.vocab_size) for n, s in SEQUENCES.values()]
    return path, model, model.config, seqs


@pytest.fixture(scope="module")
def cp_run(hf):
    """cp_attn on one rank over the whole batch: (PrefillOutput, per layer the indexer logits [T, T]
    it selected on, -inf outside each row's causal range), recorded through the top-k stage."""
    path, _, cfg, seqs = hf
    model = build_model(SafetensorsSource(path))
    logits_seen: list[torch.Tensor] = []

    def recording_topk(logits, ks, ke, topk):
        logits_seen.append(logits.clone())
        return naive.topk_indices(logits, ks, ke, topk)

    out = cp_prefill(model, Comm.single(), seqs, "in_seq", "fused", record_topk=True,
                     kernels=KernelSet(topk_indices=recording_topk))
    # One query chunk per layer (T < query_chunk), called in layer order.
    assert len(logits_seen) == cfg.num_hidden_layers
    return out, logits_seen


@pytest.fixture(scope="module")
def hf_sets(hf):
    """HF's causal key sets: per sequence, layer -> per position."""
    return hf_topk_sets(hf[1], hf[3])


def _starts(seqs) -> list[int]:
    lens = torch.tensor([len(s) for s in seqs])
    return (lens.cumsum(0) - lens).tolist()


SEQ_IDS = list(SEQUENCES)
LAYERS = [0, 1, 2]


# ---- config --------------------------------------------------------------------------------------


def test_config_and_rope_read_like_hf(hf):
    path, model, cfg, _ = hf
    ours = SafetensorsSource(path).config
    assert (ours.num_hidden_layers, ours.index_topk, ours.first_k_dense_replace) == (
        cfg.num_hidden_layers, cfg.index_topk, cfg.first_k_dense_replace)
    assert ours.rope_type == "yarn"
    # HF scales cos/sin by attention_factor; cp_attn never does, which is right only when it is 1.
    assert model.model.rotary_emb.attention_scaling == 1.0
    torch.testing.assert_close(rope_inv_freq(ours), model.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)
    assert ours.softmax_scale == pytest.approx(model.model.layers[0].self_attn.scaling, rel=1e-12)


# ---- logits --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both_logits(hf):
    path, model, _, seqs = hf
    return cp_attn.reference_logits(path, seqs), hf_logits(model, seqs)


@pytest.mark.parametrize("b", range(len(SEQ_IDS)), ids=SEQ_IDS)
def test_logits_match_hf(both_logits, hf, b):
    ours, theirs = both_logits[0][b], both_logits[1][b]
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape == (len(hf[3][b]), hf[2].vocab_size)
    atol = LOGITS_ATOL_REL * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)


# ---- indexer top-k sets --------------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS, ids=[f"layer{i}" for i in LAYERS])
def test_no_near_tie_at_topk_cut(hf, cp_run, layer):
    """Precondition of the set comparison: every row with more than K causal keys has a clear gap
    between its K-th and (K+1)-th best index score, and such rows exist in this layer."""
    _, _, cfg, seqs = hf
    K = cfg.index_topk
    logits = cp_run[1][layer]
    cut_rows, worst = 0, (float("inf"), None)
    for name, seq, st in zip(SEQ_IDS, seqs, _starts(seqs)):
        for s in range(K, len(seq)):                       # rows with s + 1 > K causal keys
            row = logits[st + s, st : st + s + 1]
            assert torch.isfinite(row).all(), f"{name} pos {s}: -inf inside the causal range"
            v = row.sort(descending=True).values
            gap = float(v[K - 1] - v[K]) / float(row.abs().max())
            cut_rows += 1
            if gap < worst[0]:
                worst = (gap, f"{name} pos {s}")
    assert cut_rows > 0, "no row exceeds index_topk: selection would not matter"
    assert worst[0] > TOPK_TIE_MARGIN_REL, (
        f"layer {layer}: near-tie at the top-k cut (relative gap {worst[0]:.3g} at {worst[1]}); "
        "pick other token seeds in SEQUENCES")


@pytest.mark.parametrize("b", range(len(SEQ_IDS)), ids=SEQ_IDS)
@pytest.mark.parametrize("layer", LAYERS, ids=[f"layer{i}" for i in LAYERS])
def test_topk_sets_match_hf(hf, cp_run, hf_sets, layer, b):
    _, _, cfg, seqs = hf
    out = cp_run[0]
    seq, st = seqs[b], _starts(seqs)[b]
    idx = out.topk[layer][st : st + len(seq)]               # [L, K] global token ids, -1 = empty
    assert idx.shape == (len(seq), cfg.index_topk)
    local = torch.where(idx >= 0, idx - st, -1)
    # Every index cp_attn emits is a causal key of the row's own sequence, none repeated.
    for s, row in enumerate(local.tolist()):
        valid = [i for i in row if i >= 0]
        assert all(0 <= i <= s for i in valid), f"pos {s}: index outside [0, {s}]: {row}"
        assert len(valid) == len(set(valid)) == min(s + 1, cfg.index_topk), f"pos {s}: {row}"
    ours = causal_sets(local)
    theirs = hf_sets[b][layer]
    bad = [s for s in range(len(seq)) if ours[s] != theirs[s]]
    assert not bad, (f"layer {layer} {SEQ_IDS[b]}: selections differ at positions {bad}; first: "
                     f"cp_attn {sorted(ours[bad[0]])} vs HF {sorted(theirs[bad[0]])}")
    if len(seq) > cfg.index_topk:
        # Content-driven selection: not merely the K most recent keys everywhere.
        recent = [frozenset(range(s + 1 - cfg.index_topk, s + 1)) for s in range(cfg.index_topk, len(seq))]
        assert any(o != r for o, r in zip(ours[cfg.index_topk :], recent))


# ---- input errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, match",
    [
        ([[1, 2, 512]], r"token id 512\b"),
        ([[3, -1]], r"token id -1\b"),
        ([[1, 2], []], r"input_ids\[1\] is empty"),
        ([], r"non-empty"),
    ],
    ids=["id=vocab_size", "id=-1", "empty-sequence", "empty-batch"],
)
def test_reference_logits_rejects_bad_input(hf, ids, match):
    with pytest.raises(ValueError, match=match):
        cp_attn.reference_logits(hf[0], ids)
