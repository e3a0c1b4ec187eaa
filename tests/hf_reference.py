"""An independent reference for cp_attn: transformers' `DeepseekV32ForCausalLM`, run in fp32.

Nobody on this project wrote that implementation, so agreeing with it checks cp_attn's reading of
DeepSeek V3.2 (MLA, YaRN, the lightning indexer, the noaux_tc router), not just its self-consistency.

    path, hf_model = make_hf_checkpoint(tmp_dir)       # tiny random model, saved as an HF checkpoint
    hf_logits(hf_model, seqs)                           # [L_b, vocab] fp32 per sequence
    hf_topk_sets(hf_model, seqs)                        # layer -> per position, the causal key set

cp_attn reads the same directory (`cp_attn.reference_logits(path, seqs)`,
`cp_attn.checkpoint.build_model(SafetensorsSource(path))`), so both sides run the same weights.

Known, deliberate differences from cp_attn (all vanish in exact arithmetic or are normalised here):
- HF's indexer skips the Hadamard rotation (orthonormal: dot products unchanged up to rounding).
- HF's YaRN multiplies cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim); DeepSeek
  (and cp_attn) never scale them. `tiny_hf_config` sets mscale == mscale_all_dim == 1 so the factor is 1.
- HF's indexer takes top-k over min(index_topk, T) entries of a -inf-masked row, so rows with fewer
  causal keys than index_topk also name future tokens (the causal mask hides them later).
  `hf_topk_sets` keeps only the causal part: {i in row : i <= s} for the query at position s.
- HF is run on one sequence at a time (batch 1): no padding or attention-mask questions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

# Mirrors cp_attn's preset('tiny') field for field (HF names): every feature is live. YaRN matters
# (test sequences run past original_max_position_embeddings = 32), v_head_dim != qk_nope_head_dim,
# 4 expert groups of 3 with 2 kept, a dense first layer, index_topk = 8 below the longer test
# sequences, 4 index heads of width 16 (a power of two, for cp_attn's Hadamard rotation), and 12
# routed experts, which divide evenly over 1, 2, 3 and 4 ranks.
TINY_HF_CONFIG: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=8,
    n_routed_experts=12,
    num_experts_per_tok=3,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    intermediate_size=96,
    moe_intermediate_size=24,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    # 512 as in preset('tiny'). transformers warns that max_position_embeddings / original (16) is not
    # YaRN's factor (4) and uses the explicit factor, as DeepSeek and cp_attn do: harmless here.
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,  # == mscale_all_dim: HF's cos/sin attention_factor is then exactly 1
        "mscale_all_dim": 1.0,
    },
    # Plain-torch paths: stable fp32 numerics, no fused kernels.
    attn_implementation="eager",
    experts_implementation="eager",
)


def tiny_hf_config(**overrides: Any) -> DeepseekV32Config:
    """The tiny V3.2 config above, with HF-named field overrides (`index_topk=4`, ...)."""
    return DeepseekV32Config(**{**TINY_HF_CONFIG, **overrides})


@torch.no_grad()
def randomize_hf_weights(model: DeepseekV32ForCausalLM, seed: int) -> None:
    """Redraw every weight so that no part of the model is trivial (HF inits norms to 1, biases to
    0 and linears to N(0, 0.02^2), under which attention is near-uniform and routing near-random).

    Same scales as cp_attn's RandomSource (but drawn differently, with torch.manual_seed(seed)):
    matrices N(0, 1/fan_in) (fan_in = last dim, which also holds for HF's fused expert tensors
    [E, 2I, D] and [E, D, I]), embeddings N(0, 1), norm weights 1 + N(0, 0.1^2), the indexer's
    LayerNorm bias N(0, 0.1^2), the router's e_score_correction_bias N(0, 0.05^2).
    """
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        x = torch.randn(p.shape, dtype=torch.float32)
        if name.endswith("norm.bias"):
            p.copy_(0.1 * x)
        elif p.dim() == 1:  # RMSNorm / LayerNorm weights
            p.copy_(1.0 + 0.1 * x)
        elif "embed_tokens" in name:
            p.copy_(x)
        else:
            p.copy_(x * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, dtype=torch.float32))


def make_hf_checkpoint(path: str | Path, seed: int = 0, **overrides: Any) -> tuple[Path, DeepseekV32ForCausalLM]:
    """Build a seeded random `DeepseekV32ForCausalLM(tiny_hf_config(**overrides))` in fp32 eager
    mode, save it to `path` with `save_pretrained` (safetensors, HF per-expert tensor names) and
    return (path, the eval-mode model)."""
    path = Path(path)
    cfg = tiny_hf_config(**overrides)
    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(cfg).float()
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    randomize_hf_weights(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return path, model.eval()


# Token sequences on which, for `make_hf_checkpoint(seed=0)`, no row of any layer has a near-tie at
# its top-k cut (checked by tests/test_reference_hf.py::test_no_near_tie_at_topk_cut). With 4 index
# heads ReLU makes exact-zero scores common, and HF breaks ties arbitrarily while cp_attn takes the
# lower index, so only tie-free inputs can be compared with HF key for key. About 1 in 70 random
# length-40 prompts qualify; the seeds below were found by search. Sequences of at most index_topk
# tokens select every causal key and are always tie-free.
# name -> (length, token seed)
TIE_FREE_SEQUENCES = {"len1": (1, 0), "len5": (5, 0), "len23": (23, 26), "len40": (40, 191)}
TIE_FREE_MODEL_SEED = 0


def seeded_tokens(length: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def tie_free_sequences(vocab: int = TINY_HF_CONFIG["vocab_size"]) -> dict[str, list[int]]:
    """name -> tokens of TIE_FREE_SEQUENCES."""
    return {name: seeded_tokens(n, seed, vocab) for name, (n, seed) in TIE_FREE_SEQUENCES.items()}


def _as_batch1(seq: Sequence[int] | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(seq, dtype=torch.long).reshape(1, -1)  # [1, L]
    if ids.shape[1] == 0:
        raise ValueError("hf_reference: empty sequence")
    return ids


@torch.no_grad()
def hf_logits(hf_model: DeepseekV32ForCausalLM, input_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """fp32 logits [L_b, vocab] of every token of every sequence, one batch-1 forward each."""
    return [hf_model(_as_batch1(seq), use_cache=False).logits[0].float() for seq in input_ids]


@torch.no_grad()
def hf_topk_raw(hf_model: DeepseekV32ForCausalLM, seq: Sequence[int]) -> dict[int, torch.Tensor]:
    """layer -> the indexer's raw output for one sequence: int32 [L, min(index_topk, L)] indices,
    including the future positions that HF's top-k over a -inf-masked row names for early rows."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.indexer.register_forward_hook(
            lambda mod, args, out, i=i: captured.__setitem__(i, out[0].clone())  # out: [1, L, k]
        )
        for i, layer in enumerate(hf_model.model.layers)
    ]
    try:
        hf_model(_as_batch1(seq), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if len(captured) != len(hf_model.model.layers):
        n = len(hf_model.model.layers)
        raise RuntimeError(f"indexer hooks fired for layers {sorted(captured)}, expected all {n}")
    return captured


def causal_sets(indices: torch.Tensor) -> list[frozenset[int]]:
    """[L, k] key indices of a sequence's queries (position s = row s) -> per position the set of
    causal keys {i : 0 <= i <= s}; drops HF's future indices and -1 padding alike."""
    return [frozenset(i for i in row.tolist() if 0 <= i <= s) for s, row in enumerate(indices)]


def hf_topk_sets(
    hf_model: DeepseekV32ForCausalLM, input_ids: Sequence[Sequence[int]]
) -> list[dict[int, list[frozenset[int]]]]:
    """Per sequence: layer -> per position s, the frozenset of causal keys HF's indexer selected."""
    return [{layer: causal_sets(idx) for layer, idx in hf_topk_raw(hf_model, seq).items()} for seq in input_ids]
