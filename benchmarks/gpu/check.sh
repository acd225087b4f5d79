#!/usr/bin/env bash
# One prepared device check for a lent GPU (issue 18): proves the GPU paths in one short run, in order of value.
#
#   bash benchmarks/gpu/check.sh            # on the GPU machine (<= 8 minutes on an H200)
#   bash benchmarks/gpu/check.sh --dry-run  # anywhere: GPU steps print a one-line skip reason, the rest runs
#
# Steps (each with its own `timeout`, all inside one time budget, CHECK_BUDGET_S, default 480 s):
#   0 throughput  issue 31's check first (benchmarks/gpu/throughput.py: floor, correctness, rollout grid, training,
#               profile; its JSON files land in $OUT/throughput)
#   1 ext       build csrc/ just in time with its CUDA kernels; print the dispatch keys its ops registered
#   2 kernels   tests/kernels compiled on CUDA: fp32 exact vs float64 at every test shape, bf16 at the paper shape
#               (N 4096, d 4096, V 128256) within 2x eager bf16's error, and the sm_90 compile/spill check
#   3 e2e       gpu-marked env tests (CUDA env = Numba; device-resident rollout), the paper preset on a tiny Llama
#               (tests/test_pretrained.py: IA3, bf16, vocab argmax, SDPA), Liger scoping, the smoke preset on CUDA
#   4 bench_q_td_loss   fused vs eager vs torch.compile at the paper shape: time and memory
#   5 bench_train       the 8B shape (random weights): tokens/s, MFU, peak memory
#   6 bench_rollout     if time is left: env backend, step vs context length
#
# Environment of the lent machine: no package index and no `pip install -e .` (that would pull the torch pin): the
# checkout goes on PYTHONPATH (icrl_kernels is kernels/icrl_kernels, linked into a temporary directory) and wheels placed in
# .whl/ (gymnasium and its two dependencies, liger-kernel: see benchmarks/README.md) are installed into that
# directory with --no-deps. Everything is logged to $OUT (default ./gpu-out): check.log, one log per step,
# summary.json, env.json, and results/ (gpu-check-<device>.md|json plus the benchmark suites' own result files,
# which also land in benchmarks/results/ on a real run).
set -uo pipefail

usage() { sed -n '2,25p' "$0"; }
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${CHECK_BUDGET_S:-480}"
START=$(date +%s)
PY="${PYTHON:-python}"
exec > >(tee -a "$OUT/check.log") 2>&1
cd "$ROOT" || exit 1
echo "== benchmarks/gpu/check.sh $* ($(date -u +%FT%TZ), budget ${BUDGET}s, out $OUT)"

# -- the checkout on PYTHONPATH, carried wheels beside it -------------------------------------------------------
SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
ln -s "$ROOT/kernels/icrl_kernels" "$SHIM/icrl_kernels"
shopt -s nullglob
WHEELS=("$ROOT"/.whl/*.whl)
shopt -u nullglob
if ((${#WHEELS[@]} && DRY)); then
  echo "dry run: would install ${#WHEELS[@]} carried wheel(s) from .whl/: ${WHEELS[*]##*/}"
elif ((${#WHEELS[@]})); then
  echo "installing ${#WHEELS[@]} carried wheel(s) from .whl/ into a temporary directory (--no-deps, --no-index)"
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SHIM/site" "${WHEELS[@]}" ||
    echo "WARNING: the carried wheels did not install"
else
  echo "no carried wheels in .whl/ (the GPU machine needs gymnasium's: see benchmarks/README.md)"
fi
export PYTHONPATH="$ROOT:$SHIM:$SHIM/site${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels on the GPU (tests/conftest.py sets it only without one)

# -- environment: device, versions, commit (env.json); whether there is a GPU to use -----------------------------
"$PY" - "$OUT/env.json" <<'EOF'
import importlib.metadata as md, json, platform, subprocess, sys
import torch
import icrl_kernels  # noqa: F401  (the PYTHONPATH layout works)

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None

cuda = torch.cuda.is_available()
env = {"device": torch.cuda.get_device_name(0).replace(" ", "-") if cuda else "cpu", "cuda_available": cuda,
       "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "versions": {p: version(p) for p in ("triton", "transformers", "peft", "numba", "numpy", "gymnasium",
                                             "liger-kernel", "flash-attn", "pytest", "pytest-benchmark")},
       "nvcc": (run("nvcc", "--version") or "").splitlines()[-1:] or None,
       "commit": run("git", "rev-parse", "--short", "HEAD"), "dirty": bool(run("git", "status", "--porcelain"))}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
ENV_RC=$?
DEVICE="$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['device'])" "$OUT/env.json" 2>/dev/null)"
DEVICE="${DEVICE:-unknown}"
if ((ENV_RC)); then
  NOGPU="the environment check failed (see check.log)"
elif ((DRY)); then
  NOGPU="--dry-run"
elif [ "$DEVICE" = "cpu" ]; then
  NOGPU="no CUDA device (torch.cuda.is_available() is False)"
else
  NOGPU=""
fi

# -- the steps --------------------------------------------------------------------------------------------------
STATUS=()
step() {  # step ID NAME TIMEOUT_S CMD...   (every step needs the GPU)
  local id=$1 name=$2 limit=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ -n "$NOGPU" ]; then
    echo "SKIP step $id $name: $NOGPU"
    STATUS+=("$id"$'\t'"$name"$'\tskip\t0\t'"$NOGPU")
    return
  fi
  if ((left < 30)); then
    echo "SKIP step $id $name: ${left}s left of the ${BUDGET}s budget"
    STATUS+=("$id"$'\t'"$name"$'\tskip\t0\t'"${left}s left")
    return
  fi
  ((limit > left)) && limit=$left
  echo "== step $id $name (timeout ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$id-$name.log" 2>&1
  rc=$?
  tail -n 15 "$OUT/$id-$name.log"
  local state=ok
  ((rc == 124 || rc == 137)) && state=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && state=fail
  echo "-- step $id $name: $state (rc $rc, $(($(date +%s) - t0))s)"
  STATUS+=("$id"$'\t'"$name"$'\t'"$state"$'\t'"$(($(date +%s) - t0))"$'\t'"rc $rc")
}

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEs)
step 0 throughput 300 "$PY" benchmarks/gpu/throughput.py --budget 280 --out "$OUT/throughput"
step 1 ext 150 "$PY" - <<'EOF'
import torch
from icrl_fast.envs import ext
ok = ext.load(build=True, verbose=True)
print("loaded:", ok, "|", ext.EXT_REASON)
print("kernels for dispatch keys:", ext.kernel_keys())
print(torch._C._dispatch_dump("icrl::step"))
print(ext.describe())
raise SystemExit(0 if "CUDA" in ext.kernel_keys() else 1)
EOF
step 2 kernels 150 "${PYTEST[@]}" tests/kernels -m "not slow"
step 3a e2e-tests 240 "${PYTEST[@]}" -m "gpu or not slow" tests/envs/test_ext.py tests/test_pretrained.py \
  tests/model/test_attention.py tests/model/test_transformers_compat.py
step 3b smoke 120 "$PY" -m icrl_fast.train --preset smoke --device cuda --out "$OUT/smoke-run"
step 4 bench_q_td_loss 150 "${PYTEST[@]}" benchmarks/bench_q_td_loss.py -k paper
step 5 bench_train 200 "${PYTEST[@]}" benchmarks/bench_train.py -k 8B
step 6 bench_rollout 150 "${PYTEST[@]}" benchmarks/bench_rollout.py

# -- results: summary.json and gpu-check-<device>.md|json --------------------------------------------------------
RESULTS="$OUT/results"
mkdir -p "$RESULTS"
if ((!DRY)) && [ -z "$NOGPU" ]; then
  cp "$ROOT"/benchmarks/results/*-"$DEVICE".* "$RESULTS"/ 2>/dev/null
  WRITE_TO=("$RESULTS" "$ROOT/benchmarks/results")
else
  WRITE_TO=("$RESULTS")  # a dry run leaves the checkout's benchmarks/results/ alone
fi
printf '%s\n' "${STATUS[@]}" > "$SHIM/steps.tsv"
"$PY" - "$SHIM/steps.tsv" "$OUT" "$DEVICE" "$(($(date +%s) - START))" "$0 $*" "${WRITE_TO[@]}" <<'EOF'
import datetime, json, pathlib, sys
table, out, device, total, command, dests = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], \
    sys.argv[6:]
steps = []
for line in pathlib.Path(table).read_text().splitlines():
    sid, name, state, secs, note = (line.split("\t", 4) + [""])[:5]
    steps.append({"step": sid, "name": name, "status": state, "seconds": int(secs), "note": note})
env_file = pathlib.Path(out) / "env.json"
env = json.loads(env_file.read_text()) if env_file.is_file() else {}
meta = {"device": device, "versions": env.get("versions"), "torch": env.get("torch"), "python": env.get("python"),
        "commit": env.get("commit"), "dirty": env.get("dirty"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
        "total_seconds": total, "steps": steps}
(pathlib.Path(out) / "summary.json").write_text(json.dumps(meta, indent=1) + "\n")
lines = [f"# GPU check ({device})", "",
         f"- versions: python {meta['python']}, torch {meta['torch']}, {meta['versions']}",
         f"- commit: {meta['commit']}{' (dirty)' if meta['dirty'] else ''}", f"- date: {meta['date']}",
         f"- command: `{command}`", f"- total: {total} s", "", "| step | name | status | seconds | note |",
         "| --- | --- | --- | --- | --- |"]
lines += [f"| {s['step']} | {s['name']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in steps]
for dest in dests:
    pathlib.Path(dest).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(dest) / f"gpu-check-{device}.md").write_text("\n".join(lines) + "\n")
    (pathlib.Path(dest) / f"gpu-check-{device}.json").write_text(json.dumps(meta, indent=1) + "\n")
print("\n".join(lines))
EOF
echo "== done in $(($(date +%s) - START))s; logs and results in $OUT"
FAILED=$(printf '%s\n' "${STATUS[@]}" | awk -F '\t' '$3 == "fail" || $3 == "timeout"' | wc -l)
((ENV_RC)) && exit 1
((FAILED)) && exit 1
exit 0
