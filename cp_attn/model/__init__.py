"""DeepSeek V3.2 model math. No torch.distributed here: parallelism arrives in a ForwardContext."""

from cp_attn.model.context import ForwardContext
from cp_attn.model.mla import MLA, Indexer, hadamard_matrix
from cp_attn.model.moe import Gate, MoE, moe_local, set_moe_impl
from cp_attn.model.transformer import Block, Transformer

__all__ = ["Block", "ForwardContext", "Gate", "Indexer", "MLA", "MoE", "Transformer", "hadamard_matrix", "moe_local", "set_moe_impl"]
