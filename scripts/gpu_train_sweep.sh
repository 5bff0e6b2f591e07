#!/usr/bin/env bash
# Train the bundled-model candidates on the lent H200 (one call, results under $OUT):
#   3 sizes x {tnl, llama} in parallel (same data, tokens, schedule), then solo throughput runs
#   of the chosen size, then scripts/select_bundle.py packs the chosen pair for the trip back.
# Usage (device): bash scripts/gpu_train_sweep.sh    (needs data/ carried; see README "Bundled model")
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
RUNS=/tmp/runs
mkdir -p "$RUNS" "$OUT"
declare -A SIZES=(
  [s]="--dim 192 --layers 4 --heads 3 --glu 512"
  [m]="--dim 256 --layers 6 --heads 4 --glu 704"
  [l]="--dim 384 --layers 6 --heads 6 --glu 1024"
)
COMMON="--epochs ${EPOCHS:-8} --lr 2e-3 --warmup-steps 100 --batch-size 32 --seq-len 512 --time-budget-s ${BUDGET:-330}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
# GPU-only tests (CUDA graph decode, Triton model path) alongside, if pytest is importable
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$RUNS/gpu-tests.log" 2>&1 &
for size in "${!SIZES[@]}"; do
  for arch in tnl llama; do
    python3 -m tnllm.train --arch $arch ${SIZES[$size]} $COMMON --out "$RUNS/$arch-$size" \
      > "$RUNS/$arch-$size.log" 2>&1 &
  done
done
wait
tail -n 3 "$RUNS"/*.log
CHOSEN=$(python3 scripts/select_bundle.py choose "$RUNS")
echo "chosen size: $CHOSEN"
for arch in tnl llama; do  # solo, so tokens/s is not shared with other runs
  python3 -m tnllm.train --arch $arch ${SIZES[$CHOSEN]} $COMMON --max-steps 80 --out "$RUNS/speed-$arch" \
    > "$RUNS/speed-$arch.log" 2>&1
done
python3 scripts/select_bundle.py pack "$RUNS" "$CHOSEN" "$OUT"
ls -la "$OUT"
