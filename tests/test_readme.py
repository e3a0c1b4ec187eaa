"""The first five minutes: the README's commands run as written, and the docs point at what exists.

- Every ```bash block of README.md is either run here, command by command, on CPU (in a scratch
  directory, as a fresh clone would), or starts with `# GPU only`; its prefill overrides are then
  composed against conf/ so that a renamed option still fails here. Install steps are left to CI
  (.ci/run installs from a clean clone), which must use the README's torch pin.
- The runtime dependencies in pyproject.toml cover every package the main job and make_checkpoint
  import: `pip install -e .` alone must be enough for them.
- README lists every preset and every run option; docs name only files that exist; docs/benchmarks.md
  names every file in docs/results/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cp_attn.config import PRESETS
from cp_attn.runconfig import PrefillConfig, from_omegaconf

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CP_ATOL = 2e-5  # check=true on CPU in fp32: CP vs single process (see test_cp_prefill.CP_ATOL)
SETUP_STEPS = ("python3 -m venv ", ". .venv/bin/activate", "pip install ", "jupyter lab")
"""Steps that build the environment (CI does these from a clean clone, this test runs in one), and
starting Jupyter's server (interactive: the notebooks themselves run in tests/test_notebooks.py)."""
THE_SUITE = "python -m pytest"  # the README's test command is this suite (CI runs it)
GPU_MARK = "# GPU only"


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the opening fence, its lines) for every ```bash block; backslash-continued lines
    joined, blank lines dropped (a comment line stays: `# GPU only` marks a block)."""
    blocks = []
    for m in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        lines = m.group(1).replace("\\\n", " ").splitlines()
        blocks.append((text[: m.start()].count("\n") + 1, [ln.strip() for ln in lines if ln.strip()]))
    return blocks


def steps(command: str) -> list[str]:
    return [s.strip() for s in command.split(" && ")]


BLOCKS = bash_blocks(README)
CPU_BLOCKS = [(n, cmds) for n, cmds in BLOCKS if not cmds[0].startswith(GPU_MARK)]
GPU_BLOCKS = [(n, cmds) for n, cmds in BLOCKS if cmds[0].startswith(GPU_MARK)]


def runnable(commands: list[str]) -> list[str]:
    """The steps this test runs: all but comments, environment setup and the test suite itself."""
    return [s for c in commands if not c.startswith("#") for s in steps(c)
            if not s.startswith(SETUP_STEPS) and not s.startswith(THE_SUITE)]


def prefill_overrides(step: str) -> list[str] | None:
    """The Hydra overrides of a `torchrun ... scripts/prefill.py ...` step (shell-unquoted), else None."""
    words = shlex.split(step, comments=True)
    return words[words.index("scripts/prefill.py") + 1:] if "scripts/prefill.py" in words else None


def _compose(overrides: list[str]) -> PrefillConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return from_omegaconf(compose("config", overrides=overrides))


def test_readme_has_cpu_and_gpu_blocks():
    assert len(CPU_BLOCKS) >= 3 and len(GPU_BLOCKS) >= 1, BLOCKS
    assert sum(len(runnable(cmds)) for _, cmds in CPU_BLOCKS) >= 6


def test_ci_installs_with_the_readmes_torch_pin():
    ci = (ROOT / ".ci" / "run").read_text()
    pins = {s for _, cmds in CPU_BLOCKS for c in cmds for s in steps(c) if s.startswith("pip install torch")}
    assert pins == {"pip install torch==2.13.0"}, pins
    assert re.search(r"pip install (--\w+ )*torch==2\.13\.0\b", ci)


@pytest.mark.multiproc
@pytest.mark.parametrize("block", CPU_BLOCKS, ids=[f"README.md:{n}" for n, _ in CPU_BLOCKS])
def test_readme_cpu_commands_run_as_written(block, tmp_path):
    """Each step in a scratch directory holding only what a clone has (conf/, scripts/), one after
    another as a user would type them."""
    for name in ("conf", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    for step in runnable(block[1]):
        proc = subprocess.run(["bash", "-c", step], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{step}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        overrides = prefill_overrides(step)
        if overrides is None:
            continue
        reports = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
        assert len(reports) == 1, f"{step}: rank 0 prints one report\n{proc.stdout}"
        if "check=true" in overrides:
            assert reports[0]["max_abs_diff"] < CP_ATOL, (step, reports[0])


@pytest.mark.parametrize("block", GPU_BLOCKS, ids=[f"README.md:{n}" for n, _ in GPU_BLOCKS])
def test_readme_gpu_commands_compose(block):
    """What can be checked without a GPU: prefill overrides compose; every other script exists and
    takes every --flag the README gives it (its --help, which runs before any CUDA check)."""
    steps_ = runnable(block[1])
    assert steps_, block
    for step in steps_:
        overrides = prefill_overrides(step)
        if overrides is not None:
            _compose(overrides)  # an unknown key, option or type fails here
            continue
        words = shlex.split(step, comments=True)
        scripts = [w for w in words if w.startswith("scripts/") and w.endswith(".py")]
        for script in scripts:
            assert (ROOT / script).exists(), step
            flags = {w.split("=")[0] for w in words if w.startswith("--")}
            if not flags or script == "scripts/sweep.py":  # sweep.py is Hydra: its overrides compose like prefill's
                continue
            helptext = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                                      cwd=ROOT, timeout=120).stdout
            assert all(f in helptext for f in flags), (step, sorted(f for f in flags if f not in helptext))


# ---- dependencies ----------------------------------------------------------------------------------------

_RUN_SCRIPTS = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""


def _requirement_closure(names: list[str]) -> set[str]:
    """Canonical names of these requirements and everything they require (no extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), list(names)
    while todo:
        req = Requirement(todo.pop())
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            pass
    return seen


def _site_packages_of(dists: set[str], into: Path) -> Path:
    """A directory of links to the installed files of `dists` only: a site-packages as if just these
    had been installed."""
    from importlib import metadata

    into.mkdir()
    for name in sorted(dists):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (into / top).exists():
                (into / top).symlink_to(src)
    return into


@pytest.mark.multiproc
def test_runtime_dependencies_cover_what_the_job_and_scripts_import(tmp_path):
    """make_checkpoint and a prefill, run where only the runtime dependencies (and what they require)
    are importable: `pip install -e .` alone must be enough. Optional imports (torch tries tqdm,
    triton, hypothesis) just find nothing, as they would there."""
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    site = _site_packages_of(_requirement_closure(declared), tmp_path / "site")
    runs = [["scripts/make_checkpoint.py", "--out", str(tmp_path / "ck"), "--set", "num_hidden_layers=1"],
            ["scripts/prefill.py", f"model.checkpoint={tmp_path / 'ck'}", "input.lengths=[3]",
             f"hydra.run.dir={tmp_path / 'run'}"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env.pop("WORLD_SIZE", None)
    # -S: no site-packages but `site`, so nothing else installed here can be imported
    proc = subprocess.run([sys.executable, "-S", "-c", _RUN_SCRIPTS, json.dumps(runs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Failed to initialize NumPy" not in proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["tokens"] == 3


# ---- the docs list what exists, and everything that exists -------------------------------------------------


GENERATED = {"outputs", "multirun", "ckpt", "__pycache__"}  # git-ignored; hidden folders (.venv, .git) too


def _repo_paths() -> set[str]:
    """Paths (files and folders, relative to the root) of the repository, without generated folders."""
    out = set()
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in GENERATED and not d.endswith(".egg-info")]
        rel = Path(top).relative_to(ROOT)
        out |= {str(rel / n) for n in dirs + files}
    return out


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "cp_attn").rglob("README.md"))]


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_only_files_in_the_repository(doc):
    names = set(re.findall(r"(?<![\w/.=-])([\w./-]+\.(?:md|py|sh|yaml|jsonl|ipynb))\b", doc.read_text()))
    paths = _repo_paths()
    here = doc.parent.relative_to(ROOT)
    basenames = {Path(p).name for p in paths}
    missing = [n for n in sorted(names) if not (n in paths or str(here / n) in paths
                                                or ("/" not in n and n in basenames)
                                                or n.split("/")[0] in GENERATED)]  # what a command writes
    assert not missing, f"{doc.name} names files that are not in the repository: {missing}"


def test_benchmarks_page_names_every_results_file():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    unnamed = [p.name for p in sorted((ROOT / "docs" / "results").glob("*.jsonl")) if p.name not in page]
    assert not unnamed, unnamed


def test_every_preset_is_a_hydra_option_and_listed_in_the_readme():
    assert {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")} == set(PRESETS)
    map_row = next(ln for ln in README.splitlines() if ln.startswith("| `cp_attn/config.py`"))
    option_row = next(ln for ln in README.splitlines() if ln.startswith("| `model="))
    for name in PRESETS:
        assert f"`{name}`" in map_row, name
        assert re.search(rf"[=|]{name}\b", option_row), name


def _leaf_options(cls, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _leaf_options(type(default), f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


# A group's selected field is also set by choosing the group's YAML: `model=v32` sets model.preset.
GROUP_CHOICE = {"model.preset": "model=", "moe.backend": "moe=", "cp.mode": "cp="}


def test_readme_lists_every_run_option():
    options = _leaf_options(PrefillConfig)
    assert "model.checkpoint" in options and "timeout_s" in options
    table = "\n".join(ln for ln in README.splitlines() if ln.startswith("| `"))
    unlisted = [o for o in options if not re.search(rf"`\+*{re.escape(o)}[=.]", table)
                and GROUP_CHOICE.get(o, "\0") not in table]
    assert not unlisted, unlisted
