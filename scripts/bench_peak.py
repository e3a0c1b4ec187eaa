"""Measure the GPU's ceilings once per run: bf16 and fp8 matmul TFLOP/s and device-to-device copy
GB/s (bytes read + written). Prefill TFLOP/s and gather GB/s are reported against these."""

from __future__ import annotations

import json

import torch
from triton.testing import do_bench


def main() -> None:
    dev = torch.device("cuda")
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    out = {"device": torch.cuda.get_device_name(), "bf16_matmul_tflops": round(2 * n**3 / ms / 1e9, 1)}
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=dev)
        ms8 = do_bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), warmup=50, rep=300,
                       return_mode="median")
        out["fp8_matmul_tflops"] = round(2 * n**3 / ms8 / 1e9, 1)
    except Exception as e:  # older torch / no fp8 support
        out["fp8_matmul_tflops"] = f"n/a ({type(e).__name__})"
    x = torch.empty(2**30, device=dev, dtype=torch.uint8)
    y = torch.empty_like(x)
    ms_copy = do_bench(lambda: y.copy_(x), warmup=20, rep=200, return_mode="median")
    out["copy_gbs"] = round(2 * x.numel() / ms_copy / 1e6, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
