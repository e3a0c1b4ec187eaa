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


@dataclass
class InputSpec:
    file: Optional[str] = None
    """JSON prompts file {"input_ids": [[...], ...]}; when unset, random sequences of `lengths`."""
    lengths: list[int] = field(default_factory=lambda: [37, 16, 5, 1])
    """Lengths of the random sequences."""
    seed: int = 0
    """Seed of the random sequences."""


@dataclass
class OutputSpec:
    logits: Optional[str] = None
    """Where rank 0 saves {"logits": [fp32 [L_b, vocab] per sequence]} (torch.save); None: nowhere."""


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
    """Stage implementations (cp_attn.ops.kernels.KERNEL_SETS)."""
    backend: str = "auto"
    """Process-group backend: 'auto' (NCCL with CUDA, else gloo), 'gloo', 'nccl'."""
    timeout_s: float = 600.0
    """Process-group timeout: a dead rank stops the others after at most this long."""
    warmup: int = 0
    """Untimed forward passes before the timed one."""
    stages: bool = False
    """Time every stage on its own (synchronising the GPU around each) and report rank 0's times."""


def from_omegaconf(cfg) -> PrefillConfig:
    """The composed Hydra config (minus its `hydra` node) checked against the dataclasses: unknown
    keys and wrong types fail here, with OmegaConf's message naming the key."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(PrefillConfig)
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    missing = sorted(OmegaConf.missing_keys(body))  # `???` in YAML; merge() would drop them silently
    if missing:
        raise ValueError(f"{', '.join(missing)} must be set on the command line ({missing[0]}=...): "
                         "the config leaves it ???")
    return OmegaConf.to_object(OmegaConf.merge(schema, body))


def register_resolvers() -> None:
    """`${rank_zero_only:x}`: x on rank 0 (or outside torchrun), None elsewhere; Hydra writes its
    .hydra/ folder from rank 0 only."""
    import os

    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(
        "rank_zero_only", lambda v: v if os.environ.get("RANK", "0") == "0" else None, replace=True
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
