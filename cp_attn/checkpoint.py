"""HF-format checkpoints: read (safetensors only, FP8 block-scaled weights dequantised on load),
write (bf16, fp32 or FP8), and seeded random weights with the same names.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed by
`model.safetensors.index.json`. FP8 weights are e4m3 with a `<name>_scale_inv` fp32 tensor of one
scale per 128x128 block (the last block of a row or column may be partial):
    W[n, k] = W_fp8[n, k] * scale_inv[n // 128, k // 128]
Weights are never unpickled. A model loads only the tensors its own modules hold, so a rank that
owns a few experts (or a slice of each) reads only those.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Iterable, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cp_attn.config import ModelConfig

FP8_BLOCK = 128
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
# 2-D weights DeepSeek keeps in high precision; every other 2-D `.weight` is FP8 in the release.
_NOT_FP8 = re.compile(r"(embed_tokens|lm_head|mlp\.gate|indexer\.weights_proj)\.weight$")


def hf_name(param: str) -> str:
    """Model parameter name -> checkpoint tensor name."""
    return param if param.startswith("lm_head.") else f"model.{param}"


def is_fp8_weight(name: str, shape: torch.Size | tuple[int, ...]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and not _NOT_FP8.search(name)


# ---- FP8 block scaling ---------------------------------------------------------------------------


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """e4m3 [N, K] with scales [ceil(N/b), ceil(K/b)] -> fp32 [N, K]."""
    N, K = w.shape
    want = (-(-N // block), -(-K // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not fit a {N}x{K} weight in {block}x{block} blocks (want {want})")
    s = scale_inv.float().repeat_interleave(block, 0)[:N].repeat_interleave(block, 1)[:, :K]
    return w.float() * s


def quantize_fp8_blocks(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """fp [N, K] -> (e4m3 [N, K], scale_inv [ceil(N/b), ceil(K/b)] fp32) with scale = amax / 448."""
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    wp = torch.nn.functional.pad(w.float(), (0, kb * block - K, 0, nb * block - N))
    blocks = wp.view(nb, block, kb, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(nb * block, kb * block)[:N, :K].contiguous(), scale


# ---- weight sources ------------------------------------------------------------------------------


class WeightSource(Protocol):
    """Full checkpoint tensors by HF name, dequantised to fp32."""

    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class SafetensorsSource:
    """A checkpoint directory read through safetensors (lazily, tensor by tensor)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {self.path} has no config.json")
        self.config = ModelConfig.from_json(self.path / "config.json")
        hf = json.loads((self.path / "config.json").read_text())
        block = (hf.get("quantization_config") or {}).get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
        if block[0] != block[1]:
            raise ValueError(f"checkpoint {self.path}: non-square FP8 blocks {block} are not supported")
        self.block = int(block[0])
        if (self.path / INDEX_FILE).is_file():
            weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
            self._file_of = {k: self.path / v for k, v in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"checkpoint {self.path} has no *.safetensors file")
            self._file_of = {}
            for f in files:
                with safe_open(f, framework="pt") as sf:
                    self._file_of.update({k: f for k in sf.keys()})
        self._handles: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self._file_of)

    def _raw(self, name: str) -> torch.Tensor:
        f = self._file_of[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        return self._handles[f].get_tensor(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"checkpoint {self.path} is missing tensor {name!r}")
        t = self._raw(name)
        if t.dtype == torch.float8_e4m3fn:
            if name + SCALE_SUFFIX not in self._file_of:
                raise KeyError(f"checkpoint {self.path}: FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")
            return dequantize_fp8_blocks(t, self._raw(name + SCALE_SUFFIX), self.block)
        return t.float()


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of a full checkpoint (no MTP layer), derived from a model
    built on the meta device so the names can never drift from the modules."""
    from cp_attn.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {hf_name(k): tuple(v.shape) for k, v in model.state_dict().items()}


class RandomSource:
    """Seeded random weights with checkpoint names: the same name gives the same tensor in every
    process, so each rank can build just its shard and still match the single-rank model.

    Linear weights ~ N(0, 1/fan_in); embeddings ~ N(0, 1); norm weights 1 + N(0, 0.1^2); LayerNorm
    bias and the gate's correction bias N(0, 0.1^2) and N(0, 0.05^2), so none is trivial.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"):
        self.config, self.seed, self.device = cfg, seed, torch.device(device)
        self._shapes = checkpoint_shapes(cfg)

    def names(self) -> set[str]:
        return set(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(f"random {self.config.__class__.__name__} has no tensor {name!r}")
        shape = self._shapes[name]
        g = torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        x = torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            return 0.05 * x
        if name.endswith("norm.bias"):
            return 0.1 * x
        if len(shape) == 1:  # RMSNorm / LayerNorm weights
            return 1.0 + 0.1 * x
        if "embed_tokens" in name:
            return x
        return x * shape[1] ** -0.5


# ---- loading -------------------------------------------------------------------------------------


def _slices_of(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Parameter name -> (dim, start, stop) for modules that hold part of a checkpoint tensor."""
    out = {}
    for mod_name, mod in model.named_modules():
        if hasattr(mod, "checkpoint_slices"):
            for p, sl in mod.checkpoint_slices().items():
                out[f"{mod_name}.{p}" if mod_name else p] = sl
    return out


def load_weights(model: nn.Module, source: WeightSource) -> None:
    """Fill every parameter and persistent buffer of `model` from `source` (HF names), taking only
    the slice a sharded module holds. Errors name the missing or misshapen tensor."""
    slices = _slices_of(model)
    state = model.state_dict()
    for name, dst in state.items():
        src = source.get(hf_name(name))
        if name in slices:
            dim, start, stop = slices[name]
            if src.dim() <= dim or src.shape[dim] < stop:
                raise ValueError(f"checkpoint tensor {hf_name(name)!r} has shape {tuple(src.shape)}, too small for slice [{start}:{stop}] of dim {dim}")
            src = src.narrow(dim, start, stop - start)
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"checkpoint tensor {hf_name(name)!r} has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(src)


def build_model(
    source: WeightSource,
    *,
    expert_ids: Iterable[int] | None = None,
    expert_shard: tuple[int, int] = (0, 1),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    indexer_fp8_sim: bool = False,
    moe_impl: str = "auto",
):
    """A Transformer holding the given experts / expert shard, with weights from `source`.
    moe_impl: routed-expert path of every MoE layer ('loop' | 'grouped' | 'auto'); unless 'loop',
    the experts are stacked for grouped GEMMs once the weights are in."""
    from cp_attn.model import Transformer

    from cp_attn.model.moe import Gate, set_moe_impl
    from cp_attn.model.moe_grouped import check_impl
    from cp_attn.model.rope import rope_inv_freq

    check_impl(moe_impl)  # before any weight is read

    cfg = source.config
    with torch.device("meta"):
        model = Transformer(cfg, expert_ids, expert_shard, indexer_fp8_sim)
    model = model.to_empty(device=device).to(dtype)
    # Kept in fp32 whatever the model dtype: the router's correction bias and the RoPE frequencies.
    for mod in model.modules():
        if isinstance(mod, Gate):
            mod.e_score_correction_bias = torch.empty(cfg.n_routed_experts, dtype=torch.float32, device=device)
    model.rope_inv_freq = rope_inv_freq(cfg).to(device)
    load_weights(model, source)
    set_moe_impl(model, moe_impl)
    return model.eval().requires_grad_(False)


# ---- writing -------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    source: WeightSource,
    *,
    dtype: str = "bf16",
    max_shard_bytes: int = 2 * 2**30,
) -> Path:
    """Write every tensor of `source` as an HF checkpoint: dtype 'fp32', 'bf16', or 'fp8' (e4m3
    128x128 block-scaled for the weights DeepSeek ships in FP8, bf16 for the rest)."""
    if dtype not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"unknown checkpoint dtype {dtype!r}; expected fp32, bf16 or fp8")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = source.config
    hf = cfg.to_hf()
    hf["torch_dtype"] = "float32" if dtype == "fp32" else "bfloat16"
    if dtype == "fp8":
        hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(source.names()):
        t = source.get(name)
        if name.endswith("e_score_correction_bias"):
            out = {name: t.float().contiguous()}
        elif dtype == "fp8" and is_fp8_weight(name, t.shape):
            q, s = quantize_fp8_blocks(t)
            out = {name: q, name + SCALE_SUFFIX: s}
        else:
            out = {name: t.to(torch.float32 if dtype == "fp32" else torch.bfloat16).contiguous()}
        nbytes = sum(v.numel() * v.element_size() for v in out.values())
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1].update(out)
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
    return path
