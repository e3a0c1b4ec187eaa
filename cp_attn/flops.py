"""Useful floating-point work of a prefill, for TFLOP/s figures (multiply-add = 2 FLOPs).

Counts what the model must compute, not what an implementation happens to do: indexer scores only
over causal keys, sparse attention over min(K, position + 1) keys, each token's own experts only.
The lm_head is left out (the timed forward ends at the final hidden states).
"""

from __future__ import annotations

from typing import Sequence

from cp_attn.config import ModelConfig


def layer_flops(cfg: ModelConfig, layer: int, seq_lens: Sequence[int]) -> dict[str, float]:
    """FLOPs of one layer over a batch, by stage."""
    T = sum(seq_lens)
    H, Hi, Di, K = cfg.num_attention_heads, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    d, ql, kvl = cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank
    causal_pairs = sum(L * (L + 1) // 2 for L in seq_lens)                      # sum over tokens of pos + 1
    # sum over tokens of min(K, pos + 1): every causal key up to position K-1, then K each
    attended = sum(L * (L + 1) // 2 if L <= K else K * (K + 1) // 2 + (L - K) * K for L in seq_lens)
    proj = 2 * T * (d * ql + ql * H * cfg.qk_head_dim + d * cfg.kv_cache_dim      # q_a, q_b, kv_a
                    + H * cfg.qk_nope_head_dim * kvl + H * kvl * cfg.v_head_dim     # W_UK absorb, W_UV
                    + H * cfg.v_head_dim * d)                                       # o_proj
    index_proj = 2 * T * (ql * Hi * Di + d * Di + d * Hi)                          # wq_b, wk, weights_proj
    out = {
        "attn.proj": float(proj + index_proj),
        "attn.indexer": float(2 * causal_pairs * Hi * Di),
        "attn.sparse_mla": float(2 * attended * H * (cfg.kv_cache_dim + kvl)),
    }
    if cfg.is_moe_layer(layer):
        per_tok = (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * 2 * d * cfg.moe_intermediate_size
        out["moe"] = float(T * (per_tok + 2 * d * cfg.n_routed_experts))
    else:
        out["mlp"] = float(T * 3 * 2 * d * cfg.intermediate_size)
    return out


def prefill_flops(cfg: ModelConfig, seq_lens: Sequence[int]) -> dict[str, float]:
    """FLOPs of the whole forward (all layers), by stage, plus 'total'."""
    total: dict[str, float] = {}
    for layer in range(cfg.num_hidden_layers):
        for k, v in layer_flops(cfg, layer, seq_lens).items():
            total[k] = total.get(k, 0.0) + v
    total["total"] = sum(total.values())
    return total
