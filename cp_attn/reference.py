"""Single-process reference: the logits of every token through the sparse (indexer + top-k) path,
with no process group. CP runs are checked against this."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from cp_attn.checkpoint import SafetensorsSource, build_model
from cp_attn.inputs import validate_batch
from cp_attn.model import ForwardContext, Transformer


@torch.no_grad()
def run_single(model: Transformer, input_ids: Sequence[Sequence[int]], **ctx_kw) -> list[torch.Tensor]:
    """Logits [L_b, vocab] (fp32) per sequence from a model holding every expert."""
    ids = validate_batch(input_ids, model.cfg)
    lens = [len(s) for s in ids]
    device = model.embed_tokens.weight.device
    ctx = ForwardContext.single(lens, **ctx_kw).to(device)
    flat = torch.tensor([t for s in ids for t in s], dtype=torch.long, device=device)
    logits = model.logits(model(flat, ctx))
    return list(logits.split(lens))


def reference_logits(checkpoint: str | Path, input_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per-token fp32 logits `[L_b, vocab]` of every sequence, computed on one process in fp32 from
    the HF checkpoint directory `checkpoint` (FP8 weights are dequantised on load)."""
    source = SafetensorsSource(checkpoint)
    validate_batch(input_ids, source.config)  # fail before reading any weight
    model = build_model(source, dtype=torch.float32)
    return [x.cpu() for x in run_single(model, input_ids)]
