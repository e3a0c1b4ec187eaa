"""scripts/sweep.py end to end on CPU (gloo), as the README runs it, and its configuration.

One sweep of four tiny jobs, each a case from a config group given with Hydra's --config-dir:
a job that runs (cp 2), one that fails on bad input (an unknown split mode), one that hangs past
its per-job timeout, and one whose rank 1 this test SIGKILLs from outside mid-forward. The
references: the job's own report for the one that runs, and for the others what was done to them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict

from cp_attn.layout import plan_split
from cp_attn.runconfig import PrefillConfig
from cp_attn.sweep.job import SWEEP_FIELDS, SweepConfig, job_config_yaml, split_config
from cp_attn.sweep.launch import LaunchResult, RankFailure, failure_reason, last_exception
from cp_attn.sweep.progress import SweepProgress, count_jobs
from cp_attn.sweep.records import Record, load_records

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SLOW_TIMEOUT_S = 8.0
"""The hanging job's limit: past start-up (imports, rendezvous), so the kill meets live workers."""
KILL_EXIT_S = 20.0
"""A job whose rank was killed must be over (and recorded) this soon after the kill."""
CASES = {
    "ok": {"cp": {"size": 2}, "repeat": 3, "input": {"lengths": [9, 4]}, "job_timeout_s": 120},
    "bad": {"cp": {"size": 2, "mode": "ring"}, "job_timeout_s": 120},
    "slow": {"cp": {"size": 2}, "warmup": 10**9, "input": {"lengths": [5, 3]}, "job_timeout_s": SLOW_TIMEOUT_S},
    "victim": {"cp": {"size": 2}, "warmup": 10**9, "job_timeout_s": 90},
}


def _connected(a: psutil.Process, b: psutil.Process) -> bool:
    """Whether a holds a TCP connection to one of b's sockets (gloo's pair between two ranks)."""
    ports_b = {c.laddr.port for c in b.net_connections("tcp") if c.laddr}
    return any(c.raddr and c.raddr.port in ports_b for c in a.net_connections("tcp"))


def _rank_procs(job_dir: Path) -> dict[int, psutil.Process]:
    """The live worker processes of one sweep job, by rank (their command line names the job's dir)."""
    out = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "prefill.py" in cmd and str(job_dir) in cmd and "RANK" in p.environ():
                out[int(p.environ()["RANK"])] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _kill_rank1_mid_forward(job_dir: Path, results: Path, out: dict) -> None:
    """Wait for the job's two ranks to be joined by gloo (then they are in the endless warm-up
    forwards within milliseconds), SIGKILL rank 1, and time how long until the record appears."""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        ranks = _rank_procs(job_dir)
        try:
            if len(ranks) == 2 and _connected(ranks[1], ranks[0]):
                break
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    else:
        return
    time.sleep(1.0)
    ranks[1].kill()
    out["killed_at"] = time.monotonic()
    while time.monotonic() < deadline:
        if results.exists() and len(results.read_text().splitlines()) >= 4:
            out["recorded_at"] = time.monotonic()
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "cases" / "case").mkdir(parents=True)
    for name, body in CASES.items():
        (tmp / "cases" / "case" / f"{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(body))
    results, sweep_dir = tmp / "results.jsonl", tmp / "multirun"
    kill: dict = {}
    watcher = threading.Thread(target=_kill_rank1_mid_forward, args=(sweep_dir / "3", results, kill), daemon=True)
    watcher.start()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "scripts/sweep.py", "-m", "--config-dir", str(tmp / "cases"),
         "+case=ok,bad,slow,victim", f"results={results}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    watcher.join(timeout=30)
    return {"proc": proc, "records": load_records(results) if results.exists() else [], "dir": sweep_dir,
            "kill": kill, "seconds": time.monotonic() - t0, "results": results}


@pytest.mark.multiproc
def test_sweep_runs_every_job_and_records_it(sweep):
    proc = sweep["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r.config["cp.mode"] for r in sweep["records"]] == ["in_seq", "ring", "in_seq", "in_seq"]
    assert [r.config["input.lengths"] for r in sweep["records"]][2] == [5, 3]
    assert "1 ran, 3 did not" in proc.stdout
    assert "#1 +case=bad: ❌ ValueError: unknown CP split mode 'ring'" in proc.stdout + proc.stderr


@pytest.mark.multiproc
def test_the_job_that_runs_is_recorded_from_its_own_report(sweep):
    import json

    rec = sweep["records"][0]
    report = json.loads((sweep["dir"] / "0" / "report.json").read_text())
    assert rec.runnable and rec.reason is None
    ms = sorted(1e3 * t for t in report["times_s"])
    assert len(ms) == 3
    assert rec.ttft_ms["median"] == pytest.approx(ms[1], rel=1e-3)
    assert (rec.ttft_ms["min"], rec.ttft_ms["max"]) == (pytest.approx(ms[0], rel=1e-3), pytest.approx(ms[2], rel=1e-3))
    assert rec.tokens == 13 and rec.tokens_per_s == pytest.approx(13 / (ms[1] / 1e3), rel=1e-3)
    plan = plan_split([9, 4], 2, "in_seq")
    assert [p["rows"] for p in rec.per_rank] == [int((plan.token_index(r) >= 0).sum()) for r in (0, 1)]
    assert rec.config["cp.size"] == 2 and rec.config["repeat"] == 3 and rec.config["input.lengths"] == [9, 4]
    assert not any(k.split(".")[0] in SWEEP_FIELDS for k in rec.config)
    assert rec.machine["cpus"] and rec.machine["torch"] and rec.time and len(rec.commit or "") >= 40


@pytest.mark.multiproc
def test_bad_input_is_recorded_with_its_reason(sweep):
    rec = sweep["records"][1]
    assert not rec.runnable and rec.ttft_ms is None
    assert rec.reason.startswith("ValueError: unknown CP split mode 'ring'")


@pytest.mark.multiproc
def test_a_hanging_job_times_out_and_leaves_no_process(sweep):
    rec = sweep["records"][2]
    assert not rec.runnable and rec.reason == f"timeout: no result after {SLOW_TIMEOUT_S:g} s"
    assert SLOW_TIMEOUT_S <= rec.wall_s < SLOW_TIMEOUT_S + 15
    strays = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if str(sweep["dir"]) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            strays.append(p.pid)
    assert strays == []


@pytest.mark.multiproc
def test_a_rank_killed_mid_forward_fails_the_job_fast_and_the_sweep_goes_on(sweep):
    kill = sweep["kill"]
    assert "killed_at" in kill, "never saw the victim job's two ranks joined"
    rec = sweep["records"][3]
    assert not rec.runnable and rec.reason == "rank 1 killed by SIGKILL"
    assert kill["recorded_at"] - kill["killed_at"] < KILL_EXIT_S
    assert sweep["records"][0].runnable  # the jobs before it, and the sweep itself, carried on


@pytest.mark.multiproc
def test_report_cli_on_the_sweep(sweep, tmp_path):
    cmd = [sys.executable, "scripts/report.py", "--results", str(sweep["results"]), "--baseline",
           str(sweep["results"]), "--plots", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "✅" in proc.stdout and "timeout: no result after" in proc.stdout and "PASS" in proc.stdout
    assert (tmp_path / "ttft.png").is_file()


# ---- configuration, without processes ------------------------------------------------------------------


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("sweep", overrides=overrides, return_hydra_config=True)


def test_sweep_yaml_mirrors_its_own_fields():
    keys = set(yaml.safe_load((CONF / "sweep.yaml").read_text())) - {"defaults", "hydra"}
    assert keys == set(SWEEP_FIELDS)
    sweep, run = split_config(_compose([]))
    assert sweep == SweepConfig() and run == PrefillConfig()


def test_every_job_field_is_a_sweep_dimension_and_reaches_the_job():
    sweep, run = split_config(_compose(["kernels=triton", "cp=round_robin", "cp.size=4", "moe=deepep",
                                        "input.lengths=[5,3]", "++model.overrides.num_hidden_layers=2"]))
    child = OmegaConf.create(job_config_yaml(run, Path("/tmp/x")))
    assert list(child.defaults) == ["config", "_self_"] and child.hydra.run.dir == "/tmp/x"
    body = OmegaConf.masked_copy(child, [k for k in child if k not in ("defaults", "hydra")])
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrefillConfig), body)) == run
    assert (run.kernels, run.cp.size, run.moe.backend, run.model.overrides) == ("triton", 4, "deepep", {"num_hidden_layers": 2})


def _with_cli(cfg, overrides: list[str]):
    """`cfg` as a multirun's top-level config would be after these command-line overrides."""
    with open_dict(cfg):
        cfg.hydra.overrides.task = overrides
    return cfg


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose_and_sweep(experiment):
    cfg = _compose([f"+experiment={experiment}"])
    split_config(cfg)  # every field checked against the dataclasses
    assert count_jobs(_with_cli(cfg, [f"+experiment={experiment}"])) >= 2


def test_count_jobs_multiplies_sweeps_and_the_command_line_wins():
    assert count_jobs(_with_cli(_compose([]), ["cp.size=1,2,4", "cp=in_seq,round_robin", "repeat=3"])) == 6
    tiny = _compose(["+experiment=cpu_tiny"])
    assert count_jobs(_with_cli(tiny, ["+experiment=cpu_tiny"])) == 16  # 2 sizes x 2 modes x 2 backends x 2 inputs
    assert count_jobs(_with_cli(tiny, ["+experiment=cpu_tiny", "cp.size=2", "moe=deepep"])) == 4


@pytest.mark.parametrize("num", [3, "???"], ids=["multirun", "single_run"])
def test_progress_prints_one_line_per_job(num, capsys):
    rec = Record({"cp.size": 2}, True, ttft_ms={"median": 12.0, "min": 11.0, "max": 15.0}, tokens_per_s=4916.7,
                 exit_error="rank 1 killed by SIGABRT")
    done = JobReturn(overrides=["cp.size=2", "results=x.jsonl"], status=JobStatus.COMPLETED, _return_value=rec)
    failed = JobReturn(overrides=["cp.mode=ring"], status=JobStatus.COMPLETED,
                       _return_value=Record({}, False, reason="ValueError: unknown CP split mode 'ring'"))
    progress = SweepProgress()
    for job in (done, failed):
        progress.on_job_end(config=OmegaConf.create({"hydra": {"job": {"num": num}}}), job_return=job)
    prefix = "#3 " if num == 3 else ""
    assert capsys.readouterr().out.splitlines() == [
        f"{prefix}cp.size=2: ✅ 12 ms (11 .. 15), 4,917 tok/s; then, on exit: rank 1 killed by SIGABRT",
        f"{prefix}cp.mode=ring: ❌ ValueError: unknown CP split mode 'ring'"]
    assert (progress.ran, progress.failed) == (1, 1)


def test_failure_reasons_name_the_cause():
    log = "Traceback (most recent call last):\n  ...\nValueError: unknown CP split mode 'ring'\n[rank1]: bye\n"
    assert last_exception(log) == "ValueError: unknown CP split mode 'ring'"
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 17.00 GiB"
    assert failure_reason(LaunchResult(1, False, 1.0), 5, oom) == f"OOM: {oom}"
    killed = LaunchResult(1, False, 1.0, [RankFailure(0, 1), RankFailure(1, -9, "SIGKILL")])
    assert failure_reason(killed, 5, log) == "rank 1 killed by SIGKILL"
    assert failure_reason(LaunchResult(None, True, 5.0), 5, log) == "timeout: no result after 5 s"
    assert failure_reason(LaunchResult(3, False, 1.0), 5, "") == "exited with code 3"
