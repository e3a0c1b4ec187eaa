"""The KV cache of a prefill batch: every token's MLA latent and indexer key, per layer, owned by the caller.

Allocated once per batch with a capacity per sequence (the job knows every prompt's length). Per layer
there is one buffer of latent rows and one of index keys, R = sum(capacity) rows each; sequence b owns
rows [region_b, region_b + capacity_b) (one page per sequence) and has `lengths[b]` of them written.
A prefill chunk (cp_attn.parallel.cp_prefill with cache=...) writes its new rows in place after each
layer's gather, and the indexer and sparse MLA read the whole buffers directly: a top-k index is a
cache row. Nothing is copied or dequantised per chunk; rows outside a query's [ks, ke) are never read
(the kernels mask them), so an unwritten row cannot leak into a result.

What a row holds, per kv_dtype (what the kernels read; V3.2 bytes per token and layer):
    auto   latent [R, kv_lora + rope] and index key [R, Di] in the compute dtype   (bf16: 1152 + 256)
    bf16   the same buffers holding bf16-rounded values, exactly what the one-shot gather hands the
           kernels (on GPUs the compute dtype is bf16, so this is the bf16 cache)
    fp8    latent uint8 [R, 656] in FlashMLA's layout (cp_attn.ops.kv_fp8), index key as e4m3
           values [R, Di] + fp32 scales [R], the form the indexer ops take   (656 + 132 = 788)
Every CP rank holds the whole cache of the batch: CP splits the queries, not the KV memory
(docs/design.md: how much that is, and what sharding it would take).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from cp_attn.config import ModelConfig
from cp_attn.model.context import check_kv_dtype
from cp_attn.ops.kv_fp8 import index_k_fp8_width, mla_fp8_width

IndexKeys = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CacheShape:
    """The model dims a cache is built for."""

    num_layers: int
    kv_lora: int
    rope_dim: int
    index_dim: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> "CacheShape":
        return cls(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim)


def bytes_per_token(cfg: ModelConfig, kv_dtype: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cache bytes per token over all layers (V3.2: 61 x 1408 in bf16, 61 x 788 in fp8)."""
    check_kv_dtype(kv_dtype)
    s = CacheShape.of(cfg)
    if kv_dtype == "fp8":
        per_layer = mla_fp8_width(s.kv_lora, s.rope_dim) + index_k_fp8_width(s.index_dim)
    else:
        per_layer = (s.kv_lora + s.rope_dim + s.index_dim) * dtype.itemsize
    return s.num_layers * per_layer


@dataclass(eq=False)
class KVCache:
    """Per layer: `latent[layer]` and `index_k[layer]` with `num_rows` rows (see the module doc).
    Build it with `KVCache.allocate`."""

    shape: CacheShape
    kv_dtype: str
    """'auto', 'bf16' or 'fp8' (cp_attn.model.context.KV_DTYPES)."""
    dtype: torch.dtype
    """The compute dtype it was built for (the storage dtype of 'auto' and 'bf16')."""
    capacities: tuple[int, ...]
    """Rows owned by every sequence: the most tokens it can ever hold."""
    latent: list[torch.Tensor]
    index_k: list[IndexKeys]
    lengths: list[int] = field(default_factory=list)
    """Tokens of every sequence cached so far (rows [region_b, region_b + lengths[b]) are written)."""

    @classmethod
    def allocate(cls, cfg: ModelConfig, capacities: Sequence[int], kv_dtype: str = "auto",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 fill_nan: bool = False) -> "KVCache":
        """An empty cache for sequences of at most `capacities[b]` tokens each. Zero-filled, or NaN
        everywhere with `fill_nan` (tests: a read of a row nobody wrote would show)."""
        check_kv_dtype(kv_dtype)
        if isinstance(capacities, (str, bytes)) or not isinstance(capacities, Sequence) or not capacities:
            raise ValueError(f"capacities must be a non-empty list of ints, got {capacities!r:.80}")
        for b, c in enumerate(capacities):
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"capacities[{b}] = {c!r} must be an int >= 1")
            if c > cfg.max_position_embeddings:
                raise ValueError(f"capacities[{b}] = {c} is more than max_position_embeddings="
                                 f"{cfg.max_position_embeddings}: no sequence can be that long")
        s, R = CacheShape.of(cfg), sum(capacities)

        def buf(cols: int, dt: torch.dtype) -> torch.Tensor:
            t = torch.zeros((R, cols) if cols else (R,), dtype=dt, device=device)
            if fill_nan:  # all-ones bytes are NaN in fp32, bf16 and e4m3fn alike
                t.view(torch.uint8).fill_(255)
            return t

        latent, index_k = [], []
        for _ in range(s.num_layers):
            if kv_dtype == "fp8":
                latent.append(buf(mla_fp8_width(s.kv_lora, s.rope_dim), torch.uint8))
                index_k.append((buf(s.index_dim, torch.float8_e4m3fn), buf(0, torch.float32)))
            else:
                latent.append(buf(s.kv_lora + s.rope_dim, dtype))
                index_k.append(buf(s.index_dim, dtype))
        return cls(s, kv_dtype, dtype, tuple(int(c) for c in capacities), latent, index_k, [0] * len(capacities))

    # ---- geometry ------------------------------------------------------------------------------

    @property
    def num_seqs(self) -> int:
        return len(self.capacities)

    @property
    def num_rows(self) -> int:
        """R = sum of the capacities, the rows of every buffer."""
        return sum(self.capacities)

    @property
    def region_starts(self) -> tuple[int, ...]:
        """First row of every sequence's region."""
        starts, at = [], 0
        for c in self.capacities:
            starts.append(at)
            at += c
        return tuple(starts)

    @property
    def device(self) -> torch.device:
        return self.latent[0].device if self.latent else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        flat = [t for x in (*self.latent, *self.index_k) for t in (x if isinstance(x, tuple) else (x,))]
        return sum(t.numel() * t.element_size() for t in flat)

    def token_of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows (any shape, -1 = none) -> (sequence, position in it); -1 for both where none."""
        starts = torch.tensor(self.region_starts, dtype=torch.long, device=rows.device)
        r = rows.long()
        seq = (torch.searchsorted(starts, r.clamp(min=0).flatten(), right=True) - 1).view(r.shape)
        pos = r - starts[seq]
        return torch.where(r >= 0, seq, -1), torch.where(r >= 0, pos, -1)

    # ---- use -----------------------------------------------------------------------------------

    def check(self, cfg: ModelConfig, new_lens: Sequence[int], kv_dtype: str, dtype: torch.dtype,
              device: torch.device) -> None:
        """ValueError, before any collective, when this cache cannot take a chunk of `new_lens[b]` new
        tokens per sequence from a model of `cfg` computing in `dtype` on `device` with `kv_dtype`."""
        if CacheShape.of(cfg) != self.shape:
            raise ValueError(f"the KV cache was built for another model shape: {self.shape}, "
                             f"this model has {CacheShape.of(cfg)}")
        if kv_dtype != self.kv_dtype or (kv_dtype != "fp8" and dtype != self.dtype):
            raise ValueError(f"the KV cache holds kv_dtype={self.kv_dtype} for {self.dtype}, "
                             f"the prefill runs kv_dtype={kv_dtype} in {dtype}")
        if torch.device(device) != self.device:
            raise ValueError(f"the KV cache is on {self.device}, the model on {device}")
        if len(new_lens) != self.num_seqs:
            raise ValueError(f"the KV cache was built for a batch of {self.num_seqs} sequences, "
                             f"the prefill has {len(new_lens)}")
        for b, n in enumerate(new_lens):
            end = self.lengths[b] + n
            if end > cfg.max_position_embeddings:
                raise ValueError(f"sequence {b}: {self.lengths[b]} cached + {n} new tokens = {end} positions, "
                                 f"more than max_position_embeddings={cfg.max_position_embeddings}")
            if end > self.capacities[b]:
                raise ValueError(f"sequence {b}: {self.lengths[b]} cached + {n} new tokens = {end}, "
                                 f"more than its cache capacity {self.capacities[b]}")

    def write(self, layer: int, rows: torch.Tensor, latent: torch.Tensor, index_k: IndexKeys
              ) -> tuple[torch.Tensor, IndexKeys]:
        """Store the gathered new tokens' latent [N, ...] and index keys at cache rows `rows` [N] of
        `layer`; returns that layer's whole buffers (what the kernels index)."""
        pairs = [(self.latent[layer], latent)]
        if isinstance(index_k, tuple):
            pairs += list(zip(self.index_k[layer], index_k))
        else:
            pairs.append((self.index_k[layer], index_k))
        for dst, src in pairs:
            dst[rows] = src.to(dst.dtype)  # index_put: index_copy_ has no e4m3 CPU kernel
        return self.latent[layer], self.index_k[layer]

    def advance(self, new_lens: Sequence[int]) -> None:
        """Count a finished chunk's tokens as cached."""
        self.lengths = [p + n for p, n in zip(self.lengths, new_lens)]
