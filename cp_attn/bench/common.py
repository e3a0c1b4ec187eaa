"""Machine facts, measured ceilings and timing shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from cp_attn.atomic import write_text


def git_commit() -> str:
    """CP_ATTN_COMMIT when set (a copied work tree's .git may be older than its files), else git's HEAD."""
    if os.environ.get("CP_ATTN_COMMIT"):
        return os.environ["CP_ATTN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    """GPU name and count (or CPU), library versions, commit, time."""
    info = {"torch": torch.__version__, "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{what} times GPU kernels and needs a CUDA device; none is visible here")


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() (triton.testing.do_bench: CUDA events, L2 flushed between calls)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def matmul_peak_tflops(dtype: str = "bf16", size: int = 8192) -> float:
    """Measured dense matmul rate of this GPU now (random data, size^3), the ceiling records quote."""
    a = torch.randn(size, size, device="cuda")
    b = torch.randn(size, size, device="cuda")
    if dtype == "bf16":
        a, b = a.bfloat16(), b.bfloat16()
        fn = lambda: a @ b  # noqa: E731
    elif dtype == "fp8":
        a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        fn = lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        raise ValueError(f"unknown dtype {dtype!r}")
    ms = bench_ms(fn)
    return 2 * size**3 / ms / 1e9


def write_records(path: str | os.PathLike, records: list[dict]) -> None:
    """JSON array, written to a temporary name and renamed (a failed run leaves nothing half-written)."""
    write_text(path, json.dumps(records, indent=1) + "\n")


def print_table(records: list[dict], cols: tuple[str, ...]) -> None:
    print(" | ".join(f"{c:>10}" for c in cols))
    for r in records:
        print(" | ".join(f"{_fmt(r.get(c)):>10}" for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
