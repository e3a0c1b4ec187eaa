"""Which torch ops (not kernels) take the GPU time of one kernels=triton forward of v32_slim.

    python scripts/profile_ops.py 16384        # GPU only; prints the top ops by self device time
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from cp_attn.bench.common import require_cuda
from cp_attn.bench.prefill import make_model
from cp_attn.comm import Comm
from cp_attn.inputs import random_prompts
from cp_attn.ops.kernels import get_kernels
from cp_attn.parallel import cp_prefill


def main() -> None:
    require_cuda("profile_ops.py")
    length = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    model = make_model("v32_slim")
    ids = random_prompts([length], model.cfg.vocab_size, seed=1)
    run = lambda: cp_prefill(model, Comm.single(), ids, "in_seq", "fused", kernels=get_kernels("triton"))  # noqa: E731
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=40))


if __name__ == "__main__":
    main()
