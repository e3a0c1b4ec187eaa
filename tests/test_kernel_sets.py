"""Whole forwards with every stage on the Triton kernels (under TRITON_INTERPRET=1 on CPU, see
tests/conftest.py) against the plain-torch kernel set, and the kernel registry's refusals.
References: the torch stage ops, themselves pinned by the dense-mask oracle and transformers."""

from __future__ import annotations

import pytest
import torch

from cp_attn.checkpoint import RandomSource, build_model
from cp_attn.config import preset
from cp_attn.inputs import random_prompts
from cp_attn.ops.kernels import check_kernels_device, get_kernels
from cp_attn.reference import run_single

pytest.importorskip("triton")

# fp32 on both sides (IEEE dots in the kernels): only summation order differs, ~1e-6 on logits of
# magnitude ~4 after 3 layers; a wrong key, head or row moves them by >= 1e-2.
FP32_ATOL = 2e-5


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    return build_model(RandomSource(cfg, seed=0)), random_prompts([37, 16, 5, 1], cfg.vocab_size, 0)


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_triton_set_matches_torch_set(tiny, kv_dtype):
    model, ids = tiny
    topk = {}
    for name in ("torch", "triton"):
        rec: dict = {}
        kern = get_kernels(name)
        logits = run_single(model, ids, kernels=kern, kv_dtype=kv_dtype,
                            on_topk=lambda layer, idx, rec=rec: rec.__setitem__(layer, idx))
        topk[name] = (torch.cat(logits), rec)
    assert dict(get_kernels("triton").choice) == {"indexer_logits": "triton", "topk_indices": "triton", "sparse_mla": "triton"}
    torch.testing.assert_close(topk["triton"][0], topk["torch"][0], atol=FP32_ATOL, rtol=0)
    for layer, idx in topk["torch"][1].items():
        assert torch.equal(topk["triton"][1][layer], idx), layer


def test_stage_override_and_refusals():
    k = get_kernels("triton", {"sparse_mla": "torch"})
    assert dict(k.choice)["sparse_mla"] == "torch" and dict(k.choice)["indexer_logits"] == "triton"
    with pytest.raises(ValueError, match="unknown kernel set"):
        get_kernels("cuda")
    with pytest.raises(ValueError, match="unknown kernel stage"):
        get_kernels("torch", {"attention": "triton"})
    with pytest.raises(ValueError, match="unknown sparse_mla implementation"):
        get_kernels("torch", {"sparse_mla": "cutlass"})
    from cp_attn.ops import flashmla

    try:
        flashmla.load()
    except ImportError:  # where FlashMLA is missing, choosing it fails at selection, not at the first call
        with pytest.raises(ValueError, match="not available here"):
            get_kernels("torch", {"sparse_mla": "flashmla"})


def test_gpu_kernels_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need a CUDA device"):
        check_kernels_device(get_kernels("triton"), torch.device("cpu"))
    check_kernels_device(get_kernels("torch"), torch.device("cpu"))
