"""Run a function on C gloo ranks in fresh processes and hand each rank's result back to the test.

    results = run_ranks(fn, C, *args)   # fn(comm, *args) on every rank; results[r] is rank r's return

`fn` must be a module-level function and its arguments and result picklable (tensors are fine). Each
rank is a `spawn`ed process with one CPU thread, a gloo process group on a free 127.0.0.1 port and
`Comm(dist.group.WORLD)`. A rank that raises fails the caller with that rank's traceback; a run that
takes longer than `timeout` seconds is killed and raises TimeoutError, so a hung collective can never
hang pytest. Results travel through files in a temporary directory, not through pipes, so a large
result cannot deadlock and a dead rank cannot leave the parent waiting.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

PG_TIMEOUT_S = 60.0  # bounds every collective inside a rank; `timeout` bounds the whole run
GRACE_S = 2.0  # after one rank fails, how long the others get to finish before they are killed
_ROOT = str(Path(__file__).resolve().parents[1])  # repository root: where `tests` is importable from


class RankError(RuntimeError):
    """A rank raised or died; the message holds its traceback (the first failing rank first)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # the parent never sees a half-written file


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, backend: str) -> None:
    import torch
    import torch.distributed as dist

    from cp_attn.comm import Comm

    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
        )
        result = fn(Comm(dist.group.WORLD), *args)
        _write(out / f"{rank}.pkl", pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException:
        _write(out / f"{rank}.err", traceback.format_exc().encode())
        failed = True
    else:
        failed = False
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    if failed:
        sys.exit(1)


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
        added_root = _ROOT not in sys.path
        os.environ.update(_spawn_env())
        if added_root:
            sys.path.insert(0, _ROOT)
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
                sys.path.remove(_ROOT)

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
    """`fn(comm, *args)` on `world_size` gloo ranks; returns [rank 0's result, rank 1's, ...].

    Raises RankError with the failing rank's traceback if any rank raises or dies, and TimeoutError
    (after killing every rank) if the run takes more than `timeout` seconds.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout, backend)
        except RankError as e:
            # The free port can be taken between finding it and rank 0 binding it: retry on a new one.
            port_taken = "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
            if attempt == 2 or not port_taken:
                raise
    raise AssertionError("unreachable")
