"""The torchrun prefill job: Hydra config <-> dataclasses, input checks on every rank before any
collective, and the README's main command end to end (real torchrun, gloo, 2 ranks)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from cp_attn import cli
from cp_attn.comm import Comm
from cp_attn.job import run_job, save_atomic
from cp_attn.runconfig import CPSpec, InputSpec, ModelSpec, MoESpec, OutputSpec, PrefillConfig, from_omegaconf
from tests.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# The job's own check: CP vs single process, fp32 on CPU (see test_cp_prefill.CP_ATOL).
CP_ATOL = 2e-5

GROUPS = {"model": ModelSpec, "cp": CPSpec, "moe": MoESpec}


def _compose(overrides: list[str]) -> PrefillConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return from_omegaconf(compose("config", overrides=overrides))


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_defaults_compose_to_dataclass_defaults():
    assert _compose([]) == PrefillConfig()


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_group_yaml_mirrors_its_dataclass(group):
    for path in sorted((CONF / group).glob("*.yaml")):
        keys = set(yaml.safe_load(path.read_text()))
        assert keys == _fields(GROUPS[group]), f"{path.name}: {keys ^ _fields(GROUPS[group])}"


def test_top_level_yaml_mirrors_dataclass():
    keys = set(yaml.safe_load((CONF / "config.yaml").read_text())) - {"defaults", "hydra"}
    assert keys | set(GROUPS) == _fields(PrefillConfig)
    for name, cls in (("input", InputSpec), ("output", OutputSpec)):
        assert set(yaml.safe_load((CONF / "config.yaml").read_text())[name]) == _fields(cls)


def test_overrides_reach_the_dataclasses():
    cfg = _compose(["cp=round_robin", "moe=deepep", "input.lengths=[3,2]", "check=true", "model=v32_slim",
                    "++model.overrides.num_hidden_layers=2"])
    assert (cfg.cp.mode, cfg.moe.backend, cfg.input.lengths, cfg.check) == ("round_robin", "deepep", [3, 2], True)
    assert cfg.model.preset == "v32_slim" and cfg.model.overrides == {"num_hidden_layers": 2}


@pytest.mark.parametrize("override", ["model.dtpye=bf16", "check=maybe", "input.lengths=7"])
def test_unknown_or_mistyped_keys_fail(override):
    with pytest.raises(Exception, match=override.split("=")[0].split(".")[-1]):
        _compose([override])


# ---- bad input: every rank refuses before the first collective ---------------------------------------


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, text the error must contain). Run on 3 ranks."""
    (tmp / "oov.json").write_text(json.dumps({"input_ids": [[1, 2, 3], [4, 999999]]}))
    (tmp / "broken.json").write_text('{"input_ids": [[1, 2')
    (tmp / "nokey.json").write_text(json.dumps({"tokens": [[1, 2]]}))
    (tmp / "empty_seq.json").write_text(json.dumps({"input_ids": [[1, 2], []]}))
    return {
        "world_size": (["cp.size=2"], "cp.size=2"),
        "mode": (["cp.mode=ring"], "'ring'"),
        "backend": (["moe.backend=alltoall"], "'alltoall'"),
        "deepep_experts": (["moe=deepep", "++model.overrides.n_routed_experts=8", "++model.overrides.n_group=4"],
                           "n_routed_experts (8)"),
        "token_id": ([f"input.file={tmp / 'oov.json'}"], "token id 999999"),
        "too_long": (["input.lengths=[5,600]"], "600 tokens"),
        "model_override": (["++model.overrides.num_layers=2"], "['num_layers']"),
        "broken_json": ([f"input.file={tmp / 'broken.json'}"], "not valid JSON"),
        "no_input_ids": ([f"input.file={tmp / 'nokey.json'}"], "input_ids"),
        "empty_sequence": ([f"input.file={tmp / 'empty_seq.json'}"], "input_ids[1] is empty"),
        "kernels": (["kernels=cutlass"], "'cutlass'"),
        "moe_impl": (["moe.impl=fast"], "'fast'"),
        "empty_lengths": (["input.lengths=[]"], "empty"),
        "repeat": (["repeat=0"], "repeat=0"),
        "output_tokens": (["output.tokens=first"], "'first'"),
    }


def _bad_input_worker(comm: Comm, cases: dict[str, PrefillConfig]) -> dict[str, str]:
    torch.set_num_threads(1)
    errors = {}
    for name, cfg in cases.items():
        try:
            run_job(cfg, comm)
        except ValueError as e:
            errors[name] = str(e)
        else:
            errors[name] = "<no error>"
    comm.barrier()  # every rank got here: no rank is stuck in a collective
    return errors


def test_bad_input_fails_on_every_rank_before_any_collective(tmp_path):
    cases = _bad_cases(tmp_path)
    cfgs = {name: _compose(overrides) for name, (overrides, _) in cases.items()}
    results = run_ranks(_bad_input_worker, 3, cfgs, timeout=120)
    for rank, errors in enumerate(results):
        for name, (_, needle) in cases.items():
            assert needle in errors[name], f"rank {rank}, case {name}: {errors[name]!r} lacks {needle!r}"


# ---- timing repeats, per-rank lines, the report file, last-token logits --------------------------------


def _jobs_worker(comm: Comm, cfgs: list[PrefillConfig]) -> list[dict]:
    torch.set_num_threads(1)
    return [run_job(cfg, comm) for cfg in cfgs]


@pytest.mark.multiproc
def test_repeats_per_rank_report_file_and_last_token_logits(tmp_path):
    full, last, report = tmp_path / "full.pt", tmp_path / "last.pt", tmp_path / "sub" / "report.json"
    cfgs = [
        _compose(["repeat=3", "warmup=1", f"report={report}", "cp=round_robin"]),
        _compose([f"output.logits={full}", "cp=round_robin"]),
        _compose([f"output.logits={last}", "output.tokens=last", "check=true", "cp=round_robin"]),
        # the check's reference runs with the job's own KV dtype (a reference in fp32 KV would differ by FP8 rounding)
        _compose(["output.tokens=last", "check=true", "kv_dtype=fp8"]),
    ]
    rank0, rank1 = run_ranks(_jobs_worker, 2, cfgs, timeout=120)
    timed = rank0[0]
    assert len(timed["times_s"]) == 3 and timed["seconds"] == sorted(timed["times_s"])[1]
    # every real token is computed by exactly one rank; round_robin gives rank r the tokens t % 2 == r
    lens = InputSpec().lengths
    assert [r["rank"] for r in timed["per_rank"]] == [0, 1]
    assert [r["rows"] for r in timed["per_rank"]] == [(sum(lens) + 1) // 2, sum(lens) // 2]
    assert all(r["seconds"] > 0 for r in timed["per_rank"])
    assert rank1[0]["per_rank"] == timed["per_rank"]  # every rank holds the gathered lines
    assert json.loads(report.read_text()) == timed    # rank 0 wrote its report, whole
    assert not list(report.parent.glob(".*tmp"))

    every, ends = torch.load(full)["logits"], torch.load(last)["logits"]
    assert [tuple(x.shape) for x in ends] == [(1, 512)] * len(lens)
    for b, (x, y) in enumerate(zip(every, ends)):
        torch.testing.assert_close(y[0], x[-1], rtol=0, atol=0, msg=f"sequence {b}")
    assert rank0[2]["max_abs_diff"] < CP_ATOL and rank0[2]["argmax_match"] == 1.0
    assert rank0[3]["kv_dtype"] == "fp8" and rank0[3]["max_abs_diff"] < CP_ATOL


@pytest.mark.multiproc
def test_multirun_under_torchrun_is_refused_at_once(tmp_path):
    proc = _torchrun(["cp=in_seq,round_robin", "check=true", f"hydra.sweep.dir={tmp_path / 'mr'}"], tmp_path, ("-m",))
    assert proc.returncode != 0
    assert "scripts/sweep.py" in proc.stdout + proc.stderr
    assert not (tmp_path / "mr" / "1").exists()  # the first job refused; no second one started


def test_logits_writer_leaves_the_old_file_or_the_new_one_never_a_part(tmp_path):
    path = tmp_path / "logits.pt"
    save_atomic({"logits": [torch.ones(2, 3)]}, path)
    with pytest.raises(Exception, match="lambda"):  # torch.save fails part-way: a lambda cannot be pickled
        save_atomic({"logits": [torch.zeros(2, 3)], "bad": lambda: 0}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["logits.pt"]  # no temporary file left
    assert torch.equal(torch.load(path)["logits"][0], torch.ones(2, 3))


# ---- the README's main command ----------------------------------------------------------------------


def _torchrun(args: list[str], tmp: Path, hydra_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "scripts/prefill.py",
           *hydra_flags, f"hydra.run.dir={tmp / 'run'}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.multiproc
def test_readme_main_job_runs_and_matches_single_process(tmp_path):
    out = tmp_path / "logits.pt"
    proc = _torchrun(["check=true", f"output.logits={out}", "cp=round_robin"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, proc.stdout  # rank 0 alone prints
    r = reports[0]
    assert (r["cp_size"], r["mode"], r["moe_backend"], r["tokens"]) == (2, "round_robin", "fused", sum(InputSpec().lengths))
    assert r["seconds"] > 0 and r["max_abs_diff"] is not None and r["max_abs_diff"] < CP_ATOL
    logits = torch.load(out)["logits"]
    assert [tuple(x.shape) for x in logits] == [(n, 512) for n in InputSpec().lengths]
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in logits)
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


# ---- errors end on their reason ---------------------------------------------------------------------

# override -> the one line that must end torchrun's output. Three kinds: a check in run_job, an input
# check, and a Hydra config-group typo (raised before the task function runs).
REFUSED = {
    "moe_backend": ("moe.backend=nope", "ValueError: unknown MoE backend 'nope'"),
    "too_long": ("input.lengths=[4096]",
                 "ValueError: input_ids[0] has 4096 tokens, more than max_position_embeddings=512"),
    "config_group": ("moe=nope", "no config 'moe/nope'; the options in 'moe' are deepep, fused"),
}
LAST_LINES = 3  # torchrun's report closes with "  traceback : <reason>" and a "====" rule


@pytest.mark.multiproc
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_request_ends_torchrun_output_on_its_reason(case, tmp_path):
    override, reason = REFUSED[case]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "scripts/prefill.py",
           f"hydra.run.dir={tmp_path / 'run'}", override]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode != 0
    tail = proc.stdout.rstrip().splitlines()[-LAST_LINES:]
    assert any(reason in line for line in tail), "\n".join(tail)
    # No rank prints a traceback; the one torchrun itself prints for ChildFailedError has no frame of ours.
    assert proc.stdout.count("Traceback (most recent call last)") <= 1, proc.stdout
    assert not re.search(r'File ".*(cp_attn|scripts)/', proc.stdout), proc.stdout


def _error_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    monkeypatch.setattr(cli, "_traceback_wanted", False)
    return path


def test_refused_request_writes_one_line_for_torchrun_and_exits_1(tmp_path, monkeypatch, capsys):
    path = _error_file(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as exit_info, cli.reasons_last():
        run_job(_compose(["cp.mode=ring"]), Comm.single())
    assert exit_info.value.code == 1
    message = json.loads(path.read_text())["message"]
    assert message["message"] == "ValueError: unknown CP split mode 'ring'; expected one of " \
        "['in_seq', 'interleave', 'round_robin', 'zigzag']"
    assert "py_callstack" not in message["extraInfo"]  # torchrun then quotes the message, not a traceback
    assert capsys.readouterr().err == ""


def test_refused_request_without_torchrun_prints_one_line(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setattr(cli, "_traceback_wanted", False)
    with pytest.raises(SystemExit), cli.reasons_last():
        _compose(["check=maybe"])
    assert capsys.readouterr().err == "ValidationError: check: Value 'maybe' is not a valid bool (type str)\n"


def test_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch):
    path = _error_file(tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match="a bug"), cli.reasons_last():
        raise RuntimeError("a bug")
    callstack = json.loads(path.read_text())["message"]["extraInfo"]["py_callstack"]
    assert callstack.startswith("Traceback") and "RuntimeError: a bug" in callstack


def test_model_v32_needs_a_checkpoint():
    assert _compose(["model=v32", "model.checkpoint=/ckpt/v32"]).model.preset == "v32"
    with pytest.raises(ValueError, match=r"model\.checkpoint must be set"):
        _compose(["model=v32"])  # random weights at the full size would be about 1.3 TB


@pytest.mark.multiproc
def test_triton_kernels_with_fp8_kv_under_cp_check_against_one_process():
    """kernels=triton kv_dtype=fp8 check=true on 2 gloo ranks (Triton interpreted on CPU): the job's own
    check, CP against the single-process run with the same kernels and KV, holds to CP_ATOL."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    cfg = _compose(["kernels=triton", "kv_dtype=fp8", "check=true", "cp=round_robin", "moe=deepep",
                    "input.lengths=[23,9,2]"])
    rank0, _ = run_ranks(_jobs_worker, 2, [cfg], timeout=240)
    report = rank0[0]
    assert report["kernel_stages"] == {"indexer_logits": "triton", "topk_indices": "triton", "sparse_mla": "triton"}
    assert report["kv_dtype"] == "fp8" and report["max_abs_diff"] < CP_ATOL and report["argmax_match"] == 1.0
