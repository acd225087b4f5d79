#!/usr/bin/env bash
# One logged experiment: train a recipe, then the evaluations every bar reads. Pin it to a core so two can run side
# by side without OpenMP threads fighting (each process one thread):
#
#   CORE=1 tools/experiment.sh ID [--train.flag value ...]
#
# Writes runs/ID (the trainer's run directory, with eval.json from the paper ramp) and beside it eval-in-distribution-
# greedy, eval-ood, eval-non-stationary-greedy and eval-stitching, then runs/ID/summary.txt (one line per evaluation).
# The log is runs/ID.log. Run it from a checkout (it uses that checkout's code: PYTHONPATH is set to it).
set -euo pipefail
id="$1"; shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python}"
export PYTHONPATH="$root:$root/kernels${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
pin=(); [ -n "${CORE:-}" ] && pin=(taskset -c "$CORE")
out="runs/$id"
mkdir -p runs
{
  echo "== $id: $* (commit $(git rev-parse --short HEAD), $(date -u +%FT%TZ), core ${CORE:-any})"
  start=$(date +%s)
  "${pin[@]}" "$py" -m icrl_fast.train --out "$out" "$@"
  echo "trained in $(( $(date +%s) - start )) s"
  "${pin[@]}" "$py" -m icrl_fast.evaluate "$out" --ramp greedy
  "${pin[@]}" "$py" -m icrl_fast.evaluate "$out" --experiment ood
  "${pin[@]}" "$py" -m icrl_fast.evaluate "$out" --experiment non-stationary --ramp greedy
  "${pin[@]}" "$py" -m icrl_fast.evaluate "$out" --experiment stitching
  echo "done in $(( $(date +%s) - start )) s ($(date -u +%FT%TZ))"
} > "runs/$id.log" 2>&1
