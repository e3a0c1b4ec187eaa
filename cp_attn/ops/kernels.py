"""Which implementation runs each sparse-attention stage, chosen per run by name.

A kernel *set* names one implementation for every stage; a run may override single stages, the way
SGLang takes `--nsa-prefill-backend` apart from the rest:

    get_kernels("triton")                                  # Triton wherever a Triton op exists
    get_kernels("triton", {"sparse_mla": "flashmla"})      # ... but FlashMLA for sparse attention

Implementations are named as "module:function" and imported only when chosen, so a CPU run never
imports Triton and a missing optional package (FlashMLA, DeepGEMM) fails with its own message at
selection time, before any collective. Every implementation has its naive twin's signature
(cp_attn.ops.naive) and is tested against it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from cp_attn.ops import naive

STAGES = ("indexer_logits", "topk_indices", "sparse_mla")

IMPLS: dict[str, dict[str, str]] = {
    "indexer_logits": {
        "torch": "cp_attn.ops.naive:indexer_logits",
        "triton": "cp_attn.ops.indexer_triton:indexer_logits",
        "deepgemm": "cp_attn.ops.deepgemm:indexer_logits",
    },
    "topk_indices": {
        "torch": "cp_attn.ops.naive:topk_indices",
        "triton": "cp_attn.ops.topk_triton:topk_indices",
    },
    "sparse_mla": {
        "torch": "cp_attn.ops.naive:sparse_mla",
        "triton": "cp_attn.ops.sparse_mla_triton:sparse_mla",
        "flashmla": "cp_attn.ops.flashmla:sparse_mla",
    },
}
"""stage -> implementation name -> "module:function"."""

GPU_IMPLS = {"triton", "flashmla", "deepgemm"}
"""Implementations that need CUDA tensors (Triton also runs on CPU under TRITON_INTERPRET=1)."""


@dataclass(frozen=True)
class KernelSet:
    """One implementation per stage (signatures: see cp_attn.ops.naive)."""

    indexer_logits: Callable = naive.indexer_logits
    topk_indices: Callable = naive.topk_indices
    sparse_mla: Callable = naive.sparse_mla
    name: str = "torch"
    query_chunk: int = 1024
    """Indexer query rows scored at a time: bounds the [rows, T] logits buffer."""
    choice: tuple[tuple[str, str], ...] = ()
    """(stage, implementation name) pairs, for reports."""


KERNEL_SETS = ("torch", "triton")
"""Set names: every stage takes the set's implementation where it has one, else the torch one."""


def _load(spec: str) -> Callable:
    """Import "module:function"; an adapter module's `load()` raises ImportError when its vendor
    package is missing, so that surfaces here rather than at the first call."""
    module, fn = spec.split(":")
    mod = importlib.import_module(module)
    if hasattr(mod, "load"):
        mod.load()
    return getattr(mod, fn)


def get_kernels(name: str = "torch", overrides: Mapping[str, str | None] | None = None,
                query_chunk: int | None = None) -> KernelSet:
    """The kernel set `name` with some stages replaced (`overrides`: stage -> implementation name)."""
    if name not in KERNEL_SETS:
        raise ValueError(f"unknown kernel set {name!r}; expected one of {list(KERNEL_SETS)}")
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    for stage, impl in overrides.items():
        if stage not in IMPLS:
            raise ValueError(f"unknown kernel stage {stage!r}; expected one of {list(STAGES)}")
        if impl not in IMPLS[stage]:
            raise ValueError(f"unknown {stage} implementation {impl!r}; expected one of {list(IMPLS[stage])}")
    choice = {s: overrides.get(s, name if name in IMPLS[s] else "torch") for s in STAGES}
    fns = {}
    for stage, impl in choice.items():
        try:
            fns[stage] = _load(IMPLS[stage][impl])
        except ImportError as e:
            raise ValueError(f"{stage} implementation {impl!r} is not available here: {e}") from e
    if query_chunk is None:
        # Fast indexers score against only the keys in range, so bigger chunks cost no extra memory.
        query_chunk = 1024 if choice["indexer_logits"] == "torch" else 4096
    return KernelSet(**fns, name=name, query_chunk=query_chunk, choice=tuple(choice.items()))


def check_kernels_device(kernels: KernelSet, device: torch.device) -> None:
    """ValueError, before any collective, when a chosen implementation cannot run on `device`."""
    import os

    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    gpu_only = [f"{s}={i}" for s, i in kernels.choice if i in GPU_IMPLS]
    if gpu_only:
        raise ValueError(f"kernels {', '.join(gpu_only)} need a CUDA device (device={device.type}); "
                         "use kernels=torch on CPU, or TRITON_INTERPRET=1 for Triton")
