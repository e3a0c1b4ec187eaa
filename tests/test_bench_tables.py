"""docs/benchmarks.md's tables are generated from the committed records (scripts/bench_tables.py):
a record or a renderer changed without regenerating the page fails here."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_tables_match_their_records():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "scripts" / "bench_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0
    assert "<!-- table:kernels docs/benchmarks/kernels.json -->" in mod.DOC.read_text()
