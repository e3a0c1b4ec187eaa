"""Prefill inputs: validation, prompt files, random prompts. Every check here runs before any
collective, on every rank, so bad input fails fast everywhere instead of hanging the group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from cp_attn.config import ModelConfig


def validate_batch(input_ids: Sequence[Sequence[int]], cfg: ModelConfig, allow_empty: bool = False) -> list[list[int]]:
    """A non-empty list of non-empty token-id lists, every id in the vocabulary and every sequence
    within max_position_embeddings; ValueError naming the offending value otherwise. `allow_empty`
    admits empty sequences (a chunk over a KV cache may bring nothing new for some sequences)."""
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence) or len(input_ids) == 0:
        raise ValueError(f"input_ids must be a non-empty list of token-id lists, got {input_ids!r:.80}")
    out = []
    for b, seq in enumerate(input_ids):
        if isinstance(seq, torch.Tensor):
            seq = seq.tolist()
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise ValueError(f"input_ids[{b}] must be a list of token ids, got {seq!r:.80}")
        if len(seq) == 0 and not allow_empty:
            raise ValueError(f"input_ids[{b}] is empty: every sequence needs at least one token")
        if len(seq) > cfg.max_position_embeddings:
            raise ValueError(f"input_ids[{b}] has {len(seq)} tokens, more than max_position_embeddings={cfg.max_position_embeddings}")
        ids = _as_id_tensor(seq, b)
        bad = (ids < 0) | (ids >= cfg.vocab_size)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"token id {int(ids[i])} at input_ids[{b}][{i}] is outside the vocabulary [0, {cfg.vocab_size})")
        out.append(ids.tolist())
    return out


def _as_id_tensor(seq: Sequence, b: int) -> torch.Tensor:
    """One sequence as an int64 tensor; the type check is one C-speed pass, not a Python loop."""
    if set(map(type, seq)) != {int}:
        for i, t in enumerate(seq):  # slow path, only to name the offending entry
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"input_ids[{b}][{i}] = {t!r} is not an int token id")
    try:
        return torch.tensor(seq, dtype=torch.long)
    except (RuntimeError, OverflowError, ValueError):  # beyond int64: outside any vocabulary
        i, t = max(enumerate(seq), key=lambda it: abs(it[1]))
        raise ValueError(f"token id {t} at input_ids[{b}][{i}] is outside the vocabulary") from None


def load_prompts(path: str | Path) -> list[list[int]]:
    """Read `{"input_ids": [[...], ...]}`; ValueError naming the file for anything else."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"prompts file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"prompts file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "input_ids" not in data:
        raise ValueError(f'prompts file {path} must hold {{"input_ids": [[...], ...]}}')
    ids = data["input_ids"]
    if not isinstance(ids, list) or not all(isinstance(s, list) for s in ids):
        raise ValueError(f'prompts file {path}: "input_ids" must be a list of lists of token ids')
    return ids


def random_prompts(lengths: Sequence[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """One random sequence per length (seeded: identical on every rank)."""
    g = torch.Generator().manual_seed(seed)
    for b, L in enumerate(lengths):
        if isinstance(L, bool) or not isinstance(L, int) or L <= 0:
            raise ValueError(f"input.lengths[{b}] = {L!r} must be a positive int")
    return [torch.randint(0, vocab_size, (L,), generator=g).tolist() for L in lengths]
