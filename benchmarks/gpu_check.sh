#!/usr/bin/env bash
# sparseseg's first run on a GPU (issue 25): versions, the .cu files compiled for sm_90, race
# detectors, the gpu-marked tests, CPU vs CUDA labels, the paper network model-only and zarr->zarr.
# Every step is capped (about 8 minutes in all; typical less); run from anywhere:
#   bash benchmarks/gpu_check.sh
# Output: benchmarks/results/gpu_<device>_<date>.json and .log (also copied to $OUT when set, as
# the device tool's $OUT folder). Without a GPU each CUDA step records why it was skipped.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export SPARSESEG_CACHE=${SPARSESEG_CACHE:-$(mktemp -d)/cache}
name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
device=$(echo "${name:-nogpu}" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//')
stem=benchmarks/results/gpu_${device}_$(date -u +%Y-%m-%d)
mkdir -p benchmarks/results
log=$stem.log
: >"$log"

# step SECONDS NAME COMMAND...: the command's output into the log, capped, then its exit status.
step() {
    local cap=$1 label=$2
    shift 2
    echo "=== [$cap s] $label: $*" | tee -a "$log"
    timeout --kill-after=5 "$cap" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== rc=$rc $label" | tee -a "$log"
}

step 30 versions "$PY" benchmarks/gpu_check.py versions
ptx=$(mktemp -d)
for f in sparseseg/kernels/*.cu; do
    # sm_90 machine code (ptxas checks registers and limits), not only PTX
    step 30 "nvcc_$(basename "$f" .cu)" nvcc --cubin -arch=sm_90 -I sparseseg/kernels -o "$ptx/$(basename "$f").cubin" "$f"
done
step 60 race "$PY" benchmarks/gpu_check.py race
step 100 gpu_tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_gpu_paths.py -rfEs
step 60 compare "$PY" benchmarks/gpu_check.py compare
step 170 paper "$PY" benchmarks/gpu_check.py paper
"$PY" benchmarks/gpu_check.py merge "$log" "$stem.json" "${name:-none}"
echo "results: $stem.json, $stem.log"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$stem.json" "$stem.log" "$OUT/"; fi
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["passed"] else 1)' "$stem.json"
