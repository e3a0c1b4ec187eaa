"""A named set of stage implementations, chosen per run. Only the plain-torch references exist on
CPU; GPU kernels (Triton, FlashMLA, DeepGEMM) register beside them with the same signatures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cp_attn.ops import naive


@dataclass(frozen=True)
class KernelSet:
    """One implementation per stage (signatures: see cp_attn.ops.naive)."""

    indexer_logits: Callable = naive.indexer_logits
    topk_indices: Callable = naive.topk_indices
    sparse_mla: Callable = naive.sparse_mla
    name: str = "torch"
    query_chunk: int = 1024
    """Indexer query rows scored at a time: bounds the [rows, T] logits buffer."""


KERNEL_SETS: dict[str, Callable[[], KernelSet]] = {"torch": KernelSet}


def get_kernels(name: str) -> KernelSet:
    if name not in KERNEL_SETS:
        raise ValueError(f"unknown kernel set {name!r}; expected one of {sorted(KERNEL_SETS)}")
    return KERNEL_SETS[name]()
