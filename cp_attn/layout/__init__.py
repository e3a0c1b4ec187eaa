"""Pure token layouts for context parallelism (no torch.distributed here)."""

from cp_attn.layout.balance import (
    RankLoad,
    contiguous_loads,
    gather_padding,
    imbalance,
    rank_loads,
    relative,
    rows_by_sequence,
)
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
    "RankLoad",
    "SplitPlan",
    "canonical_mode",
    "chunk_schedule",
    "contiguous_loads",
    "gather_padding",
    "imbalance",
    "in_seq_block_sizes",
    "plan_prefix",
    "plan_split",
    "rank_loads",
    "relative",
    "rows_by_sequence",
    "validate_seq_lens",
]
