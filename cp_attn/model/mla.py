"""Multi-head latent attention (MLA) with DeepSeek V3.2's lightning indexer (DSA).

Per token (x = normed hidden; n local rows, T gathered tokens, H heads):
    c_q    = RMSNorm(q_a_proj x)                                  [n, q_lora]   (also the indexer's input)
    q      = q_b_proj c_q -> [H, nope | rope]                     rope: interleaved RoPE
    latent = [RMSNorm(c_kv_raw) | RoPE(k_pe_raw)] from kv_a_proj   [n, kv_lora + rope]  (576 for V3.2)
Absorbed form (what sparse kernels run): q~_h = [W_UK_h^T q_nope_h | q_pe_h] scores against the
latent; the output latent sum_s p_s c_kv(s) goes through W_UV_h and o_proj. The naive form
(kv_b_proj decompresses per-head k/v) is kept as the dense-mask oracle.

Indexer: q_I = wq_b c_q [n, Hi, Di], k_I = LayerNorm(wk x) [n, Di], half-split RoPE on the first
rope dims of both, then both rotated by the orthonormal Hadamard matrix.
Score I[t, s] = sum_h w[t, h] relu(q_I[t, h] . k_I[s]) with w = weights_proj(x) Hi^-0.5 Di^-0.5.
"""

from __future__ import annotations

import functools
from typing import Callable
import math

import torch
from einops import rearrange
from torch import nn

from cp_attn.config import ModelConfig
from cp_attn.model.context import ForwardContext
from cp_attn.model.layers import RMSNorm
from cp_attn.model.rope import apply_rope_half, apply_rope_interleaved
from cp_attn.ops.fp8 import fake_quant_e4m3_lastdim
from cp_attn.ops.kv_fp8 import (
    index_k_fp8_width, pack_index_k, pack_mla_kv, quantize_index_q, unpack_index_k, unpack_mla_kv,
)
from cp_attn.ops.oracle import dense_masked_attention, topk_mask

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [n, rope_dim / 2]
IndexKeys = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # [T, Di], or FP8 (e4m3 [T, Di], scale [T])


@functools.lru_cache(maxsize=None)
def hadamard_matrix(d: int, device: str = "cpu") -> torch.Tensor:
    """Sylvester Hadamard matrix of size d (a power of two), scaled by d^-0.5 (orthonormal)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard size {d} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(h, base)
    return (h / math.sqrt(d)).float().to(device)


class Indexer(nn.Module):
    """The lightning indexer: scores each query row against every causal key, picks top-k."""

    def __init__(self, cfg: ModelConfig, fp8_sim: bool = False):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.fp8_sim = fp8_sim
        """Round q and k through e4m3 (blocks of 128, power-of-two scales) like an FP8 kernel would."""
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def _rope_and_rotate(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        pe = apply_rope_half(x[..., : self.rope_dim], *rope)
        x = torch.cat([pe, x[..., self.rope_dim :]], dim=-1)
        x = (x.float() @ hadamard_matrix(self.head_dim, str(x.device))).to(x.dtype)
        return fake_quant_e4m3_lastdim(x).to(x.dtype) if self.fp8_sim else x

    def keys(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """[n, hidden] -> index keys [n, Di] (one head, shared by all index heads)."""
        return self._rope_and_rotate(self.k_norm(self.wk(x)), rope)

    def queries(self, c_q: torch.Tensor, rope: Rope) -> torch.Tensor:
        """[n, q_lora] -> index queries [n, Hi, Di]."""
        q = rearrange(self.wq_b(c_q), "n (h d) -> n h d", h=self.n_heads)
        return self._rope_and_rotate(q, rope)

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> fp32 [n, Hi]: weights_proj(x) * Hi^-0.5 * Di^-0.5 (all constants folded in)."""
        return self.weights_proj(x).float() * (self.n_heads**-0.5 * self.head_dim**-0.5)

    def prepare_queries(self, x: torch.Tensor, c_q: torch.Tensor, rope: Rope, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Index queries and head weights of the local rows. With FP8 keys (`fp8`) the queries are
        quantised too, one scale per (token, head), folded into the head weights."""
        q, w = self.queries(c_q, rope), self.head_weights(x)
        if fp8:
            q, q_scale = quantize_index_q(q)
            w = w * q_scale
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: IndexKeys, ctx: ForwardContext) -> torch.Tensor:
        """Top-k key indices [n, K] into the gathered buffer `keys` ([T, Di], or FP8 values and
        per-key scales) for queries from `prepare_queries`; -1 where a row has fewer than K causal
        keys. Query rows are scored `ctx.kernels.query_chunk` at a time."""
        kern, out = ctx.kernels, []
        for s in range(0, max(q.shape[0], 1), kern.query_chunk):
            sl = slice(s, s + kern.query_chunk)
            ks, ke = ctx.key_start[sl], ctx.key_end[sl]
            logits = kern.indexer_logits(q[sl], keys, w[sl], ks, ke)
            out.append(kern.topk_indices(logits, ks, ke, self.topk))
        return torch.cat(out)


class MLA(nn.Module):
    """One attention layer: projections, indexer, sparse attention over the gathered latent."""

    def __init__(self, cfg: ModelConfig, indexer_fp8_sim: bool = False):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_lora + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)
        self.indexer = Indexer(cfg, fp8_sim=indexer_fp8_sim)

    # ---- projections (local rows) ---------------------------------------------------------------

    def compress_q(self, x: torch.Tensor) -> torch.Tensor:
        """c_q = RMSNorm(q_a_proj x): [n, hidden] -> [n, q_lora]."""
        return self.q_a_layernorm(self.q_a_proj(x))

    def latent(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """The per-token cached latent [c_kv | k_pe]: [n, hidden] -> [n, kv_lora + rope]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.rope_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(c_kv), apply_rope_interleaved(k_pe, *rope)], dim=-1)

    def _q_heads(self, c_q: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        q = rearrange(self.q_b_proj(c_q), "n (h d) -> n h d", h=self.n_heads)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        return q_nope, apply_rope_interleaved(q_pe, *rope)

    def _w_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK [H, nope, kv_lora], W_UV [H, v, kv_lora]."""
        w = rearrange(self.kv_b_proj.weight, "(h d) c -> h d c", h=self.n_heads)
        return w.split([self.nope, self.v_dim], dim=1)

    def absorbed_q(self, c_q: torch.Tensor, rope: Rope) -> torch.Tensor:
        """q~ = [W_UK^T q_nope | q_pe]: [n, q_lora] -> [n, H, kv_lora + rope]."""
        q_nope, q_pe = self._q_heads(c_q, rope)
        w_uk, _ = self._w_kv_b()
        q_lat = torch.einsum("nhd,hdc->nhc", q_nope, w_uk)
        return torch.cat([q_lat, q_pe], dim=-1)

    def output(self, o_latent: torch.Tensor) -> torch.Tensor:
        """Output latent [n, H, kv_lora] -> W_UV per head -> o_proj -> [n, hidden]."""
        _, w_uv = self._w_kv_b()
        o = torch.einsum("nhc,hvc->nhv", o_latent, w_uv)
        return self.o_proj(rearrange(o, "n h v -> n (h v)"))

    # ---- naive form (oracle) ---------------------------------------------------------------------

    def naive_attention(self, c_q: torch.Tensor, rope: Rope, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decompressed per-head k/v over all T gathered tokens, masked: -> [n, hidden]."""
        q_nope, q_pe = self._q_heads(c_q, rope)
        c_kv, k_pe = latent.split([self.kv_lora, self.rope_dim], dim=-1)
        kv = rearrange(self.kv_b_proj(c_kv), "t (h d) -> t h d", h=self.n_heads)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = dense_masked_attention(q, k, v, mask, self.softmax_scale)
        return self.o_proj(o.flatten(1))

    # ---- forward ---------------------------------------------------------------------------------

    def start_gather_kv(self, latent: torch.Tensor, index_k: torch.Tensor, ctx: ForwardContext) -> Callable[[], tuple[torch.Tensor, IndexKeys]]:
        """Start gathering this rank's latent [n, kv_lora + rope] and index keys [n, Di] to every
        token, in global order, as ctx.kv_dtype stores them; the returned function waits for it.

        One collective moves both: [latent | index key] per row, 704 values for V3.2; with fp8 each
        rank packs its own rows first and 656 + 132 = 788 bytes per token travel (1408 in bf16), the
        latent stays packed for sparse MLA and the index key arrives as e4m3 values and per-key scales."""
        if ctx.kv_dtype == "fp8":
            width = index_k_fp8_width(index_k.shape[-1])
            pending = ctx.start_gather(torch.cat([pack_mla_kv(latent, self.kv_lora), pack_index_k(index_k)], dim=-1))

            def finish_fp8():
                packed = pending.wait()
                latent_all, index_all = packed.split([packed.shape[-1] - width, width], dim=-1)
                return latent_all, unpack_index_k(index_all)
            return finish_fp8
        rows = torch.cat([latent, index_k], dim=-1)
        pending = ctx.start_gather(rows.to(torch.bfloat16) if ctx.kv_dtype == "bf16" else rows)

        def finish():
            return pending.wait().to(latent.dtype).split([latent.shape[-1], index_k.shape[-1]], dim=-1)
        return finish

    def forward(self, x: torch.Tensor, rope: Rope, ctx: ForwardContext, layer: int) -> torch.Tensor:
        """x [n, hidden] (normed) -> attention output [n, hidden] for this rank's rows.

        The KV gather starts as soon as this rank's latent and index keys exist; the query-side
        projections (c_q, index queries and head weights, the absorbed q) need no gathered data and
        run while it is in flight (ctx.overlap_gather; off: they run after it)."""
        with ctx.stage("attn.proj"):
            latent = self.latent(x, rope)
            index_k = self.indexer.keys(x, rope)
            if ctx.overlap_gather:
                finish_gather = self.start_gather_kv(latent, index_k, ctx)
        if not ctx.overlap_gather:
            with ctx.stage("attn.gather"):
                kv = self.start_gather_kv(latent, index_k, ctx)()
        with ctx.stage("attn.q_proj"):
            c_q = self.compress_q(x)
            iq, iw = self.indexer.prepare_queries(x, c_q, rope, fp8=ctx.kv_dtype == "fp8")
            q = self.absorbed_q(c_q, rope) if ctx.attn_impl == "sparse" else None
        if ctx.overlap_gather:
            with ctx.stage("attn.gather"):  # only what the projections did not hide
                kv = finish_gather()
        latent_all, index_k_all = kv
        if ctx.cache is not None:  # append the new rows in place; the keys are then every cached row
            with ctx.stage("attn.cache"):
                latent_all, index_k_all = ctx.cache.write(layer, ctx.cache_rows, latent_all, index_k_all)
        with ctx.stage("attn.indexer"):
            topk = self.indexer.select(iq, iw, index_k_all, ctx)
        if ctx.on_topk is not None:
            ctx.on_topk(layer, topk)
        with ctx.stage("attn.sparse_mla"):
            if ctx.attn_impl == "dense_mask":
                if latent_all.dtype == torch.uint8:
                    latent_all = unpack_mla_kv(latent_all, self.kv_lora, x.dtype)
                return self.naive_attention(c_q, rope, latent_all, topk_mask(topk, latent_all.shape[0]))
            o_latent, _ = ctx.kernels.sparse_mla(q, latent_all, topk, self.softmax_scale, self.kv_lora)
        with ctx.stage("attn.out_proj"):
            return self.output(o_latent)
