#!/usr/bin/env bash
# GPU session for kernels, in stages that each fit one 10-minute device call:
#   bash benchmarks/run_gpu_kernels.sh tests         # CUDA tests (real Triton, csrc CUDA), build info
#   bash benchmarks/run_gpu_kernels.sh configs 64    # every attention launch candidate at D = 64
#   bash benchmarks/run_gpu_kernels.sh configs 128   # ... at D = 128, then 256 (8 JIT sets each, one call per D)
#   bash benchmarks/run_gpu_kernels.sh group_norm    # GroupNorm GB/s, graph + eager timing
#   bash benchmarks/run_gpu_kernels.sh attention     # attention TFLOP/s (autotunes first; target shapes first)
#   bash benchmarks/run_gpu_kernels.sh attention quick  # only S = 4096 + 77, H 24, D 128
#   bash benchmarks/run_gpu_kernels.sh qk_norm_rope  # norm+RoPE pre-kernel GB/s
#   bash benchmarks/run_gpu_kernels.sh all           # everything (needs ~25 minutes)
# Logs and JSONL rows go to $OUT (or ./gpu-out). Each stage installs kiln (with the csrc CUDA
# build) into build/kiln-site first, so any stage can be the first call on a fresh machine.
set -uo pipefail
STAGE=${1:-all}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
MAX_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target build/kiln-site . \
  > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
export PYTHONPATH=$PWD/build/kiln-site:${PYTHONPATH:-}
python3 -c "from kiln.kernels import csrc; print('csrc build:', csrc.build_info())" | tee "$OUT/csrc-build.txt"
COPY=$(python3 -c "from kiln.benchmarks.ceilings import measure; print(measure()[0]['gbps'])" 2>/dev/null | tail -1)
echo "copy bandwidth: $COPY GB/s" | tee "$OUT/copy-gbps.txt"
COPY_ARG=${COPY:+--copy-gbps $COPY}
run() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }
if run tests; then
  TRITON_INTERPRET=0 timeout 540 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "not every_attention_launch_config" 2>&1 | tee "$OUT/pytest-gpu.log" | tail -15
fi
if run configs; then
  TRITON_INTERPRET=0 timeout 540 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "every_attention_launch_config${2:+ and D$2}" 2>&1 | tee "$OUT/pytest-gpu-configs${2:-}.log" | tail -15
fi
if run group_norm; then
  timeout 540 python3 -m kiln.engine.cli bench group_norm $COPY_ARG --out "$OUT/results.jsonl" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench-group-norm.log" | tail -70
fi
if run attention; then
  timeout 540 python3 -m kiln.engine.cli bench attention ${2:+--$2} --out "$OUT/results.jsonl" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench-attention.log" | tail -70
fi
if run qk_norm_rope; then
  timeout 540 python3 -m kiln.engine.cli bench qk_norm_rope $COPY_ARG --out "$OUT/results.jsonl" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench-qk-norm-rope.log" | tail -50
fi
