"""Sweeps of prefill configurations, their records, ablation tables, plots and a regression guard.

- `launch`: one torchrun job of N ranks in a child process, bounded in time, no stray processes.
- `job`: one sweep job, Hydra config -> torchrun prefill -> `Record` appended to a JSON-lines file.
- `records`: the record schema, reading and writing results files, the machine and commit.
- `progress`: the progress bar over a multirun's jobs (a Hydra callback).
- `report`: ablation table (markdown, ✅/❌ with footnoted reasons, speed-ups over cp 1 and partners).
- `plots`: TTFT against tokens, speed-up against CP size, per-rank time and rows (PNG).
- `guard`: `compare(results, baseline, threshold)`, the regression verdict.

Scripts: scripts/sweep.py (Hydra multirun) and scripts/report.py.
"""
