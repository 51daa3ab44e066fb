#!/usr/bin/env bash
# One prepared GPU run (issue 11): build with the CUDA extension, probe every kernel, run every GPU test,
# benchmark every route, and write the log, JUnit XML, results JSON, Markdown and a dispatch table.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--phases env,build,probe,tests,bench,report]
#                                [--only ID_PREFIX,...] [-k TEST_EXPR] [--write-dispatch]
#
# Output (DIR, default $OUT or ./gpu_check_out): gpu_check.log, phases.jsonl, env.json, build.json,
# probe.json, tests.json, tests.xml, bench.json, results.json, results.md, dispatch.json (proposed),
# summary.txt. Nothing is downloaded (pip --no-build-isolation --no-deps). Every phase has its own time
# budget (GPU_CHECK_<PHASE>_S, GPU_CHECK_TOTAL_S); inside a phase, tests and tasks run in supervised worker processes, so a
# crash or a hang costs one item, not the run. A failing phase does not stop the next one. The whole
# run keeps to 6 minutes by default, so a second run after a fix (e.g. --phases build,bench
# --only gram/4000000x1024,svd for what the first one had no time for) still fits in 15.
# --dry-run (no GPU needed): every phase runs its control flow and skips with a reason.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
DRY=0
PHASES="env,build,probe,tests,bench,report"
OUTDIR="${OUT:-$ROOT/gpu_check_out}"
ONLY=""
TEST_K=""
WRITE_DISPATCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUTDIR="$2"; shift ;;
    --phases) PHASES="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    -k) TEST_K="$2"; shift ;;
    --write-dispatch) WRITE_DISPATCH="--write-dispatch" ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Budgets (seconds). The bench phase gets what is left of GPU_CHECK_TOTAL_S (default 6 minutes) after
# the earlier phases, less 15 s for the report, unless GPU_CHECK_BENCH_S fixes it.
TOTAL_S="${GPU_CHECK_TOTAL_S:-360}"
BUILD_S="${GPU_CHECK_BUILD_S:-90}"
PROBE_S="${GPU_CHECK_PROBE_S:-35}"
TESTS_S="${GPU_CHECK_TESTS_S:-90}"
PY="${PYTHON:-python3}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
: > "$OUTDIR/phases.jsonl"
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
# Triton's kernel cache outside the output (many small files); a second run on the same machine reuses it
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/rankme_fast_triton_cache}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET RANKME_FAST_BACKEND RANKME_FAST_TRITON_MODE
cd "$ROOT"
echo "== rankme_fast GPU check $(date -u +%FT%TZ) dry_run=$DRY out=$OUTDIR phases=$PHASES"

want() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

record() {  # phase status seconds reason
  "$PY" - "$OUTDIR/phases.jsonl" "$1" "$2" "$3" "$4" <<'EOF'
import json, sys
p, phase, status, secs, reason = sys.argv[1:]
open(p, "a").write(json.dumps({"phase": phase, "status": status, "seconds": float(secs), "reason": reason}) + "\n")
EOF
  echo "== phase $1: $2 (${3}s) $4"
}

run_phase() {  # name budget reason-if-skipped cmd...
  local name="$1" budget="$2"; shift 2
  if ! want "$name"; then record "$name" skipped 0 "not in --phases"; return 0; fi
  echo "== phase $name (budget ${budget}s): $*"
  local t0=$SECONDS rc=0
  timeout -k 15 "$budget" "$@" || rc=$?
  local dt=$((SECONDS - t0))
  case $rc in
    0) if [ "$DRY" = 1 ] && [ "$name" != env ] && [ "$name" != report ]; then
         record "$name" skipped "$dt" "dry run: control flow exercised, every item skipped (no GPU)"
       else record "$name" passed "$dt" ""; fi ;;
    124|137) record "$name" timeout "$dt" "killed at its ${budget}s budget" ;;
    *) record "$name" failed "$dt" "exit code $rc (see gpu_check.log)" ;;
  esac
  return 0
}

DRYFLAG=""
[ "$DRY" = 1 ] && DRYFLAG="--dry-run"

run_phase env 60 "$PY" "$HERE/gpu_check.py" env --out "$OUTDIR" $DRYFLAG

if [ "$DRY" = 1 ]; then
  want build && record build skipped 0 "dry run: the package installed here is used as it is" || record build skipped 0 "not in --phases"
else
  build() {
    export RANKME_FAST_CUDA=ON
    local log="$OUTDIR/build.log"
    # system Pythons marked externally managed need --break-system-packages; try the plain install first
    "$PY" -m pip install --no-build-isolation --no-deps -v "$ROOT" > "$log" 2>&1 \
      || { grep -q "externally-managed" "$log" && "$PY" -m pip install --no-build-isolation --no-deps -v \
             --break-system-packages "$ROOT" >> "$log" 2>&1; } \
      || { tail -40 "$log"; return 1; }
    grep -E "nvcc|_C_cuda|CUDA" "$log" | tail -5
    cd /tmp && "$PY" "$HERE/gpu_check.py" verify-build --out "$OUTDIR"
  }
  export -f build 2>/dev/null
  export PY HERE ROOT OUTDIR
  run_phase build "$BUILD_S" bash -c build
fi

if [ "$DRY" = 1 ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  run_phase probe "$PROBE_S" "$PY" "$HERE/gpu_bench.py" probe --out "$OUTDIR" --budget "$((PROBE_S - 5))" ${ONLY:+--only "$ONLY"} $DRYFLAG
  run_phase tests "$TESTS_S" "$PY" "$HERE/gpu_check.py" tests --out "$OUTDIR" --budget "$((TESTS_S - 10))" ${TEST_K:+-k "$TEST_K"} $DRYFLAG
  BENCH_S="${GPU_CHECK_BENCH_S:-$((TOTAL_S - SECONDS - 15))}"
  [ "$BENCH_S" -lt 30 ] && BENCH_S=30
  run_phase bench "$BENCH_S" "$PY" "$HERE/gpu_bench.py" bench --out "$OUTDIR" --budget "$((BENCH_S - 5))" ${ONLY:+--only "$ONLY"} $DRYFLAG
else
  for p in probe tests bench; do record "$p" skipped 0 "no CUDA GPU visible to torch (use --dry-run on a machine without one)"; done
fi

run_phase report 60 "$PY" "$HERE/gpu_check.py" report --out "$OUTDIR" $WRITE_DISPATCH
echo "== done: $OUTDIR/summary.txt, $OUTDIR/results.md"
exit 0
