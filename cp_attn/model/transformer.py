"""The DeepSeek V3.2 decoder: embeddings, pre-norm blocks (MLA + dense MLP or MoE), final norm, lm_head.

Module and parameter names follow the HF checkpoint (`layers.N.self_attn.q_a_proj.weight`, ...;
the checkpoint adds a `model.` prefix except on `lm_head`), so loading is a name lookup.
The forward runs on this rank's rows only; everything it needs about the rest of the batch comes
through the `ForwardContext`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from cp_attn.config import ModelConfig
from cp_attn.model.context import ForwardContext
from cp_attn.model.layers import RMSNorm, SwiGLU
from cp_attn.model.mla import MLA
from cp_attn.model.moe import MoE
from cp_attn.model.rope import rope_cos_sin, rope_inv_freq


class Block(nn.Module):
    """h += attn(RMSNorm(h)); h += ffn(RMSNorm(h))."""

    def __init__(self, cfg: ModelConfig, layer: int, expert_ids: Iterable[int] | None, expert_shard: tuple[int, int],
                 indexer_fp8_sim: bool):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, indexer_fp8_sim=indexer_fp8_sim)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.mlp = MoE(cfg, expert_ids, expert_shard)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, rope, ctx: ForwardContext) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, ctx, self.layer)
        x = self.post_attention_layernorm(h)
        with ctx.stage("moe" if self.is_moe else "mlp"):
            return h + (ctx.moe(self.mlp, x) if self.is_moe else self.mlp(x))


class Transformer(nn.Module):
    """DeepSeek V3.2 for prefill.

    expert_ids: routed experts this process holds (None = all); expert_shard: (i, n) to hold part i
    of n of every expert's intermediate dim. Both only shape the MoE layers' weights.
    """

    def __init__(self, cfg: ModelConfig, expert_ids: Iterable[int] | None = None, expert_shard: tuple[int, int] = (0, 1),
                 indexer_fp8_sim: bool = False):
        super().__init__()
        self.cfg = cfg
        expert_ids = None if expert_ids is None else list(expert_ids)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, i, expert_ids, expert_shard, indexer_fp8_sim) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """ValueError naming the first token id outside [0, vocab_size)."""
        bad = (input_ids < 0) | (input_ids >= self.cfg.vocab_size)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"token id {int(input_ids[i])} at position {i} is outside the vocabulary [0, {self.cfg.vocab_size})")

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [n] of this rank's rows -> final-normed hidden states [n, hidden]."""
        with ctx.stage("embed"):
            h = self.embed_tokens(input_ids)
            rope = rope_cos_sin(self.rope_inv_freq.float(), ctx.positions)
        for block in self.layers:
            h = block(h, rope, ctx)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """[n, hidden] -> fp32 [n, vocab], `chunk` rows at a time."""
        out = torch.empty((hidden.shape[0], self.cfg.vocab_size), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            out[s : s + chunk] = self.lm_head(hidden[s : s + chunk]).float()
        return out
