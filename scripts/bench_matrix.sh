#!/usr/bin/env bash
# Time the CP prefill over CP sizes x split modes x MoE backends on one GPU node, plus the node's
# measured ceilings, and append every rank-0 JSON report to $RESULTS (default bench.jsonl).
#   scripts/bench_matrix.sh "1 2 4" "model=v32_slim input.lengths=[8192]"
# GPU only. Stops with a non-zero exit at the first step that fails; that step's error ends the output.
set -euo pipefail
SIZES=${1:-"1 2"}
ARGS=${2:-"model=v32_slim input.lengths=[8192]"}
RESULTS=${RESULTS:-bench.jsonl}
if ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "bench_matrix.sh: no CUDA device (torch.cuda.is_available() is False); it times GPUs only, nothing was run" >&2
  exit 1
fi
python3 scripts/bench_peak.py | tee -a "$RESULTS"
for n in $SIZES; do
  for mode in in_seq round_robin; do
    for moe in fused deepep; do
      # one GPU: both modes and backends are the same computation; time it once
      if [ "$n" = 1 ] && { [ "$mode" != in_seq ] || [ "$moe" != fused ]; }; then continue; fi
      # stdout: rank 0's JSON report (kept) and Hydra's log lines; stderr (errors) stays on the terminal
      torchrun --nproc-per-node "$n" scripts/prefill.py $ARGS cp=$mode moe=$moe warmup=1 stages=true \
        | grep '^{' | tee -a "$RESULTS"
    done
  done
done
