"""Start a CP group on this machine from Python (a notebook, a test, a script), no torchrun, no shell.

    results = run_ranks(fn, C, *args)                   # fn(comm, *args) on C ranks; results[r] from rank r
    ranks = run_cp_prefill([40, 7, 1], C, "in_seq", "fused")    # the CP prefill: one RankResult per rank
    runs = run_cp_prefill_sizes([40, 7, 1], [1, 2, 4])            # several CP sizes, one set of processes
    ref = reference_prefill([40, 7, 1])                  # the same batch on one process, no process group

Each rank is a `spawn`ed process with one CPU thread that joins a gloo (or NCCL) group on a free
127.0.0.1 port through `cp_attn.comm.init_distributed`, so the ranks run exactly what torchrun ranks
run. A rank that raises fails the caller with that rank's traceback (RankError); a run that takes
longer than `timeout` seconds is killed and raises TimeoutError, so a hung collective never hangs the
caller. Results travel through files in a temporary directory, not pipes, so a large result cannot
deadlock and a dead rank cannot leave the parent waiting.

`fn` must be importable by name in a fresh process (a module-level function of an importable module,
not one defined in a notebook cell); its arguments and result must be picklable (tensors are fine).
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp

from cp_attn.atomic import write_bytes

PG_TIMEOUT_S = 60.0  # bounds every collective inside a rank; `timeout` bounds the whole run
GRACE_S = 2.0  # after one rank fails, how long the others get to finish before they are killed


class RankError(RuntimeError):
    """A rank raised or died; the message holds its traceback (the first failing rank first)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, backend: str) -> None:
    from cp_attn.comm import destroy_distributed, exit_process, init_distributed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    out = Path(out_dir)
    try:
        comm = init_distributed(backend, timeout_s=PG_TIMEOUT_S)
        result = fn(comm, *args)
        write_bytes(out / f"{rank}.pkl", pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException:
        write_bytes(out / f"{rank}.err", traceback.format_exc().encode())
        failed = True
    else:
        failed = False
    try:
        destroy_distributed()
    except Exception:
        pass
    exit_process(1 if failed else 0)  # results are on disk; skip the teardown gloo can crash in


def _err_time(out: Path, rank: int) -> int:
    """When rank `rank` wrote its traceback (ns), 0 if it has not."""
    try:
        return (out / f"{rank}.err").stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _spawn_env() -> dict[str, str]:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # the hostname may not resolve to a usable address in containers
    return env


def _import_root(fn: Callable) -> str | None:
    """The sys.path entry `fn`'s module is imported from (`/repo` for `tests.test_x` in /repo/tests),
    so a spawned rank can import it even when the caller put that entry on sys.path by other means."""
    module = sys.modules.get(getattr(fn, "__module__", ""), None)
    path = getattr(module, "__file__", None)
    if path is None or module.__name__ == "__main__":
        return None
    return str(Path(path).resolve().parents[module.__name__.count(".")])


def _run_once(fn: Callable, world_size: int, args: tuple, timeout: float, backend: str) -> list[Any]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="run_ranks_") as out_dir:
        out = Path(out_dir)
        procs = [
            ctx.Process(target=_rank_main, args=(r, world_size, port, out_dir, fn, args, backend), name=f"rank{r}")
            for r in range(world_size)
        ]
        # Children inherit the environment and sys.path at start(): set both for the start only.
        saved_env = {k: os.environ.get(k) for k in _spawn_env()}
        root = _import_root(fn)
        added_root = root is not None and root not in sys.path
        os.environ.update(_spawn_env())
        if added_root:
            sys.path.insert(0, root)
        try:
            for p in procs:
                p.start()
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if added_root:
                sys.path.remove(root)

        # rank -> (wrote a traceback, when). A rank that died without one (a crash) is most likely the
        # root cause, the others then fail in their collectives; among tracebacks, the earliest first.
        failed_at: dict[int, tuple[bool, int]] = {}

        def note_failures(ranks: list[int]) -> None:
            for r in ranks:
                if r not in failed_at and (_err_time(out, r) or procs[r].exitcode):
                    failed_at[r] = (bool(_err_time(out, r)), _err_time(out, r) or time.time_ns())

        deadline, give_up = time.monotonic() + timeout, None
        try:
            while any(p.is_alive() for p in procs) and time.monotonic() < min(deadline, give_up or deadline):
                note_failures(list(range(world_size)))
                if failed_at and give_up is None:
                    give_up = time.monotonic() + GRACE_S  # the others are likely stuck in a collective
                time.sleep(0.02)
        finally:
            killed = [r for r, p in enumerate(procs) if p.is_alive()]
            for r in killed:
                procs[r].kill()
            for p in procs:
                p.join()
        note_failures([r for r in range(world_size) if r not in killed])
        failed = sorted(failed_at, key=failed_at.get)

        name = getattr(fn, "__qualname__", repr(fn))
        if failed:
            reports = []
            for r in failed:
                err = out / f"{r}.err"
                text = err.read_text() if err.exists() else f"exited with code {procs[r].exitcode}; see its stderr\n"
                reports.append(f"---- rank {r} of {world_size} ----\n{text}")
            raise RankError(f"{name} failed on rank {failed[0]}:\n" + "".join(reports))
        if killed:
            raise TimeoutError(
                f"{name} on {world_size} ranks did not finish within {timeout:g} s; ranks {killed} were killed"
            )
        return [pickle.loads((out / f"{r}.pkl").read_bytes()) for r in range(world_size)]


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, backend: str = "gloo") -> list[Any]:
    """`fn(comm, *args)` on `world_size` ranks; returns [rank 0's result, rank 1's, ...].

    Raises RankError with the failing rank's traceback if any rank raises or dies, and TimeoutError
    (after killing every rank) if the run takes more than `timeout` seconds.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown process-group backend {backend!r}; expected gloo or nccl")
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout, backend)
        except RankError as e:
            # The free port can be taken between finding it and rank 0 binding it: retry on a new one.
            port_taken = "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
            if attempt == 2 or not port_taken:
                raise
    raise AssertionError("unreachable")


# ---- the CP prefill, launched from Python -------------------------------------------------------


@dataclass
class RankResult:
    """What one rank of a CP prefill computed and how long it took (the whole batch for a reference)."""

    rank: int
    rows: int
    """Real rows (tokens) this rank computed."""
    pad_rows: int
    """Padding rows it computed too (round_robin pads the batch to a multiple of C)."""
    seconds: float
    """Wall time of the timed forward on this rank: from a barrier to this rank's final hidden states."""
    stages_s: dict[str, float]
    """Seconds per stage of that forward (`cp_attn.timing.StageTimer` names: 'attn.indexer', ...)."""
    logits: list[torch.Tensor] | None = None
    """fp32 [L_b, vocab] per sequence; every rank holds every token's logits after the final gather."""
    topk: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> [T, K] top-k key indices of every token, global order (-1 = empty slot)."""

    def max_abs_diff(self, ref: "RankResult") -> float:
        """Largest |logit - reference logit| over every token of the batch."""
        if self.logits is None or ref.logits is None:
            raise ValueError("both results need logits (run with logits=True)")
        return max(float((a - b).abs().max()) for a, b in zip(self.logits, ref.logits, strict=True))

    def same_topk(self, ref: "RankResult") -> bool:
        """Whether every layer selected exactly the reference's keys for every token."""
        if not self.topk or sorted(self.topk) != sorted(ref.topk):
            return False
        return all(torch.equal(self.topk[layer], ref.topk[layer]) for layer in ref.topk)


@dataclass(frozen=True)
class _Spec:
    """Everything a rank needs to rebuild the model and the batch (small and picklable)."""

    ids: list[list[int]]
    mode: str
    moe_backend: str
    model: Any  # a ModelConfig (seeded random weights) or a checkpoint path (str)
    seed: int
    kernels: str
    warmup: int
    record_topk: bool
    logits: bool
    device: str = "cpu"  # "cuda": rank r on GPU r (NCCL)


def _source(spec: _Spec, device: torch.device):
    from cp_attn.checkpoint import RandomSource, SafetensorsSource

    return SafetensorsSource(spec.model) if isinstance(spec.model, str) else RandomSource(spec.model, spec.seed, device)


def _prefill_rank(comm, spec: _Spec, sizes: tuple[int, ...]) -> dict[int, RankResult]:
    """One process of `run_cp_prefill_sizes`: for each CP size C, the first C ranks form a group and run it."""
    from cp_attn.ops.kernels import get_kernels

    device = torch.device(f"cuda:{comm.rank}" if spec.device == "cuda" else "cpu")
    source, kernels = _source(spec, device), get_kernels(spec.kernels)
    out = {}
    for C in sizes:
        sub = comm.subgroup(C)                      # every process takes part in creating each group
        if sub is not None:
            out[C] = _prefill_once(sub, spec, source, kernels, device)
    return out


def _prefill_once(comm, spec: _Spec, source, kernels, device: torch.device) -> RankResult:
    """Build this rank's model (its experts only), warm up, time one forward."""
    from cp_attn.checkpoint import build_model
    from cp_attn.parallel import cp_prefill, expert_placement
    from cp_attn.timing import StageTimer

    pl = expert_placement(spec.moe_backend, source.config, comm.rank, comm.size)
    model = build_model(source, expert_ids=pl.expert_ids, expert_shard=pl.expert_shard, device=device)

    def forward(timer=None):
        return cp_prefill(model, comm, spec.ids, spec.mode, spec.moe_backend, kernels=kernels, timer=timer,
                          record_topk=spec.record_topk and timer is not None)

    for _ in range(spec.warmup):
        forward()
    timer = StageTimer(sync=device.type == "cuda")
    comm.barrier()
    t0 = time.perf_counter()
    out = forward(timer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    tok = out.plan.token_index(comm.rank)
    logits = [x.cpu() for x in out.split(model.logits(out.hidden))] if spec.logits else None
    return RankResult(comm.rank, int((tok >= 0).sum()), int((tok < 0).sum()), seconds, timer.summary(), logits,
                      {layer: idx.cpu() for layer, idx in out.topk.items()})


def _spec(batch, mode: str, moe_backend: str, cp_size: int, model, checkpoint, seed: int, input_seed: int,
          kernels: str, warmup: int, record_topk: bool, logits: bool) -> _Spec:
    """Validate everything in the caller's process, before any rank starts."""
    from cp_attn.checkpoint import SafetensorsSource
    from cp_attn.config import ModelConfig, preset
    from cp_attn.inputs import random_prompts
    from cp_attn.ops.kernels import get_kernels
    from cp_attn.parallel import check_prefill_args

    if checkpoint is not None:
        cfg, model = SafetensorsSource(checkpoint).config, str(checkpoint)
    else:
        cfg = model if isinstance(model, ModelConfig) else preset(model)
        model = cfg
    if isinstance(batch, Sequence) and batch and all(isinstance(x, int) and not isinstance(x, bool) for x in batch):
        batch = random_prompts(list(batch), cfg.vocab_size, input_seed)      # lengths -> seeded random ids
    get_kernels(kernels)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    ids = check_prefill_args(cfg, cp_size, mode, moe_backend, batch)
    return _Spec(ids, mode, moe_backend, model, seed, kernels, warmup, record_topk, logits)


def run_cp_prefill(
    batch: Sequence[int] | Sequence[Sequence[int]],
    cp_size: int,
    mode: str = "in_seq",
    moe_backend: str = "fused",
    **kw: Any,
) -> list[RankResult]:
    """The CP prefill of `batch` on `cp_size` local ranks; returns one RankResult per rank.

    batch: token-id lists, or sequence lengths (then seeded random ids, `input_seed`). Keywords as for
    `run_cp_prefill_sizes`.
    """
    return run_cp_prefill_sizes(batch, [cp_size], mode, moe_backend, **kw)[cp_size]


def run_cp_prefill_sizes(
    batch: Sequence[int] | Sequence[Sequence[int]],
    cp_sizes: Sequence[int],
    mode: str = "in_seq",
    moe_backend: str = "fused",
    *,
    model: Any = "tiny",
    checkpoint: str | Path | None = None,
    seed: int = 0,
    input_seed: int = 0,
    kernels: str = "torch",
    warmup: int = 0,
    record_topk: bool = True,
    logits: bool = True,
    timeout: float = 120.0,
    backend: str = "gloo",
) -> dict[int, list[RankResult]]:
    """The CP prefill of `batch` at every CP size in `cp_sizes`: {C: one RankResult per rank}.

    One set of max(cp_sizes) processes runs them all, one after the other, each on a group of the first
    C ranks (the others wait), so the processes start and import once.
    model: a preset name or a ModelConfig with seeded random weights (`seed`); or `checkpoint`, an HF
    checkpoint directory. Each rank loads only the experts its MoE backend needs at that size. Weights
    and activations are fp32, on CPU with gloo or on one GPU per rank with backend='nccl'. Bad input
    raises ValueError here, before any process starts.
    """
    sizes = list(cp_sizes)
    if not sizes or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in sizes):
        raise ValueError(f"cp_sizes must be a non-empty list of ints >= 1, got {cp_sizes!r}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"cp_sizes has repeats: {sizes}")
    for C in sizes:
        spec = _spec(batch, mode, moe_backend, C, model, checkpoint, seed, input_seed, kernels, warmup,
                     record_topk, logits)
    spec = replace(spec, device="cuda" if backend == "nccl" else "cpu")
    per_process = run_ranks(_prefill_rank, max(sizes), spec, tuple(sizes), timeout=timeout, backend=backend)
    return {C: [per_process[r][C] for r in range(C)] for C in sizes}


def reference_prefill(
    batch: Sequence[int] | Sequence[Sequence[int]],
    *,
    model: Any = "tiny",
    checkpoint: str | Path | None = None,
    seed: int = 0,
    input_seed: int = 0,
    kernels: str = "torch",
    attn_impl: str = "sparse",
) -> RankResult:
    """The same batch on this process with every expert and no process group (`ForwardContext.single`):
    the reference `run_cp_prefill` is compared with. `rows` is every token of the batch; `seconds`
    includes the lm_head. attn_impl='dense_mask' runs the oracle (naive MLA, dense scores, -inf outside
    the top-k) instead of sparse attention over the selected latent rows."""
    from cp_attn.checkpoint import build_model
    from cp_attn.ops.kernels import get_kernels
    from cp_attn.reference import run_single
    from cp_attn.timing import StageTimer

    spec = _spec(batch, "in_seq", "fused", 1, model, checkpoint, seed, input_seed, kernels, 0, True, True)
    model_ = build_model(_source(spec, torch.device("cpu")))
    topk: dict[int, torch.Tensor] = {}
    timer = StageTimer()
    t0 = time.perf_counter()
    logits = run_single(model_, spec.ids, kernels=get_kernels(kernels), timer=timer, attn_impl=attn_impl,
                        on_topk=lambda layer, idx: topk.__setitem__(layer, idx))
    seconds = time.perf_counter() - t0
    return RankResult(0, sum(map(len, spec.ids)), 0, seconds, timer.summary(), logits, topk)


# ---- one all-gather + rerange, shown on a real tensor ---------------------------------------------


@dataclass
class GatherResult:
    """One rank's view of `Comm.gather` on a tensor given in global token order."""

    local: torch.Tensor
    """[n_r, ...] this rank's rows (`Comm.shard`), in local order; padding rows are 0."""
    buffer: torch.Tensor
    """[C * S, ...] the raw all-gather: every rank's rows padded to S, rank-major, not reordered."""
    gathered: torch.Tensor
    """[T, ...] `buffer[restore_index]`: what `Comm.gather` returns, the whole batch in global order."""


def _gather_rank(comm, x: torch.Tensor, seq_lens: list[int], mode: str) -> GatherResult:
    from cp_attn.layout import plan_split

    plan = plan_split(seq_lens, comm.size, mode)
    local = comm.shard(x, plan)
    return GatherResult(local, comm.all_gather(local, rows=plan.shard_size), comm.gather(local, plan))


def run_gather(x: torch.Tensor, seq_lens: Sequence[int], cp_size: int, mode: str, *,
               timeout: float = 60.0) -> list[GatherResult]:
    """Shard `x` [T, ...] (global token order) over `cp_size` ranks as the CP prefill does, then gather
    it back through a real process group; one GatherResult per rank."""
    from cp_attn.layout import plan_split

    plan = plan_split(seq_lens, cp_size, mode)                      # validates before any process starts
    if x.shape[0] != plan.num_tokens:
        raise ValueError(f"x has {x.shape[0]} rows but the batch {list(plan.seq_lens)} has {plan.num_tokens} tokens")
    return run_ranks(_gather_rank, cp_size, x, list(plan.seq_lens), plan.mode, timeout=timeout)
