"""Chunked prefill: a batch of prompts prefilled in forwards of at most N tokens over a KV cache.

One cache (cp_attn.cache.KVCache) is allocated for the whole batch, each prompt's capacity its length.
Chunk k holds tokens [kN, (k+1)N) of the concatenated batch (cp_attn.layout.chunk_schedule): pieces of
several prompts when they are short, the cut prompt continuing first in the next chunk. That is how
SGLang's scheduler fills a prefill batch under `--chunked-prefill-size`, and it was chosen over one
prompt at a time because
  * every forward but the last carries N tokens, so the GPU and the CP split (which balances whatever
    tokens a forward has) always see a full chunk, however the prompts are cut;
  * a short prompt behind a long one waits only for the chunks before its own tokens, and TTFTs are
    then comparable with SGLang's, measured the same way;
  * a chunk then mixes prompts with and without a cached prefix, the hard case for CP bookkeeping
    (SGLang issue 37725), on every run rather than only in tests.
A prompt's TTFT is the time from the start until the chunk holding its last token is done (the device
synchronised after every chunk, as a server must before it can sample).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from cp_attn.cache import KVCache
from cp_attn.comm import Comm
from cp_attn.layout import chunk_schedule
from cp_attn.model import Transformer
from cp_attn.parallel.prefill import check_prefill_args, cp_prefill


@dataclass
class ChunkedOutput:
    hidden: torch.Tensor | None
    """[T, hidden] final-normed hidden states of every token of the batch, in global order (every
    rank); None when the caller did not keep them."""
    seq_lens: tuple[int, ...]
    chunks: list[list[int]]
    """Per chunk, the new tokens of every sequence (cp_attn.layout.chunk_schedule)."""
    ttft_s: list[float]
    """Per sequence: seconds from the start until the chunk holding its last token was done."""
    chunk_s: list[float]
    """Seconds of every chunk's forward."""
    cache: KVCache
    topk: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> [T, K] top-k of every token in global order, as cache rows (when recorded)."""

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Cut a [T, ...] tensor into per-sequence pieces."""
        return list(x.split(list(self.seq_lens)))


def check_chunk_size(chunk_size: int | None) -> None:
    """ValueError for a chunk size that is not a positive int (None means one shot)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be an int >= 1 (or unset for a one-shot prefill), got {chunk_size!r}")


@torch.no_grad()
def chunked_prefill(
    model: Transformer,
    comm: Comm,
    input_ids: Sequence[Sequence[int]],
    mode: str,
    moe_backend: str,
    chunk_size: int,
    *,
    kv_dtype: str = "auto",
    keep_hidden: bool = True,
    record_topk: bool = False,
    **prefill_kw,
) -> ChunkedOutput:
    """Prefill `input_ids` (every rank passes the whole batch) in chunks of at most `chunk_size`
    tokens over a fresh KV cache; `prefill_kw` go to every `cp_prefill` (kernels, timer, ...).
    `keep_hidden=False` drops each chunk's hidden states (benchmarks: memory as a server would hold)."""
    check_chunk_size(chunk_size)
    ids = check_prefill_args(model.cfg, comm.size, mode, moe_backend, input_ids)
    lens = [len(s) for s in ids]
    chunks = chunk_schedule(lens, chunk_size)
    weight = model.embed_tokens.weight
    cache = KVCache.allocate(model.cfg, lens, kv_dtype, weight.dtype, weight.device)
    sync = (lambda: torch.cuda.synchronize(weight.device)) if weight.device.type == "cuda" else (lambda: None)

    hidden: list[list[torch.Tensor]] = [[] for _ in ids]
    topk: dict[int, list[list[torch.Tensor]]] = {}
    ttft: list[float | None] = [None] * len(ids)
    chunk_s = []
    sync()
    t0 = time.perf_counter()
    for new in chunks:
        t_chunk = time.perf_counter()
        chunk_ids = [s[p : p + n] for s, p, n in zip(ids, cache.lengths, new)]
        out = cp_prefill(model, comm, chunk_ids, mode, moe_backend, kv_dtype=kv_dtype, cache=cache,
                         record_topk=record_topk, **prefill_kw)
        if keep_hidden:
            for b, h in enumerate(out.split(out.hidden)):
                hidden[b].append(h)
        for layer, idx in out.topk.items():
            for b, x in enumerate(out.split(idx)):
                topk.setdefault(layer, [[] for _ in ids])[b].append(x)
        del out
        sync()
        now = time.perf_counter()
        chunk_s.append(now - t_chunk)
        for b, L in enumerate(lens):
            if ttft[b] is None and cache.lengths[b] == L:
                ttft[b] = now - t0

    def whole(pieces: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.cat([torch.cat(p) for p in pieces])

    return ChunkedOutput(
        hidden=whole(hidden) if keep_hidden else None,
        seq_lens=tuple(lens), chunks=chunks, ttft_s=[float(t) for t in ttft], chunk_s=chunk_s, cache=cache,
        topk={layer: whole(p) for layer, p in topk.items()},
    )
