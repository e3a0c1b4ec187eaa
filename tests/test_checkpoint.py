"""HF checkpoints (`cp_attn.checkpoint`, `scripts/make_checkpoint.py`): FP8 block (de)quantisation,
single-file / sharded / FP8 round trips, partial loads, and load errors.

Reference: DESIGN.md section 2's FP8 rule `W[n, k] = W_fp8[n, k] * scale_inv[n // 128, k // 128]`
evaluated element by element in Python on a hand-built weight; e4m3's rounding bound for the
quantiser; the same seeded `RandomSource` weights written in another form (fp32 single file, bf16
twin of an FP8 checkpoint) for everything loaded from disk; `torch.tensor_split` for expert slices.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cp_attn.checkpoint as ckpt_mod
from cp_attn import reference_logits
from cp_attn.checkpoint import (
    INDEX_FILE,
    SCALE_SUFFIX,
    SINGLE_FILE,
    RandomSource,
    SafetensorsSource,
    build_model,
    checkpoint_shapes,
    dequantize_fp8_blocks,
    quantize_fp8_blocks,
    save_checkpoint,
)
from cp_attn.config import preset
from cp_attn.inputs import random_prompts

REPO = Path(__file__).resolve().parents[1]

# e4m3 round-to-nearest: at most half an ulp (2^-4 of the value) for normals, and 2^-10 of the
# block scale in the subnormal range (spacing 2^-9 below 2^-6).
E4M3_REL_ERR = 2.0**-4
E4M3_SUBNORMAL_ABS_ERR = 2.0**-10
# The quantiser divides by the scale in fp32 before rounding to e4m3 and multiplies back after:
# two extra fp32 roundings, far below e4m3's error but not zero.
FP32_REL_SLACK = 2.0**-22
# bf16 keeps 8 significant bits, so each dequantised FP8 weight of the twin moves by <= 2^-9
# relative. About a dozen FP8 matmuls sit on every path to a logit of the 2-layer model and their
# (random-signed) errors add up mostly incoherently; observed ~3 * 2^-9 of max |logit|. Measured
# against the largest |logit| of each sequence.
BF16_TWIN_REL_TOL = 8 * 2.0**-9
# FP8 checkpoint vs the fp32 weights it was quantised from: each weight moves by up to 2^-4
# relative (typically ~2^-6); through the same dozen matmuls this is observed at ~1.4 * 2^-4 of
# max |logit|. A loader that misapplies the block scales is off by O(1) or more.
E4M3_MODEL_REL_TOL = 4 * 2.0**-4

# 2 layers (dense, MoE) to keep files small; moe_intermediate_size 25 so expert shards are uneven.
CFG = preset("tiny", num_hidden_layers=2, moe_intermediate_size=25)
# The same model with selection and routing made continuous in the weights (every causal key, every
# expert chosen), so a tiny weight change cannot flip a discrete choice: used for the bf16 twin.
SMOOTH_CFG = CFG.replace(index_topk=64, num_experts_per_tok=CFG.n_routed_experts, topk_group=CFG.n_group)
LENS = [1, 9, 40]

# DESIGN.md: "Not FP8: embeddings, lm_head, norms, gate weight, correction bias, indexer weights_proj
# and k_norm" (norms, k_norm and the bias are 1-D).
NOT_FP8_2D = ("model.embed_tokens.weight", "lm_head.weight", ".mlp.gate.weight", ".indexer.weights_proj.weight")


def expect_fp8(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and not name.endswith(NOT_FP8_2D)


class Bf16Twin:
    """A WeightSource over another source, each tensor rounded to bf16 (scales dropped)."""

    def __init__(self, inner):
        self.inner, self.config = inner, inner.config

    def names(self) -> set[str]:
        return {n for n in self.inner.names() if not n.endswith(SCALE_SUFFIX)}

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(name).to(torch.bfloat16).float()


class Recording:
    """A WeightSource that records every tensor name asked for."""

    def __init__(self, inner):
        self.inner, self.config, self.asked = inner, inner.config, []

    def names(self) -> set[str]:
        return self.inner.names()

    def get(self, name: str) -> torch.Tensor:
        self.asked.append(name)
        return self.inner.get(name)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    src = RandomSource(CFG, seed=0)
    return {
        "fp32": save_checkpoint(root / "fp32", src, dtype="fp32"),
        "sharded": save_checkpoint(root / "sharded", src, dtype="fp32", max_shard_bytes=200_000),
        "fp8": save_checkpoint(root / "fp8", src, dtype="fp8"),
    }


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- FP8 block dequantisation -------------------------------------------------------------------

# Exactly representable in e4m3: zero, subnormals (2^-9, 3 * 2^-9), the smallest normal 2^-6, values
# with each mantissa pattern, and the largest, 448.
E4M3_POOL = [0.0, 2.0**-9, 3 * 2.0**-9, 2.0**-6, 1.0, 1.125, 1.5, 1.875, 3.25, 13.0, 240.0, 448.0]
E4M3_POOL = E4M3_POOL + [-v for v in E4M3_POOL[1:]]
# Non-power-of-two scales, one per 128x128 block of a 130x260 weight (2 x 3 blocks, last ones partial).
HAND_SCALES = [[0.3, 1.7, 3e-3], [5.5, 0.01, 123.4]]


def test_e4m3_pool_is_exact():
    pool = torch.tensor(E4M3_POOL)
    assert torch.equal(pool.to(torch.float8_e4m3fn).float(), pool)


def test_dequantize_hand_built_blocks():
    g = torch.Generator().manual_seed(0)
    N, K = 130, 260
    pick = torch.randint(0, len(E4M3_POOL), (N, K), generator=g)
    w_fp8 = torch.tensor(E4M3_POOL)[pick].to(torch.float8_e4m3fn)
    scales = torch.tensor(HAND_SCALES, dtype=torch.float32)
    got = dequantize_fp8_blocks(w_fp8, scales)
    assert got.dtype == torch.float32 and got.shape == (N, K)
    vals, s = w_fp8.float().tolist(), scales.tolist()
    # Python float64 product of an e4m3 value (4 significant bits) and an fp32 scale, rounded once
    # to fp32: exactly what a correctly rounded fp32 multiply gives.
    want = torch.tensor([[vals[n][k] * s[n // 128][k // 128] for k in range(K)] for n in range(N)], dtype=torch.float32)
    assert torch.equal(got, want)
    # Spot checks in each partial block's corner.
    for n, k in [(0, 0), (127, 127), (128, 0), (129, 259), (0, 256), (129, 128)]:
        assert got[n, k].item() == pytest.approx(vals[n][k] * s[n // 128][k // 128], rel=1e-7)


@pytest.mark.parametrize("shape", [(1, 3), (2, 2), (3, 3), (2, 4), (6,), (2, 3, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dequantize_rejects_wrong_scale_shape(shape):
    w = torch.zeros(130, 260).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scale_inv shape.*130x260.*\(2, 3\)"):
        dequantize_fp8_blocks(w, torch.ones(shape))


@pytest.mark.parametrize("N,K", [(130, 260), (128, 128), (1, 300), (257, 5)], ids=lambda v: str(v))
def test_quantize_fp8_blocks_round_trip(N, K):
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g)
    w[:, :64] *= 1e3                              # blocks at very different magnitudes
    w[-1, -1] = 1e-8
    if N > 128 and K > 128:
        w[128:, 128:256] = 0.0                     # an all-zero block
    q, scale = quantize_fp8_blocks(w)
    nb, kb = -(-N // 128), -(-K // 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (N, K)
    assert scale.dtype == torch.float32 and scale.shape == (nb, kb)
    back = dequantize_fp8_blocks(q, scale)
    s = scale.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    bound = (E4M3_REL_ERR + FP32_REL_SLACK) * w.abs() + E4M3_SUBNORMAL_ABS_ERR * s
    err = (back - w).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    assert err.max() > 0  # the bound is exercised, the weights really went through e4m3
    for i in range(nb):
        for j in range(kb):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            amax = blk.abs().max()
            if amax > 0:  # scale = amax / 448: the block's largest entry lands on e4m3's largest value
                assert scale[i, j].item() == pytest.approx(amax.item() / 448.0, rel=FP32_REL_SLACK * 4)
                assert q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float().abs().max() == 448.0
            else:
                assert (back[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] == 0).all()


# ---- whole checkpoints --------------------------------------------------------------------------


def test_fp8_checkpoint_layout(ckpts):
    path = ckpts["fp8"]
    hf = json.loads((path / "config.json").read_text())
    assert hf["quantization_config"]["weight_block_size"] == [128, 128]
    assert hf["quantization_config"]["fmt"] == "e4m3"
    with safe_open(path / SINGLE_FILE, framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    shapes = checkpoint_shapes(CFG)
    fp8 = {n for n, sh in shapes.items() if expect_fp8(n, sh)}
    assert set(stored) == set(shapes) | {n + SCALE_SUFFIX for n in fp8}
    assert any(".indexer.wq_b.weight" in n for n in fp8) and any(".experts.0.down_proj.weight" in n for n in fp8)
    for name, t in stored.items():
        if name.endswith(SCALE_SUFFIX):
            rows, cols = shapes[name[: -len(SCALE_SUFFIX)]]
            assert t.dtype == torch.float32 and t.shape == (-(-rows // 128), -(-cols // 128)), name
        elif name in fp8:
            assert t.dtype == torch.float8_e4m3fn, name
        elif name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32, name
        else:
            assert t.dtype == torch.bfloat16, name
    # Every FP8 tensor loads back within e4m3's rounding of the weight it was written from.
    loaded, rnd = SafetensorsSource(path), RandomSource(CFG, seed=0)
    for name in sorted(fp8):
        w, back = rnd.get(name), loaded.get(name)
        scale = w.abs().max() / 448  # >= every block's scale
        bound = (E4M3_REL_ERR + FP32_REL_SLACK) * w.abs() + E4M3_SUBNORMAL_ABS_ERR * scale
        assert ((back - w).abs() <= bound).all(), name


def test_fp8_checkpoint_matches_its_bf16_twin(tmp_path):
    src = RandomSource(SMOOTH_CFG, seed=3)
    fp8 = save_checkpoint(tmp_path / "fp8", src, dtype="fp8")
    twin = save_checkpoint(tmp_path / "twin", Bf16Twin(SafetensorsSource(fp8)), dtype="bf16")
    ids = random_prompts(LENS, SMOOTH_CFG.vocab_size, seed=3)
    a, b = reference_logits(fp8, ids), reference_logits(twin, ids)
    assert [x.shape for x in a] == [(L, SMOOTH_CFG.vocab_size) for L in LENS]
    for x, y in zip(a, b):
        assert torch.isfinite(x).all()
        assert (x - y).abs().max() <= BF16_TWIN_REL_TOL * x.abs().max()
    # Not trivially equal: the FP8 weights differ from the fp32 originals by e4m3 rounding, far more
    # than the bf16 twin differs from them.
    full = reference_logits(save_checkpoint(tmp_path / "fp32", src, dtype="fp32"), ids)
    for x, y in zip(a, full):
        assert (x - y).abs().max() <= E4M3_MODEL_REL_TOL * y.abs().max()
    assert max((x - y).abs().max() for x, y in zip(a, full)) > 4 * max((x - y).abs().max() for x, y in zip(a, b))


def test_sharded_checkpoint_loads_like_single_file(ckpts):
    sharded, single = ckpts["sharded"], ckpts["fp32"]
    index = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    files = sorted(sharded.glob("*.safetensors"))
    assert not (sharded / SINGLE_FILE).exists() and len(files) >= 3
    assert set(index.values()) == {f.name for f in files}
    a, b = SafetensorsSource(sharded), SafetensorsSource(single)
    assert a.names() == b.names() == set(index)
    for name in sorted(b.names()):
        assert torch.equal(a.get(name), b.get(name)), name
    ids = random_prompts(LENS, CFG.vocab_size, seed=1)
    for x, y in zip(reference_logits(sharded, ids), reference_logits(single, ids)):
        assert torch.equal(x, y)


EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def test_expert_subset_reads_only_its_experts(ckpts):
    rec = Recording(SafetensorsSource(ckpts["fp32"]))
    held = [2, 7]
    part = build_model(rec, expert_ids=held)
    read = {int(m.group(1)) for n in rec.asked if (m := EXPERT.search(n))}
    assert read == set(held)
    assert len(rec.asked) == len(set(rec.asked)), "each tensor read once"
    full = build_model(SafetensorsSource(ckpts["fp32"]))
    assert [int(e) for e in part.layers[1].mlp.experts] == held
    for e in held:
        for p, t in part.layers[1].mlp.experts[str(e)].state_dict().items():
            assert torch.equal(t, full.layers[1].mlp.experts[str(e)].state_dict()[p]), f"expert {e} {p}"
    # Non-expert weights all arrive too.
    wanted = {n for n in rec.names() if not (m := EXPERT.search(n)) or int(m.group(1)) in held}
    assert set(rec.asked) == wanted


@pytest.mark.parametrize("i,n", [(0, 2), (1, 2), (0, 3), (2, 3), (3, 4)], ids=lambda v: str(v))
def test_expert_shard_loads_the_right_slices(ckpts, i, n):
    src = SafetensorsSource(ckpts["fp32"])
    model = build_model(src, expert_shard=(i, n))
    moe = model.layers[1].mlp
    cols = torch.tensor_split(torch.arange(CFG.moe_intermediate_size), n)[i]   # this shard's slice
    prefix = "model.layers.1.mlp."
    for e in (0, 11):
        exp = moe.experts[str(e)]
        full = {p: src.get(f"{prefix}experts.{e}.{p}_proj.weight") for p in ("gate", "up", "down")}
        assert torch.equal(exp.gate_proj.weight, full["gate"][cols])
        assert torch.equal(exp.up_proj.weight, full["up"][cols])
        assert torch.equal(exp.down_proj.weight, full["down"][:, cols])
    shared_cols = torch.tensor_split(torch.arange(CFG.moe_intermediate_size * CFG.n_shared_experts), n)[i]
    shared_down = src.get(prefix + "shared_experts.down_proj.weight")
    assert torch.equal(moe.shared_experts.down_proj.weight, shared_down[:, shared_cols])
    # Non-MoE weights are whole.
    assert torch.equal(model.layers[0].mlp.gate_proj.weight, src.get("model.layers.0.mlp.gate_proj.weight"))


# ---- errors -------------------------------------------------------------------------------------


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})


def test_missing_tensor_is_named(ckpts, tmp_path):
    path = copy_ckpt(ckpts["fp32"], tmp_path / "ck")
    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    rewrite(path, lambda t: t.pop(gone))
    with pytest.raises(KeyError, match=re.escape(gone)):
        build_model(SafetensorsSource(path))
    with pytest.raises(KeyError, match=re.escape(gone)):
        reference_logits(path, [[1, 2, 3]])
    build_model(SafetensorsSource(path), expert_ids=[0, 1, 2])  # a rank without expert 3 does not care


def test_missing_fp8_scale_is_named(ckpts, tmp_path):
    path = copy_ckpt(ckpts["fp8"], tmp_path / "ck")
    gone = "model.layers.0.self_attn.o_proj.weight" + SCALE_SUFFIX
    rewrite(path, lambda t: t.pop(gone))
    with pytest.raises(KeyError, match=re.escape(gone)):
        build_model(SafetensorsSource(path))


def test_misshapen_tensor_is_named_with_shapes(ckpts, tmp_path):
    path = copy_ckpt(ckpts["fp32"], tmp_path / "ck")
    name = "model.layers.0.self_attn.o_proj.weight"
    rewrite(path, lambda t: t.update({name: t[name].t().contiguous()}))
    want = (CFG.hidden_size, CFG.num_attention_heads * CFG.v_head_dim)
    pattern = re.escape(name) + r".*" + re.escape(str(want[::-1])) + r".*" + re.escape(str(want))
    with pytest.raises(ValueError, match=pattern):
        build_model(SafetensorsSource(path))


def test_misshapen_expert_slice_is_named(ckpts, tmp_path):
    path = copy_ckpt(ckpts["fp32"], tmp_path / "ck")
    name = "model.layers.1.mlp.experts.4.gate_proj.weight"
    rewrite(path, lambda t: t.update({name: t[name][:10].contiguous()}))
    with pytest.raises(ValueError, match=re.escape(name) + r".*\(10, 64\)"):
        build_model(SafetensorsSource(path), expert_shard=(1, 2))


def test_unrunnable_config_names_the_field(ckpts, tmp_path):
    path = copy_ckpt(ckpts["fp32"], tmp_path / "ck")
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, "index_head_dim": 24}))
    with pytest.raises(ValueError, match="index_head_dim"):
        SafetensorsSource(path)
    with pytest.raises(ValueError, match="index_head_dim"):
        reference_logits(path, [[1, 2, 3]])


def test_missing_config_or_weights(ckpts, tmp_path):
    no_config = copy_ckpt(ckpts["fp32"], tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        SafetensorsSource(no_config)
    with pytest.raises(FileNotFoundError, match="config.json"):
        reference_logits(no_config, [[1]])
    only_bin = tmp_path / "b"
    only_bin.mkdir()
    shutil.copy(ckpts["fp32"] / "config.json", only_bin / "config.json")
    (only_bin / "pytorch_model.bin").write_bytes(b"not a pickle, never opened")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        SafetensorsSource(only_bin)


def test_missing_directory_is_reported_as_missing(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*/nowhere does not exist"):
        SafetensorsSource(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        SafetensorsSource(ckpts["fp32"] / "config.json")


# ---- writing ------------------------------------------------------------------------------------


class FailsAfter:
    """A weight source that raises on its n-th tensor, like a run killed mid-write."""

    def __init__(self, inner, n: int):
        self.inner, self.config, self.left = inner, inner.config, n

    def names(self) -> set[str]:
        return self.inner.names()

    def get(self, name: str) -> torch.Tensor:
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("disk full")
        return self.inner.get(name)


@pytest.mark.parametrize("max_shard_bytes", [2**30, 200_000], ids=["single_file", "sharded"])
def test_failed_write_leaves_nothing_behind(tmp_path, max_shard_bytes):
    src = RandomSource(CFG, seed=0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "ck", FailsAfter(src, len(src.names()) - 1), max_shard_bytes=max_shard_bytes)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary directory


def test_writer_refuses_a_non_empty_target_and_fills_an_empty_one(ckpts, tmp_path):
    before = sorted(p.name for p in ckpts["fp32"].iterdir())
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint(ckpts["fp32"], RandomSource(CFG, seed=1))
    assert sorted(p.name for p in ckpts["fp32"].iterdir()) == before
    (tmp_path / "empty").mkdir()
    out = save_checkpoint(tmp_path / "empty", RandomSource(CFG, seed=0), dtype="fp32")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SINGLE_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_bad_token_id_fails_before_reading_weights(ckpts, monkeypatch):
    def no_reads(self, name):
        raise AssertionError(f"read {name} before validating the input")

    monkeypatch.setattr(SafetensorsSource, "get", no_reads)
    with pytest.raises(ValueError, match=r"token id 512\b"):
        reference_logits(ckpts["fp32"], [[1, 2], [3, 512]])
    with pytest.raises(ValueError, match="empty"):
        reference_logits(ckpts["fp32"], [[1, 2], []])


# ---- safetensors only ---------------------------------------------------------------------------


def test_no_pickle_paths_in_checkpoint_module():
    src = inspect.getsource(ckpt_mod)
    for pattern in (r"torch\.load\b", r"\bpickle\b", r"\.bin\b", r"weights_only"):
        assert not re.search(pattern, src), pattern


def test_loading_never_unpickles(ckpts, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("weights must not be unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    out = reference_logits(ckpts["fp8"], [[1, 2, 3]])
    assert torch.isfinite(out[0]).all()


# ---- scripts/make_checkpoint.py -----------------------------------------------------------------


def load_script():
    spec = importlib.util.spec_from_file_location("make_checkpoint", REPO / "scripts" / "make_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_checkpoint_script_fp8(tmp_path, capsys):
    out = tmp_path / "tiny-fp8"
    load_script().main(["--preset", "tiny", "--dtype", "fp8", "--set", "num_hidden_layers=2", "--out", str(out)])
    assert "tiny" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SINGLE_FILE]
    hf = json.loads((out / "config.json").read_text())
    assert hf["num_hidden_layers"] == 2 and hf["hidden_size"] == preset("tiny").hidden_size
    assert hf["quantization_config"]["weight_block_size"] == [128, 128]
    assert hf["architectures"] == ["DeepseekV32ForCausalLM"]
    src = SafetensorsSource(out)
    cfg = preset("tiny", num_hidden_layers=2)
    assert src.config == cfg
    assert not any(n.startswith("model.layers.2.") for n in src.names())
    # Same seed (0) as RandomSource: the FP8 weights are the e4m3 rounding of those weights.
    rnd = RandomSource(cfg, seed=0)
    name = "model.layers.1.self_attn.q_b_proj.weight"
    w, back = rnd.get(name), src.get(name)
    assert (back - w).abs().max() <= (E4M3_REL_ERR * w.abs() + E4M3_SUBNORMAL_ABS_ERR * w.abs().max() / 448).max()
    assert torch.equal(src.get("model.embed_tokens.weight"), rnd.get("model.embed_tokens.weight").bfloat16().float())
    assert torch.isfinite(reference_logits(out, [[5, 6, 7]])[0]).all()


def test_make_checkpoint_script_rejects_bad_set(tmp_path):
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        load_script().main(["--set", "num_hidden_layers", "--out", str(tmp_path / "x")])
