"""Run settings of a CP prefill, as dataclasses mirrored field for field by the Hydra YAML in conf/.

Precedence: command line > YAML > these defaults. The model's *shape* is not here: it comes from a
checkpoint's config.json or a named preset (cp_attn.config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from cp_attn.checkpoint import RandomSource, SafetensorsSource, WeightSource
from cp_attn.config import preset


@dataclass
class ModelSpec:
    preset: str = "tiny"
    """Shape when no checkpoint is given: 'tiny' (CPU) or 'v32' (the real per-layer dims)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config fields replaced in the preset, e.g. {num_hidden_layers: 4, n_routed_experts: 32}."""
    checkpoint: Optional[str] = None
    """HF checkpoint directory (config.json + safetensors); overrides preset when set."""
    seed: int = 0
    """Seed of the random weights used when no checkpoint is given."""
    dtype: str = "auto"
    """Compute dtype: 'auto' (fp32 on CPU, bf16 on GPU), 'fp32', 'bf16'."""
    indexer_fp8_sim: bool = False
    """Round the indexer's q and k through e4m3 like an FP8 kernel would."""


@dataclass
class CPSpec:
    mode: str = "in_seq"
    """Token split: 'in_seq' (alias 'zigzag') or 'round_robin' (alias 'interleave')."""
    size: Optional[int] = None
    """Expected CP size; the run refuses to start when it differs from the world size (None: any)."""


@dataclass
class MoESpec:
    backend: str = "fused"
    """'fused' (all-gather, intermediate-dim shards, reduce-scatter) or 'deepep' (all-to-all)."""
    deepep_impl: str = "auto"
    """For deepep: 'auto' (deep_ep.Buffer when importable on NCCL), 'all_to_all', 'deep_ep'."""
    impl: str = "auto"
    """Routed experts: 'loop' (one expert at a time), 'grouped' (torch._grouped_mm), 'auto' (grouped where it runs)."""


@dataclass
class InputSpec:
    file: Optional[str] = None
    """JSON prompts file {"input_ids": [[...], ...]}; when unset, random sequences of `lengths`."""
    lengths: list[int] = field(default_factory=lambda: [37, 16, 5, 1])
    """Lengths of the random sequences."""
    seed: int = 0
    """Seed of the random sequences."""
    chunk_size: Optional[int] = None
    """Prefill in chunks of at most this many tokens over a KV cache, several prompts per chunk as
    SGLang packs them (cp_attn.parallel.chunked); reports TTFT per prompt. None: one shot."""


@dataclass
class OutputSpec:
    logits: Optional[str] = None
    """Where rank 0 saves {"logits": [fp32 [L_b, vocab] per sequence]} (torch.save); None: nowhere."""
    tokens: str = "all"
    """Whose logits rank 0 computes, checks and saves: 'all' tokens, or each sequence's 'last' ([1, vocab])."""


@dataclass
class KernelStages:
    """Per-stage implementation overriding the kernel set's (None: the set's own; see
    cp_attn.ops.kernels.IMPLS for the names, e.g. sparse_mla=flashmla)."""

    indexer_logits: Optional[str] = None
    """Indexer logits: torch | triton | deepgemm."""
    topk_indices: Optional[str] = None
    """Top-k: torch | triton."""
    sparse_mla: Optional[str] = None
    """Sparse MLA: torch | triton | flashmla."""


@dataclass
class PrefillConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    cp: CPSpec = field(default_factory=CPSpec)
    moe: MoESpec = field(default_factory=MoESpec)
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    check: bool = False
    """Rank 0 also computes the single-process reference and reports the largest |logit diff|."""
    device: str = "auto"
    """'auto' (cuda:LOCAL_RANK when CUDA is available, else cpu), 'cpu' or 'cuda'."""
    kernels: str = "torch"
    """Kernel set for the sparse-attention stages: 'torch' (plain-torch references) or 'triton'."""
    kernel_stage: KernelStages = field(default_factory=KernelStages)
    """Per-stage overrides of the kernel set."""
    overlap_gather: bool = True
    """Start each layer's KV all-gather before the query projections, so it runs behind them."""
    kv_dtype: str = "auto"
    """Gathered KV: 'auto' (the compute dtype), 'bf16', or 'fp8' (FlashMLA's 656-byte latent and a
    132-byte index key, packed on the owning rank before the gather; FP8 indexer)."""
    backend: str = "auto"
    """Process-group backend: 'auto' (NCCL with CUDA, else gloo), 'gloo', 'nccl'."""
    timeout_s: float = 600.0
    """Process-group timeout: a dead rank stops the others after at most this long."""
    warmup: int = 0
    """Untimed forward passes before the timed ones."""
    repeat: int = 1
    """Timed forward passes; the report gives each one's time and reports their median."""
    stages: bool = False
    """Time every stage on its own (synchronising the GPU around each) and report rank 0's times."""
    report: Optional[str] = None
    """Where rank 0 also writes the report as JSON (complete or not at all); None: only printed."""


def from_omegaconf(cfg) -> PrefillConfig:
    """The composed Hydra config (minus its `hydra` node) checked against the dataclasses: unknown
    keys and wrong types fail here, with OmegaConf's message naming the key."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(PrefillConfig)
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_object(OmegaConf.merge(schema, body))


def register_resolvers() -> None:
    """`${rank_zero_only:x}`: x on rank 0 (or outside torchrun), None elsewhere; Hydra writes its
    .hydra/ folder from rank 0 only."""
    import os

    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(
        "rank_zero_only", lambda v: v if os.environ.get("RANK", "0") == "0" else None, replace=True
    )


def refuse_multirun_under_torchrun() -> None:
    """Exit (SystemExit, so Hydra starts no further job) when a Hydra multirun (-m) runs inside
    torchrun: every job would reuse the same ranks and rendezvous one after another, and such runs
    hang. scripts/sweep.py starts one torchrun job per configuration instead."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if "TORCHELASTIC_RUN_ID" in os.environ and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise SystemExit(
            "error: a Hydra multirun (-m) cannot run under torchrun: its jobs would share one group of "
            "ranks. Sweep with `python scripts/sweep.py -m cp.size=1,2 ...` (no torchrun), which starts "
            "one torchrun job per configuration."
        )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weight_source(spec: ModelSpec, device: str | torch.device = "cpu") -> WeightSource:
    """The checkpoint, or seeded random weights of the preset (the same on every rank)."""
    if spec.checkpoint:
        return SafetensorsSource(spec.checkpoint)
    return RandomSource(preset(spec.preset, **dict(spec.overrides)), seed=spec.seed, device=device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown model.dtype {name!r}; expected auto, fp32 or bf16")
    return DTYPES[name]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but CUDA is not available")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
