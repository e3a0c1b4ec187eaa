"""Context parallelism: the CP prefill forward and the MoE backends (they talk through cp_attn.comm)."""

from cp_attn.parallel.chunked import ChunkedOutput, check_chunk_size, chunked_prefill
from cp_attn.parallel.moe import BACKENDS, DeepEPMoE, ExpertPlacement, FusedMoE, expert_placement, make_moe_backend
from cp_attn.parallel.prefill import PrefillOutput, check_prefill_args, cp_context, cp_prefill

__all__ = [
    "BACKENDS",
    "ChunkedOutput",
    "DeepEPMoE",
    "ExpertPlacement",
    "FusedMoE",
    "PrefillOutput",
    "check_chunk_size",
    "check_prefill_args",
    "chunked_prefill",
    "cp_context",
    "cp_prefill",
    "expert_placement",
    "make_moe_backend",
]
