"""Look inside a prefill: the indexer's scores and picks, ties at the top-k cut, committed GPU records.

    traces = trace_indexer(model, [[ids...], ...])   # layer -> IndexerTrace (logits, top-k, key ranges)
    ties = cut_ties(traces[0])                        # which rows tie at the cut, and how they were broken
    machine, runs = load_records("docs/results/h200x4_v32slim_bench16k.jsonl")

The traces come from the real forward (`cp_attn.reference.run_single`, one process): the kernel set's
indexer-logits stage is wrapped to keep what it returns, so every layer sees the hidden states the
previous layers really produced. Letters: T tokens, K top-k.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from cp_attn.inputs import validate_batch
from cp_attn.layout import plan_split
from cp_attn.ops.kernels import KernelSet
from cp_attn.ops.naive import key_mask
from cp_attn.ops.oracle import topk_mask


@dataclass
class IndexerTrace:
    """What the indexer of one layer computed for every token of a batch (one process, global order)."""

    logits: torch.Tensor
    """[T, T] fp32 scores I[t, s]; -inf outside the causal range of t's own sequence."""
    topk: torch.Tensor
    """[T, K] selected keys, ascending; -1 in slots past min(K, position + 1)."""
    key_start: torch.Tensor
    """[T] ks: first key of each token's sequence."""
    key_end: torch.Tensor
    """[T] ke = ks + position + 1."""

    @property
    def selected(self) -> torch.Tensor:
        """[T, T] bool, True where key s is among t's top-k."""
        return topk_mask(self.topk, self.logits.shape[1])

    @property
    def causal(self) -> torch.Tensor:
        """[T, T] bool, True where key s is a causal key of t (what dense causal attention reads)."""
        return key_mask(self.key_start, self.key_end, self.logits.shape[1])


@torch.no_grad()
def trace_indexer(model, input_ids: Sequence[Sequence[int]], kernels: KernelSet | None = None) -> dict[int, IndexerTrace]:
    """layer -> IndexerTrace of a single-process forward of `input_ids` through `model`."""
    from cp_attn.reference import run_single

    ids = validate_batch(input_ids, model.cfg)
    ks, ke = plan_split([len(s) for s in ids], 1, "round_robin").key_range(0)
    base = kernels or KernelSet()
    chunks: list[torch.Tensor] = []   # the current layer's logits, one piece per query chunk
    traces: dict[int, IndexerTrace] = {}

    def logits_kept(q, k, w, ks_, ke_):
        out = base.indexer_logits(q, k, w, ks_, ke_)
        chunks.append(out.detach().float().cpu())
        return out

    def on_topk(layer: int, idx: torch.Tensor) -> None:
        traces[layer] = IndexerTrace(torch.cat(chunks), idx.cpu(), ks, ke)
        chunks.clear()

    run_single(model, ids, kernels=dataclasses.replace(base, indexer_logits=logits_kept), on_topk=on_topk)
    return traces


@dataclass
class CutTies:
    """The keys of each row that score exactly its K-th selected score (the score at the cut)."""

    tied_keys: torch.Tensor
    """[T, T] bool: in-range keys scoring exactly the cut score, in rows that have a cut."""
    selected: torch.Tensor
    """[T, T] bool: the keys each row selected."""
    has_cut: torch.Tensor
    """[T] bool: the row has more causal keys than K, so the top-k drops some."""

    @property
    def tied(self) -> torch.Tensor:
        """[T] how many keys tie at the cut (0 for rows that select every causal key)."""
        return self.tied_keys.sum(-1)

    @property
    def taken(self) -> torch.Tensor:
        """[T] how many of the tied keys were selected."""
        return (self.tied_keys & self.selected).sum(-1)

    @property
    def at_cut(self) -> torch.Tensor:
        """[T] bool: the tie straddles the cut (some tied keys selected, some not), so the order decides."""
        return (self.taken > 0) & (self.taken < self.tied)

    @property
    def lowest_first(self) -> torch.Tensor:
        """[T] bool: every selected tied key has a lower index than every tied key left out."""
        T = self.tied_keys.shape[1]
        col = torch.arange(T)
        last_taken = torch.where(self.tied_keys & self.selected, col, -1).amax(-1)
        first_left = torch.where(self.tied_keys & ~self.selected, col, T).amin(-1)
        return last_taken < first_left


def cut_ties(trace: IndexerTrace) -> CutTies:
    """The ties at the top-k cut of every row of `trace`. Rows with at most K causal keys select them all
    and have no cut: no key counts as tied there."""
    logits, sel, causal = trace.logits, trace.selected, trace.causal
    has_cut = causal.sum(-1) > sel.sum(-1)                                           # more keys than K
    cut = torch.where(sel, logits, float("inf")).amin(-1, keepdim=True)               # K-th selected score
    return CutTies((logits == cut) & causal & has_cut[:, None], sel, has_cut)


STAGE_GROUPS = {
    "indexer": ("attn.indexer",),
    "sparse MLA": ("attn.sparse_mla",),
    "MoE / MLP": ("moe", "mlp"),
    "gathers": ("attn.gather", "final.gather"),
    "projections": ("embed", "attn.proj", "attn.out_proj"),
}
"""Stage names of `cp_attn.timing.StageTimer` grouped for a readable stack: the two stages CP splits by query
row, the FFN (MoE includes its collectives), the KV and final gathers (transfer plus waiting for the slowest
rank), and the per-token projections."""


def group_stages(stages_s: dict[str, float]) -> dict[str, float]:
    """Seconds per STAGE_GROUPS group, in its order; stages outside every group land in 'other'."""
    out = {name: sum(stages_s.get(s, 0.0) for s in members) for name, members in STAGE_GROUPS.items()}
    known = {s for members in STAGE_GROUPS.values() for s in members}
    rest = sum(v for k, v in stages_s.items() if k not in known)
    if rest:
        out["other"] = rest
    return out


def parallel_efficiency(runs: Sequence[dict], group: Sequence[str] = ("mode", "moe_backend"),
                        ) -> dict[tuple, list[tuple[int, float]]]:
    """Parallel efficiency of result records (`cp_size`, `seconds`), in percent: the fastest time at the
    smallest CP size C0, divided by (C / C0) times each record's time (100% = ideal scaling).
    Returns {values of the `group` keys: [(C, efficiency), ...] sorted by C}."""
    if not runs:
        raise ValueError("no records to compare")
    c0 = min(int(r["cp_size"]) for r in runs)
    base = min(float(r["seconds"]) for r in runs if int(r["cp_size"]) == c0)
    out: dict[tuple, list[tuple[int, float]]] = {}
    for r in runs:
        C = int(r["cp_size"])
        out.setdefault(tuple(str(r[k]) for k in group), []).append((C, 100 * base * c0 / (C * float(r["seconds"]))))
    return {key: sorted(pts) for key, pts in out.items()}


def load_records(path: str | Path) -> tuple[dict | None, list[dict]]:
    """A results file of JSON lines (docs/results/*.jsonl): (the machine line, if any, and the run records).

    The machine line carries the ceilings measured in the same run (`device`, `bf16_matmul_tflops`, ...);
    every other line is one report of `scripts/prefill.py` (or a comparison record).
    """
    machine, runs = None, []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not a JSON line: {e}") from None
        if "device" in rec and "bf16_matmul_tflops" in rec:
            machine = rec
        else:
            runs.append(rec)
    return machine, runs
