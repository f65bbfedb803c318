#!/usr/bin/env bash
# Build, check and time the int8 lattice kernel path on one NVIDIA GPU, in about 10 minutes at most.
#
#   bash tools/gpu_run.sh --prepare   # on a machine with the package registries, from the repository root:
#                                     # the wheels the GPU machine may lack (basicsr 1.4.2 and what it imports)
#                                     # and the SunHays80 x4 calibration images go to results/gpu_inputs/
#                                     # (ignored by git; take that folder along to the GPU machine)
#   bash tools/gpu_run.sh             # on the GPU machine, from the repository root
#   PARTS="e2e" bash tools/gpu_run.sh # only the named parts (layers, e2e, pipeline), e.g. to rerun one
#
# The GPU run makes the checkout importable as the installed package (kernels/ as oaq_plugin.kernels) in a
# scratch folder, installs results/gpu_inputs/wheels there when present, then runs three parts of tools/bench_kernels.py, each
# under its own time limit and each writing its JSON and markdown as it goes (a part stopped by its limit
# keeps what it measured):
#   layers    EDSR-baseline 3x3 64->64 and 64->256 on a 320x180 frame: cuDNN fp32/TF32/fp16 (channels-last),
#             TensorRT fp16 (when the tensorrt package is installed), the fp32-product Triton kernel (tf32x3,
#             block sweep) and the int8 kernel (block sweep; quantize, conv, fused conv + next-layer codes,
#             whole layer), each checked against the reference (int32 accumulators exactly).
#   e2e       EDSR-M, IMDN and SRVGG x4 at 320x180 and 480x270, W4A4 (ends at W8A8) and W4A4 everywhere:
#             the same comparison points, TensorRT int8 where the quantized ONNX export and tensorrt exist.
#   pipeline  calibrate + search + block reconstruction seconds for IMDN x4 and EDSR-M x4.
# Results go to $OUT when it is set, else docs/bench/int8_gpu/: layers.{json,md}, e2e.{json,md},
# pipeline.{json,md}, environment.txt and gpu_run.log. Exit status: 0 when every part finished and every
# check passed, 1 otherwise (the log says which).
set -uo pipefail

PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    SHARED=${OAQ_SHARED:-$ROOT/../shared}
    WHEELS=results/gpu_inputs/wheels
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    scratch=$(mktemp -d)
    "$PY" -m pip download -q --no-deps -d "$scratch" basicsr==1.4.2
    # basicsr's setup.py imports torch: build its (pure Python) wheel with this environment's torch.
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$scratch"/basicsr-1.4.2.tar.gz
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" addict==2.4.0 future==1.0.0 yapf==0.43.0 platformdirs==4.3.8 lmdb==1.7.5
    rm -rf "$scratch"
    if [[ -d "$SHARED/data/calib/SunHays80/LR_bicubic/X4" ]]; then
        rm -rf results/gpu_inputs/calib
        cp -r "$SHARED/data/calib/SunHays80/LR_bicubic/X4" results/gpu_inputs/calib
    else
        echo "gpu_run: $SHARED/data/calib/SunHays80 not found; the pipeline part will use synthetic images" >&2
    fi
    du -sh results/gpu_inputs/*
    exit 0
fi

OUT=${OUT:-$ROOT/docs/bench/int8_gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
: > "$LOG"
say() { echo "[gpu_run $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# The checkout as the installed package, plus carried wheels, in a scratch site folder.
SITE=$(mktemp -d)
cp -r oaq_plugin "$SITE/oaq_plugin"
rm -rf "$SITE/oaq_plugin/kernels"
cp -r kernels "$SITE/oaq_plugin/kernels"
for wheel in results/gpu_inputs/wheels/*.whl; do
    [[ -f "$wheel" ]] || continue
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$wheel" \
        >> "$LOG" 2>&1 || say "could not install $wheel (EDSR and SRVGG need basicsr)"
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$PY" - <<'EOF'
import platform, torch, triton
from oaq_plugin.compat import install_basicsr_compat
install_basicsr_compat()
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')
for name in ('basicsr', 'tensorrt', 'onnx'):
    try:
        module = __import__(name)
        print(name, getattr(module, '__version__', '?'))
    except Exception as error:
        print(name, 'missing:', type(error).__name__, error)
EOF
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" | tee -a "$LOG"

status=0
part() {  # part NAME LIMIT_SECONDS ARGS...
    local name=$1 limit=$2
    shift 2
    say "part $name (limit ${limit}s): bench_kernels.py $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$PY" tools/bench_kernels.py --out "$OUT" --name "$name" "$@" >> "$LOG" 2>&1
    local rc=$?
    say "part $name: exit $rc after $((SECONDS - start))s"
    [[ $rc -eq 0 ]] || status=1
}

CALIB=()
[[ -d results/gpu_inputs/calib ]] && CALIB=(--calib-dir results/gpu_inputs/calib)
for name in ${PARTS:-layers e2e pipeline}; do
    case $name in
        layers) part layers 210 --no-e2e --precisions tf32x3 --warmup 5 --repeats 30 ;;
        e2e) part e2e 230 --no-layers --precisions tf32x3 --e2e-bits W4A4 W4A4-all --warmup 3 --e2e-repeats 10 ;;
        pipeline) part pipeline 150 --no-layers --no-e2e --pipeline "${CALIB[@]}" ;;
        *) say "unknown part '$name' (layers, e2e, pipeline)"; status=1 ;;
    esac
done

for name in layers e2e pipeline; do
    [[ -f "$OUT/$name.md" ]] && { echo; cat "$OUT/$name.md"; } >> "$LOG"
done
say "done, status $status; results in $OUT"
rm -rf "$SITE"
exit $status
