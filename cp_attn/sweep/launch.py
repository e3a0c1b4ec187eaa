"""Start one torchrun job of N ranks, bounded in time, and say how it ended.

The job runs in a child process (`python -m cp_attn.sweep.launch`) that calls
`torch.distributed.run`'s own Python API: its argument parser and `config_from_args` build the
`LaunchConfig`, and `elastic_launch` runs the elastic agent and the N workers. Keeping the agent in
a child of its own lets the parent enforce a wall-clock limit: on timeout it kills the agent and
every process the agent started (torchrun starts each worker in a session of its own, so a process
group kill would miss them). The child's stdout and stderr, workers' included, go to a log file.

How a job ended (`LaunchResult.reason`), most telling first: a timeout; a rank killed by a signal
(the cause; the others then fail in their collectives); the last exception line in the log (the
ranks' own error, e.g. `ValueError: ...`, marked `OOM:` when it is an out-of-memory); the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import psutil

from cp_attn.atomic import write_text

POLL_S = 0.1
"""How often the parent looks at the job's process tree (every process it ever saw is killed at the end)."""

_EXC_LINE = re.compile(r"^((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit))(?::\s*(.*))?$")
_OOM = re.compile(r"out of memory|OutOfMemoryError", re.IGNORECASE)


@dataclass
class RankFailure:
    rank: int
    exitcode: int
    signal: str | None = None
    """The signal's name ('SIGKILL') when the rank was killed by one."""
    message: str | None = None
    """The rank's own one-line reason from torchrun's error file (cp_attn.cli), when it wrote one."""


@dataclass
class LaunchResult:
    returncode: int | None
    """The child's exit status (None if it was killed on timeout)."""
    timed_out: bool
    seconds: float
    """Wall time from start to the end of the last process of the job."""
    failures: list[RankFailure] = field(default_factory=list)
    """Ranks that failed, as torchrun's agent saw them."""
    reason: str | None = None
    """None when the job succeeded; else why it did not (see the module docstring)."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def torchrun_args(nproc: int, script: str | Path, script_args: Sequence[str]) -> list[str]:
    """Arguments of `torch.distributed.run` for one job of `nproc` local ranks: what `--standalone`
    sets up (a c10d rendezvous on a free local port, a fresh id; torchrun applies that flag only in
    its command-line entry point), and no restarts: a failure is a result, not something to retry."""
    return ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "localhost:0", "--rdzv-id", uuid.uuid4().hex, "--max-restarts", "0",
            "--monitor-interval", "0.1", str(script), *map(str, script_args)]


def run_torchrun(
    nproc: int,
    script: str | Path,
    script_args: Sequence[str],
    *,
    timeout_s: float,
    log_path: str | Path,
    cwd: str | Path | None = None,
) -> LaunchResult:
    """Run `torchrun --nproc-per-node nproc script *script_args` in a child process and wait at most
    `timeout_s`; afterwards no process of the job is left, whatever happened."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    failures_path = log_path.with_name(log_path.stem + ".failures.json")
    failures_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "cp_attn.sweep.launch", str(failures_path), *torchrun_args(nproc, script, script_args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=cwd, env=env, start_new_session=True)
        seen: dict[int, psutil.Process] = {}
        try:
            _watch(child, t0 + timeout_s, seen)
        finally:  # also on Ctrl-C in the parent: the job is in a session of its own and would live on
            timed_out = child.poll() is None
            _kill_all([psutil.Process(child.pid)] if timed_out else [], seen)
            child.wait()
        returncode = None if timed_out else child.returncode
    seconds = time.monotonic() - t0
    failures = _read_failures(failures_path)
    result = LaunchResult(returncode, timed_out, seconds, failures)
    if not result.ok:
        result.reason = failure_reason(result, timeout_s, log_path.read_text(errors="replace"))
    return result


def _watch(child: subprocess.Popen, deadline: float, seen: dict[int, psutil.Process]) -> None:
    """Wait for the child until `deadline`, adding every descendant it starts to `seen` (workers that
    outlive a crashed agent are re-parented and could not be found from the child afterwards)."""
    root = psutil.Process(child.pid)
    while child.poll() is None and time.monotonic() < deadline:
        try:
            for p in root.children(recursive=True):
                seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        try:
            child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass


def _kill_all(roots: list[psutil.Process], seen: dict[int, psutil.Process]) -> None:
    """SIGKILL the roots, their descendants and every process seen before, then reap them.
    psutil.Process remembers each one's start time, so a reused pid is never hit."""
    procs = list(seen.values())
    for root in roots:
        try:
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    alive = []
    for p in procs:
        try:
            if p.is_running():
                p.send_signal(signal.SIGKILL)
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _read_failures(path: Path) -> list[RankFailure]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [RankFailure(**f) for f in data.get("failures", [])]


def last_exception(log: str) -> str | None:
    """The last `SomeError: message` line of a log (tracebacks end on it), or None."""
    for line in reversed(log.splitlines()):
        m = _EXC_LINE.match(line.strip())
        if m and m.group(1).rsplit(".", 1)[-1] not in ("ChildFailedError", "SystemExit"):
            name, msg = m.group(1), (m.group(2) or "").strip()
            return f"{name}: {msg}" if msg else name
    return None


def failure_reason(result: LaunchResult, timeout_s: float, log: str) -> str:
    """One line saying why a job did not succeed (see the module docstring for the order)."""
    if result.timed_out:
        return f"timeout: no result after {timeout_s:g} s"
    killed = [f for f in result.failures if f.signal and f.signal != "SIGTERM"]  # SIGTERM: the agent's own
    if killed:
        return "; ".join(f"rank {f.rank} killed by {f.signal}" for f in killed)
    told = next((f.message for f in result.failures if f.message), None)  # a refused request's line
    exc = told or last_exception(log)
    if exc:
        return f"OOM: {exc}" if _OOM.search(exc) else exc
    if result.failures:
        f = result.failures[0]
        return f"rank {f.rank} exited with code {f.exitcode}"
    return f"exited with code {result.returncode}"


def _error_file_message(failure) -> str | None:
    """The one-line reason a rank wrote into torchrun's error file (cp_attn.cli.report_reason), or
    None when it left none (a crash, a signal) or a traceback (then the log holds the exception)."""
    msg = failure.message  # torchrun's parse of the error file: a str, or {"message", "extraInfo"}
    if isinstance(msg, dict):
        if msg.get("extraInfo", {}).get("py_callstack"):  # a traceback: the log holds the exception
            return None
        msg = msg.get("message")
    if not isinstance(msg, str) or not msg or "\n" in msg or msg.startswith(("To enable traceback", "Signal ")):
        return None
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    """Child side: `python -m cp_attn.sweep.launch FAILURES.json TORCHRUN_ARGS...`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("failures", help="where to write the failed ranks as JSON")
    ap.add_argument("torchrun", nargs=argparse.REMAINDER, help="arguments of torch.distributed.run")
    args = ap.parse_args(argv)
    config, cmd, cmd_args = config_from_args(get_args_parser().parse_args(args.torchrun))
    try:
        elastic_launch(config, cmd)(*cmd_args)
    except ChildFailedError as e:
        failures = [
            {"rank": rank, "exitcode": f.exitcode, "signal": f.signal_name() if f.exitcode < 0 else None,
             "message": _error_file_message(f)}
            for rank, f in sorted(e.failures.items())
        ]
        write_text(args.failures, json.dumps({"failures": failures}))
        print(f"torchrun job failed: {failures}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
