"""Suite-wide setup. Without a GPU, Triton kernels run under Triton's CPU interpreter: the variable
must be set before any kernel module is imported (triton.jit reads it at decoration time)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
