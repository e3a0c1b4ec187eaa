"""Single-process reference: the logits of every token through the sparse (indexer + top-k) path,
with no process group. CP runs are checked against this."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from cp_attn.checkpoint import SafetensorsSource, build_model
from cp_attn.inputs import validate_batch
from cp_attn.model import ForwardContext, Transformer


OUTPUT_TOKENS = ("all", "last")
"""Whose logits a run computes: every token's, or each sequence's last (its next-token prediction)."""


def select_tokens(hidden: torch.Tensor, seq_lens: Sequence[int], tokens: str = "all") -> tuple[torch.Tensor, list[int]]:
    """Hidden states [T, hidden] in global order -> the rows whose logits are wanted and how many of
    them each sequence has: all T ('all'), or one per sequence ('last'), so a 32K-token prefill with
    the real vocabulary need not hold [T, vocab] fp32 logits (17 GB) to predict the next tokens."""
    if tokens == "all":
        return hidden, list(seq_lens)
    if tokens == "last":
        last = torch.tensor(list(seq_lens), device=hidden.device).cumsum(0) - 1   # [B]
        return hidden[last], [1] * len(seq_lens)
    raise ValueError(f"unknown output.tokens {tokens!r}; expected one of {list(OUTPUT_TOKENS)}")


@torch.no_grad()
def run_single(model: Transformer, input_ids: Sequence[Sequence[int]], tokens: str = "all", **ctx_kw) -> list[torch.Tensor]:
    """Logits (fp32) per sequence from a model holding every expert: [L_b, vocab] for
    tokens='all', [1, vocab] (the last token's) for tokens='last'."""
    ids = validate_batch(input_ids, model.cfg)
    lens = [len(s) for s in ids]
    device = model.embed_tokens.weight.device
    ctx = ForwardContext.single(lens, **ctx_kw).to(device)
    flat = torch.tensor([t for s in ids for t in s], dtype=torch.long, device=device)
    hidden, rows = select_tokens(model(flat, ctx), lens, tokens)
    return list(model.logits(hidden).split(rows))


def reference_logits(checkpoint: str | Path, input_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per-token fp32 logits `[L_b, vocab]` of every sequence, computed on one process in fp32 from
    the HF checkpoint directory `checkpoint` (FP8 weights are dequantised on load)."""
    source = SafetensorsSource(checkpoint)
    validate_batch(input_ids, source.config)  # fail before reading any weight
    model = build_model(source, dtype=torch.float32)
    return [x.cpu() for x in run_single(model, input_ids)]
