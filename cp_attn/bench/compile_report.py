"""Compile a Triton kernel for Hopper (sm_90a) without a GPU and report what decides its speed:
registers, spills and shared memory (from ptxas -v), the tensor-core instructions, and whether the
loads in its loops became asynchronous copies. Triton ships ptxas, so this runs on any machine.

    python -m cp_attn.bench.compile_report sparse_mla BLOCK_N=32 num_warps=8 num_stages=3
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, aligned=None):
    """`aligned`: names of the arguments the JIT would see 16-divisible (pointers from torch, strides
    that are multiples of 16); default all pointers and every int whose name starts with 'stride'."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):  # under TRITON_INTERPRET=1 the decorator made an interpreter wrapper
        fn = JITFunction(fn.fn)
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    if aligned is None:
        aligned = [k for k, v in signature.items() if v.startswith("*") or k.startswith("stride")]
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def report(kernel) -> dict:
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    ttgir = kernel.asm["ttgir"]
    return {
        "shared_bytes": kernel.metadata.shared,
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(spill.group(1)) if spill else None,
        "wgmma": dict(Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", kernel.asm["ptx"]))),
        "mma_layouts": re.findall(r"#mma\d* = .*?warpsPerCTA = (\[[\d, ]+\]), instrShape = (\[[\d, ]+\])", ttgir),
        "async_copies": len(re.findall(r"async_copy_global_to_local", ttgir)),
        "sync_loads_to_smem": len(re.findall(r"ttg\.local_alloc %\w+ : \(tensor", ttgir)),
    }


SPARSE_MLA_SIG = {"Q": "*bf16", "KV": "*bf16", "IDX": "*i32", "OUT": "*bf16", "LSE": "*fp32", "T": "i32", "H": "i32",
                  "K_TOPK": "i32", "stride_qn": "i32", "stride_qh": "i32", "stride_kvt": "i32", "stride_in": "i32",
                  "stride_on": "i32", "stride_oh": "i32", "stride_ln": "i32", "sm_scale_log2": "fp32"}


def sparse_mla(**cfg) -> dict:
    from cp_attn.ops import sparse_mla_triton as smt

    cfg = dict(smt.launch_config(128, 512, 64), **cfg)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    consts = dict(D_V=512, D_TAIL=64, BLOCK_DV=512, BLOCK_TAIL=64, BLOCK_SCAN=1024, IEEE=False)
    consts.update(cfg)
    return report(compile_sm90(smt._sparse_mla_fwd, SPARSE_MLA_SIG, consts, warps, stages))


if __name__ == "__main__":
    what, *kv = sys.argv[1:]
    print({"sparse_mla": sparse_mla}[what](**{k: int(v) for k, v in (a.split("=") for a in kv)}))
