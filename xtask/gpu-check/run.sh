#!/usr/bin/env bash
# The GPU check that `cargo xtask gpu-check DIR` packs (see the README, "Checking a GPU").
#
#   bash DIR/run.sh [RESULTS_DIR]        (default: $OUT if set, else DIR/results)
#
# Runs on a Linux machine with an NVIDIA GPU and no network: unpacks the release binaries built
# with `--features cuda` (Burn fusion on), finds the driver (libcuda) and NVRTC libraries in the usual
# places (pip's `nvidia` packages included), then runs, each step under its own time limit and
# the whole under GPU_CHECK_BUDGET_S (default 460 s):
#   parity of the scan kernels and of the Burn op (built-in cases, committed fixtures),
#   the scan bench (copy and exp floors, G2 G4 C3 C4; then other kernel splits on G2 and G4),
#   `classify` cold (fresh kernel cache) and
#   warm, the model fixtures' logits against upstream and NdArray, and the model bench.
# Writes RESULTS_DIR/summary.md (a table), summary.json, steps.tsv, one log per step and the
# benches' JSON. A step that fails or times out is recorded; the next one still runs.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
RESULTS="${1:-${OUT:-$HERE/results}}"
BUDGET="${GPU_CHECK_BUDGET_S:-460}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
T0=$(date +%s)
WORK="${TMPDIR:-/tmp}/vmamba-gpu-check.$$"
mkdir -p "$WORK/bin"
STEPS="$RESULTS/steps.tsv"
printf 'step\tstatus\tseconds\tlimit_s\tlog\n' > "$STEPS"
log() { echo "[gpu-check $(( $(date +%s) - T0 ))s] $*" | tee -a "$RESULTS/gpu-check.log"; }

# --- unpack ------------------------------------------------------------------------------
for packed in "$HERE"/bin/*.xz; do
  name="$(basename "${packed%.xz}")"
  if command -v xz >/dev/null 2>&1; then
    xz -dc "$packed" > "$WORK/bin/$name"
  else
    python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$packed" "$WORK/bin/$name"
  fi || { log "cannot unpack $packed (needs xz or python3)"; exit 1; }
  chmod +x "$WORK/bin/$name"
done
RUNNER="$WORK/bin/xtask-runner"
CLASSIFY="$WORK/bin/classify"
log "unpacked into $WORK/bin: $(ls "$WORK/bin" | tr '\n' ' ')"

# --- libraries ---------------------------------------------------------------------------
# The first directory holding a file that matches one of the patterns.
first_dir_with() {
  local pattern dir f
  for dir in "${DIRS[@]}"; do
    [ -d "$dir" ] || continue
    for pattern in "$@"; do
      for f in "$dir"/$pattern; do
        case "$f" in */stubs/*) continue ;; esac
        [ -e "$f" ] && { echo "$dir"; return 0; }
      done
    done
  done
  return 1
}
DIRS=(${CUDA_DRIVER_DIR:-} /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu
      /usr/lib64 /usr/lib/wsl/lib /usr/local/cuda/compat /usr/lib/aarch64-linux-gnu)
DRIVER_DIR="$(first_dir_with 'libcuda.so.1' 'libcuda.so')"
if [ -z "$DRIVER_DIR" ] && command -v ldconfig >/dev/null 2>&1; then
  DRIVER_DIR="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}' | xargs -r dirname)"
fi
# pip's NVRTC (nvidia-cuda-nvrtc, `nvidia/cu13/lib` or `nvidia/cuda_nvrtc/lib`) in any
# site-packages under the usual roots, then the toolkit's own directories.
PIP_DIRS=()
while IFS= read -r f; do PIP_DIRS+=("$(dirname "$f")"); done < <(
  timeout 30 find /opt /usr/local /usr/lib /root /home -maxdepth 9 -path '*nvidia*' \
    -name 'libnvrtc.so*' 2>/dev/null | sort)
DIRS=(${NVRTC_DIR:-} /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib
      /usr/local/cuda-*/lib64 "${PIP_DIRS[@]}")
NVRTC_DIR_FOUND="$(first_dir_with 'libnvrtc.so.1[0-9]' 'libnvrtc.so')"
log "libcuda: ${DRIVER_DIR:-NOT FOUND (set CUDA_DRIVER_DIR)}; libnvrtc: ${NVRTC_DIR_FOUND:-NOT FOUND (set NVRTC_DIR)}"
export LD_LIBRARY_PATH="${DRIVER_DIR:+$DRIVER_DIR:}${NVRTC_DIR_FOUND:+$NVRTC_DIR_FOUND:}${LD_LIBRARY_PATH:-}"
export VMAMBA_BENCH_DIR="$RESULTS"
# CubeCL's kernel cache: one for the scan steps; a fresh one for classify's cold start, which
# the warm start and the model steps after it reuse.
export VMAMBA_CACHE_DIR="$WORK/cache-scan"

# --- steps -------------------------------------------------------------------------------
# step NAME LIMIT_S COMMAND...: runs under min(LIMIT_S, what is left of the budget).
step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  local out="$RESULTS/$name.log"
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped (budget spent)\t0\t%s\t-\n' "$name" "$limit" >> "$STEPS"
    log "$name: skipped, budget spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  log "$name (limit ${limit}s): $*"
  local start=$(date +%s.%N) rc
  timeout -k 5 "$limit" "$@" > "$out" 2>&1
  rc=$?
  local seconds
  seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  local status="ok"
  [ "$rc" -ne 0 ] && status="failed (exit $rc)"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="timed out"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$limit" "$name.log" >> "$STEPS"
  log "$name: $status in ${seconds}s; last lines:"
  tail -n 4 "$out" | sed 's/^/    /' | tee -a "$RESULTS/gpu-check.log"
}

step device 20 sh -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || nvidia-smi'
step parity-kernels 60 "$RUNNER" parity --backend cubecl-cuda
step parity-op 75 "$RUNNER" parity --backend cuda
step parity-fixtures 45 "$RUNNER" parity --backend cuda --fixtures "$HERE/fixtures/scan"
step bench-scan 90 "$RUNNER" bench scan --backend cuda --implementations cubecl --shapes G2,G4,C3,C4 --repeats 10
# classify, T s1l8 at 224, batch 1: a fresh kernel cache, then the same cache again.
export VMAMBA_CACHE_DIR="$WORK/cache-model"
rm -rf "$VMAMBA_CACHE_DIR"
step classify-cold 120 "$CLASSIFY" --backend cuda
step classify-warm 45 "$CLASSIFY" --backend cuda
step model-parity 90 "$RUNNER" model-parity --backend cuda --fixtures "$HERE/fixtures/model"
# The same with TF32 allowed (vendor/README.md): confirms what the default's exact f32 removes.
step model-parity-tf32 60 env VMAMBA_CUDA_TF32=1 VMAMBA_BENCH_DIR="$RESULTS/tf32" "$RUNNER" \
  model-parity --backend cuda --fixtures "$HERE/fixtures/model"
step bench-model 150 "$RUNNER" bench model --backend cuda --batches 1,128 --train-batch 128 --repeats 3
# Last (the budget may run out first): other kernel splits (units x items x states x channels
# per cube, plane or shared-memory scans) on G2 and G4, the default first, to choose the
# default: JSON in RESULTS/splits.
step bench-splits 100 env VMAMBA_BENCH_DIR="$RESULTS/splits" "$RUNNER" bench scan --backend cuda \
  --implementations cubecl --shapes G2,G4 --repeats 5 \
  --configs 128x4x2x2,128x4x2x2:shared,128x4x4x1,128x4x1x1,128x4x2x4,128x8x2x2,256x4x2x2,64x8x2x2,128x4x4x4

# --- summary -----------------------------------------------------------------------------
log "total $(( $(date +%s) - T0 ))s; writing $RESULTS/summary.md"
if command -v python3 >/dev/null 2>&1; then
  python3 "$HERE/summary.py" "$RESULTS" || log "summary.py failed; see steps.tsv"
else
  cp "$STEPS" "$RESULTS/summary.md"
fi
cat "$RESULTS/summary.md" 2>/dev/null
rm -rf "$WORK"
