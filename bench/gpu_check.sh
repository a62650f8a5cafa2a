#!/usr/bin/env bash
# The GPU check, one prepared script for a session lent a GPU (H100/H200 class): under 8 minutes from a bare device
# machine with the wheels staged by bench/gpu_wheels.sh (see bench/README.md, "GPU check").
#
#   bash bench/gpu_check.sh [--dry-run] [--staged DIR] [--steps env,label,train,faiss,serve] [--label-queries N]
#
#   --staged DIR   untar DIR/part-* (the chunks gpu_wheels.sh made, copied there call by call) and pip-install the
#                  wheels offline into /tmp/site (put first on PYTHONPATH)
#   --dry-run      check the arguments, the imports this machine has and every stage config the check uses, print
#                  what it would run, exit 0 (tests/test_gpu_check.py runs this; no GPU needed)
# Results: $OUT/gpu_check.json (OUT: the device tool's output folder; default bench/results) and its .log beside it.
# Steps: bench/gpu_check.py (label hf vs vllm through the label stage: parity + pairs/s; train-encoder with use_gpu
# (NCCL); index built with use_gpu=false and =true: equal shards; the Serve app: p50 of POST /search).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
STAGED=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --staged) [ $# -ge 2 ] || { echo "gpu_check.sh: --staged needs a folder" >&2; exit 2; }; STAGED="$2"; shift 2 ;;
    --steps|--label-queries)
      [ $# -ge 2 ] || { echo "gpu_check.sh: $1 needs a value" >&2; exit 2; }; ARGS+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/results}"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

install_staged() {
  local dir="$1"
  if [ "$DRY" = 1 ]; then
    echo "would run: cat $dir/part-* | tar -x -C /tmp/uae-wheels; pip install --no-index --no-deps --target /tmp/site /tmp/uae-wheels/*.whl"
    return
  fi
  ls "$dir"/part-* >/dev/null 2>&1 || { echo "gpu_check.sh: no part-* chunks in $dir" >&2; exit 2; }
  rm -rf /tmp/uae-wheels && mkdir -p /tmp/uae-wheels /tmp/site
  cat "$dir"/part-* | tar -x -C /tmp/uae-wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/uae-wheels/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH" PATH="/tmp/site/bin:$PATH"
}

[ -n "$STAGED" ] && install_staged "$STAGED"
if [ "$DRY" = 1 ]; then
  exec "$PY" bench/gpu_check.py --out "$OUT_DIR/gpu_check.json" --dry-run ${ARGS[@]+"${ARGS[@]}"}
fi
mkdir -p "$OUT_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  >"$OUT_DIR/gpu_check.nvidia-smi.txt" 2>&1 || true
# 470 s for the steps (each bounded inside), so the whole call stays under 8 minutes with the install.
timeout 470 "$PY" bench/gpu_check.py --out "$OUT_DIR/gpu_check.json" ${ARGS[@]+"${ARGS[@]}"}
