"""Pure token layouts for context parallelism (no torch.distributed here)."""

from cp_attn.layout.prefix import PrefixPlan, chunk_schedule, plan_prefix
from cp_attn.layout.split import (
    MODE_ALIASES,
    PAD,
    SplitPlan,
    canonical_mode,
    in_seq_block_sizes,
    plan_split,
    validate_seq_lens,
)

__all__ = [
    "MODE_ALIASES",
    "PAD",
    "PrefixPlan",
    "SplitPlan",
    "canonical_mode",
    "chunk_schedule",
    "in_seq_block_sizes",
    "plan_prefix",
    "plan_split",
    "validate_seq_lens",
]
