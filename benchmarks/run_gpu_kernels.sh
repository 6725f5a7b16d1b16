#!/usr/bin/env bash
# GPU session for kernels: install, CUDA tests (real Triton, not the interpreter), kernel benchmarks.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/kiln-site . || exit 1
export PYTHONPATH=/tmp/kiln-site:${PYTHONPATH:-}
TRITON_INTERPRET=0 timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.log" | tail -15
timeout 290 python3 -m kiln.engine.cli bench group_norm --out "$OUT/results.jsonl" 2>&1 | grep -v -i warn | tee "$OUT/bench-group-norm.log"
timeout 290 python3 -m kiln.engine.cli bench attention --out "$OUT/results.jsonl" 2>&1 | grep -v -i warn | tee "$OUT/bench-attention.log"
timeout 200 python3 -m kiln.engine.cli bench qk_norm_rope --out "$OUT/results.jsonl" 2>&1 | grep -v -i warn | tee "$OUT/bench-qk-norm-rope.log"
python3 -c "from kiln.kernels import csrc; print('csrc build:', csrc.build_info())" | tee "$OUT/csrc-build.txt"
