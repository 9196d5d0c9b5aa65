#!/usr/bin/env bash
# The whole GPU measurement of issue 4, in under 8 minutes on one H100 / H200:
#   1. Conv-MS-S training step, plain fp32 eager (foreach AdamW, NCHW)                      -> baseline
#   2. Conv-MS-S bf16, fused AdamW, channels-last, eager                                   -> img/s, MFU
#   3. the same with torch.compile (compiled during the untimed warm-up)                    -> img/s, MFU
#   4. Hybrid-MS-S bf16 + compile (attention through SDPA / flash)                          -> img/s, MFU
#      4b / 4c: the other two families, ShiftViT-T/light and sMLPNet-T, bf16 + compile           -> img/s, MFU
#   5. end to end from JPEG files as `spach train --data-pipeline fast` feeds the GPU: CPU workers decode (OpenCV)
#      and run the full DeiT RandAugment, uint8 batches to the GPU, normalise + erasing there; compared with the
#      synthetic rate of 3
#   6. end to end with nvJPEG: decode + crop/resize/flip/normalise/erase on the GPU, workers only read files and
#      draw crop boxes (no RandAugment: the decode capacity)
#   7. end to end through the plain timm/PIL loader (CPU workers), for comparison
# Batch 128, synthetic data on the device for 1-4, mixup/cutmix soft targets, no host sync inside the step.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (python: $PYTHON or ./.venv / /work/venv / python3; BUDGET_S=560 total;
#        OPENCV_WHEEL=<wheel> when that python has no cv2, for the fast pipeline's OpenCV kernels)
# On a lent machine (device tool): run(command='PYTHONUNBUFFERED=1 bash benchmarks/gpu.sh "$OUT/gpu"', timeout_s=600);
# its python3 has torch, torchvision and timm, and spach runs from src/ (PYTHONPATH below).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/gpu_out}}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for p in .venv/bin/python /work/venv/bin/python python3; do
    if command -v "$p" >/dev/null 2>&1; then PY="$p"; break; fi
  done
fi
MODEL=spach_ms_s_patch4_224_conv
B=128
SPACH="$PY -m spach benchmark --device cuda --batch-size $B"
export TORCHINDUCTOR_FX_GRAPH_CACHE=1   # the second compile of the same graph comes from the cache
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
# The whole script must end inside one device call (600 s there): each step's timeout is cut to what is left of
# BUDGET_S (less a reserve for the summary), and a step with under 30 s left is skipped, so the summary of the
# steps that did run is always written.
BUDGET_S="${BUDGET_S:-560}"
limit() {  # limit WANTED_SECONDS -> the timeout to use now, or 0 to skip
  local left=$(( BUDGET_S - ($(date +%s) - T0) - 15 ))
  if [ "$left" -lt 30 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
step() {  # step NAME WANTED_SECONDS ARGS... : one timed `spach benchmark` run, its JSON and text under $OUT
  local name=$1 want=$2; shift 2
  local t; t=$(limit "$want")
  if [ "$t" -eq 0 ]; then log "skipped $name (time budget spent)"; return 0; fi
  timeout "$t" $SPACH "$@" --json "$OUT/$name.json" | tee "$OUT/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
$PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)" | tee "$OUT/versions.txt"

log "1. plain fp32 eager"
step 1_plain_fp32 120 --model $MODEL --amp off --no-fused-optimizer --steps 10 --warmup 3 --repeats 3

log "2. bf16 eager, fused AdamW, channels-last"
step 2_bf16_eager 120 --model $MODEL --amp bf16 --channels-last --steps 20 --warmup 5 --repeats 3

log "3. bf16 + torch.compile"
step 3_bf16_compile 240 --model $MODEL --amp bf16 --channels-last --compile --steps 30 --warmup 4 --repeats 3

log "4. Hybrid-MS-S bf16 + compile (SDPA)"
step 4_hybrid_compile 150 --model spach_ms_s_patch4_224_hybrid --amp bf16 --channels-last --compile --steps 20 \
  --warmup 4 --repeats 3

log "4b. ShiftViT (shiftvit_light_tiny) bf16 + compile: shifts and 1x1-conv MLPs, channels-last"
step 4b_shiftvit_compile 90 --model shiftvit_light_tiny --amp bf16 --channels-last --compile --steps 20 --warmup 4 \
  --repeats 3

log "4c. sMLPNet (smlpnet_tiny) bf16 + compile: axial token MLPs"
step 4c_smlpnet_compile 90 --model smlpnet_tiny --amp bf16 --channels-last --compile --steps 20 --warmup 4 \
  --repeats 3

log "5. JPEG files end to end (fast pipeline: CPU workers with OpenCV + RandAugment)"
DATA="${DATA_DIR:-/tmp/spach_jpeg_bench}"
if [ ! -d "$DATA/train" ]; then
  $PY - "$DATA" <<'EOF'
import os, sys
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, "benchmarks")
from data_pipeline import make_dataset
root = sys.argv[1]
n_jobs = min(16, os.cpu_count() or 1)
with ProcessPoolExecutor(n_jobs) as ex:  # 3072 photo-like 500x375 JPEGs, quality 90, 16 classes
    list(ex.map(make_dataset, [os.path.join(root, f"part{k}") for k in range(n_jobs)], [3072 // n_jobs] * n_jobs,
                [(500, 375)] * n_jobs, [16] * n_jobs, range(n_jobs)))
os.makedirs(os.path.join(root, "train"), exist_ok=True)
for k in range(n_jobs):
    for c in os.listdir(os.path.join(root, f"part{k}", "train")):
        dst = os.path.join(root, "train", c)
        os.makedirs(dst, exist_ok=True)
        src = os.path.join(root, f"part{k}", "train", c)
        for f in os.listdir(src):
            os.rename(os.path.join(src, f), os.path.join(dst, f"{k}_{f}"))
EOF
fi
WORKERS=$(( $(nproc) - 2 ))
# the lent machine's python may lack OpenCV (no network there): OPENCV_WHEEL=path/to/opencv_python_headless-*.whl
# (carried with the working tree) is unpacked for this run only
if ! $PY -c "import cv2" 2>/dev/null && [ -n "${OPENCV_WHEEL:-}" ] && [ -f "$OPENCV_WHEEL" ]; then
  $PY -m pip install -q --no-deps --target /tmp/spach_opencv "$OPENCV_WHEEL" \
    && export PYTHONPATH="$PYTHONPATH:/tmp/spach_opencv"
fi
$PY -c "import cv2; print('opencv', cv2.__version__)" 2>/dev/null | tee -a "$OUT/versions.txt" \
  || echo "opencv: not installed (the fast pipeline runs its PIL fallback)" | tee -a "$OUT/versions.txt"
step 5_jpeg_fast 120 --model $MODEL --amp bf16 --channels-last --compile --data "$DATA" --data-pipeline fast \
  --workers $WORKERS --steps 12 --warmup 4 --repeats 2

log "6. JPEG files end to end (nvJPEG)"
step 6_jpeg_nvjpeg 120 --model $MODEL --amp bf16 --channels-last --compile --data "$DATA" --data-pipeline nvjpeg \
  --workers $WORKERS --steps 20 --warmup 4 --repeats 3

log "7. JPEG files end to end (timm/PIL workers)"
step 7_jpeg_timm 100 --model $MODEL --amp bf16 --channels-last --compile --data "$DATA" --data-pipeline timm \
  --workers $WORKERS --steps 8 --warmup 3 --repeats 2

log "summary"
$PY - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
rows = {}
for name in sorted(os.listdir(out)):
    if name.endswith(".json"):
        r = json.load(open(os.path.join(out, name)))["results"][0]
        rows[name[:-5]] = r
base = rows.get("1_plain_fp32")
synth = rows.get("3_bf16_compile")
for k, r in rows.items():
    extra = f"  x{r['img_per_s'] / base['img_per_s']:.2f} vs plain fp32" if base else ""
    if synth and "jpeg" in k:
        extra += f"  {100 * r['img_per_s'] / synth['img_per_s']:.0f}% of the synthetic compiled rate"
    mfu = f"{r['mfu_pct']:.1f}%" if r.get("mfu_pct") is not None else "-"
    print(f"{k:18s} {r['model']:30s} {r['img_per_s']:9.1f} img/s  step {r['step_ms']:7.1f} ms  "
          f"{r['tflops']:6.1f} TFLOP/s  MFU {mfu}  max alloc {r['peak_mem_mb']:.0f} MB{extra}")
print("device:", next(iter(rows.values()))["device_name"] if rows else "?")
EOF
log "done"
