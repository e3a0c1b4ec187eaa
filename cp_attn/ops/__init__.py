"""Sparse-attention stage ops: plain-torch references (`naive`), the dense-mask oracle (`oracle`).

Fast kernels (Triton, FlashMLA, DeepGEMM) go beside these with the same signatures and are tested
against them.
"""

from cp_attn.ops.kernels import KERNEL_SETS, KernelSet, get_kernels
from cp_attn.ops.naive import INVALID, indexer_logits, key_mask, sparse_mla, topk_indices
from cp_attn.ops.oracle import dense_causal_mask, dense_masked_attention, topk_mask

__all__ = [
    "KERNEL_SETS",
    "KernelSet",
    "get_kernels",
    "INVALID",
    "dense_causal_mask",
    "dense_masked_attention",
    "indexer_logits",
    "key_mask",
    "sparse_mla",
    "topk_indices",
    "topk_mask",
]
