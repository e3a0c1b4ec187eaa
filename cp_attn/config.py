"""Model shape of DeepSeek V3.2, field for field with HF `config.json` names.

Run settings (CP mode, MoE backend, inputs) live in `cp_attn.runconfig`; this file is only the
model. `ModelConfig.from_hf(dict)` reads both the transformers >= 5 form (`rope_parameters`) and the
original checkpoints' form (`rope_scaling` + top-level `rope_theta`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    """Rows of the embedding and of lm_head."""
    hidden_size: int = 7168
    """Residual stream width."""
    num_hidden_layers: int = 61
    """Decoder layers run (the checkpoint's extra MTP layer is never loaded)."""
    num_attention_heads: int = 128
    """H, MLA query heads."""
    q_lora_rank: int = 1536
    """Width of the compressed query c_q (also the indexer's query input)."""
    kv_lora_rank: int = 512
    """Width of the latent c_kv cached per token."""
    qk_nope_head_dim: int = 128
    """Per-head query/key dims without RoPE."""
    qk_rope_head_dim: int = 64
    """Per-head query/key dims with RoPE (the shared k_pe is this wide)."""
    v_head_dim: int = 128
    """Per-head value / output dims."""
    index_n_heads: int = 64
    """Lightning-indexer query heads."""
    index_head_dim: int = 128
    """Lightning-indexer head width (a power of two: Hadamard rotation)."""
    index_topk: int = 2048
    """K, keys each query attends to."""
    n_routed_experts: int = 256
    """E, routed experts per MoE layer."""
    num_experts_per_tok: int = 8
    """Routed experts per token."""
    n_shared_experts: int = 1
    """Shared expert width in units of moe_intermediate_size."""
    n_group: int = 8
    """Expert groups for group-limited routing."""
    topk_group: int = 4
    """Groups kept per token."""
    routed_scaling_factor: float = 2.5
    """Multiplies the routed experts' weights."""
    scoring_func: str = "sigmoid"
    """Gate scoring; only sigmoid (V3/V3.2) is implemented."""
    topk_method: str = "noaux_tc"
    """Expert selection; only noaux_tc (bias-corrected group top-k) is implemented."""
    norm_topk_prob: bool = True
    """Normalise the selected experts' weights to sum 1 before scaling."""
    first_k_dense_replace: int = 3
    """Layers below this index use a dense SwiGLU MLP instead of MoE."""
    intermediate_size: int = 18432
    """Dense MLP width."""
    moe_intermediate_size: int = 2048
    """Width of one expert."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    """YaRN parameters, or None for plain RoPE."""
    max_position_embeddings: int = 163840
    """Longest sequence the model accepts."""
    tie_word_embeddings: bool = False
    """lm_head shares the embedding (False for DeepSeek)."""

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -------------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of the cached latent [c_kv | k_pe] (576 for V3.2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 * m^2 with YaRN's m = 0.1 * mscale_all_dim * ln(factor) + 1."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            factor = float(self.rope_scaling["factor"])
            mscale_all_dim = float(self.rope_scaling.get("mscale_all_dim", 0.0) or 0.0)
            if factor > 1.0 and mscale_all_dim:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    # ---- checks ----------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the field for a shape the model cannot run."""

        def need(ok: bool, fld: str, why: str) -> None:
            if not ok:
                raise ValueError(f"config field {fld}={getattr(self, fld)!r}: {why}")

        for fld in ("vocab_size", "hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                    "qk_nope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk",
                    "intermediate_size", "max_position_embeddings"):
            v = getattr(self, fld)
            need(isinstance(v, int) and v >= 1, fld, "must be a positive int")
        need(isinstance(self.num_hidden_layers, int) and self.num_hidden_layers >= 0, "num_hidden_layers",
             "must be an int >= 0")
        need(self.qk_rope_head_dim >= 2 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             "must be even and >= 2 (RoPE rotates pairs)")
        d = self.index_head_dim
        need(d & (d - 1) == 0, "index_head_dim", "must be a power of two for the Hadamard rotation")
        need(self.qk_rope_head_dim <= d, "index_head_dim", f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim})")
        need(self.scoring_func == "sigmoid", "scoring_func", "only 'sigmoid' is implemented")
        need(self.topk_method == "noaux_tc", "topk_method", "only 'noaux_tc' is implemented")
        need(0 <= self.first_k_dense_replace, "first_k_dense_replace", "must be >= 0")
        if self.num_hidden_layers > self.first_k_dense_replace:  # some layers are MoE
            need(self.n_routed_experts >= 1, "n_routed_experts", "must be >= 1")
            need(self.moe_intermediate_size >= 1, "moe_intermediate_size", "must be >= 1")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts ({self.n_routed_experts})")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            need(per_group >= 2 or self.n_group == 1, "n_group", "groups are scored by their top-2 experts: need >= 2 experts a group")
            need(1 <= self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                 f"must be in [1, topk_group * experts per group = {self.topk_group * per_group}]")
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"config field rope_scaling: rope type {self.rope_type!r} is not supported (yarn or none)")
        if self.rope_type == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ValueError(f"config field rope_scaling: yarn needs {key!r}")

    # ---- (de)serialisation -----------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """From an HF config dict; unknown keys are ignored, missing ones keep V3.2 defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in hf.items() if k in names}
        params = hf.get("rope_parameters")
        if params:  # transformers >= 5: theta and scaling live together
            params = dict(params)
            if "rope_theta" in params:
                kw["rope_theta"] = params.pop("rope_theta")
            kind = params.pop("rope_type", params.pop("type", "default"))  # one key, "type", either way
            kw["rope_scaling"] = None if kind == "default" else {**params, "type": kind}
        elif "rope_scaling" in hf and hf["rope_scaling"] is not None:
            rs = dict(hf["rope_scaling"])
            kind = rs.pop("rope_type", rs.pop("type", "default"))
            kw["rope_scaling"] = None if kind == "default" else {**rs, "type": kind}
        elif "rope_scaling" in hf:
            kw["rope_scaling"] = None
        if kw.get("q_lora_rank", 1) is None:
            raise ValueError("config field q_lora_rank=None: V3.2's indexer reads the compressed query, a q_lora_rank is required")
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf(json.loads(Path(path).read_text()))

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json form (original-checkpoint style: rope_scaling + rope_theta)."""
        out = dataclasses.asdict(self)
        out.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", torch_dtype="bfloat16")
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _tiny() -> ModelConfig:
    # Small enough for CPU tests in seconds, yet every feature is live: YaRN on (max positions
    # past original_max_position_embeddings), v_head_dim != qk_nope_head_dim, several expert
    # groups, a dense first layer, and index_topk far below typical test lengths.
    # 12 experts divide evenly over 1, 2, 3 and 4 ranks for the deepep backend.
    return ModelConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        index_n_heads=4, index_head_dim=16, index_topk=8,
        n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
        first_k_dense_replace=1, intermediate_size=96, moe_intermediate_size=24,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=512,
    )


def _v32_slim() -> ModelConfig:
    # V3.2's real per-layer dims (every matmul, head and top-k as in the 671B model) with 4 layers,
    # 3 of them MoE, and 32 experts (8 groups of 4): a single-node GPU benchmark shape.
    return ModelConfig(num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=32)


PRESETS = {
    "tiny": _tiny,
    "v32": ModelConfig,  # the real 671B shape
    "v32_slim": _v32_slim,
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named shape, with field overrides: `preset('v32', num_hidden_layers=4, n_routed_experts=32)`
    keeps V3.2's per-layer dims with fewer layers and experts (for single-node GPU benchmarks)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown} in the overrides of preset {name!r}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
