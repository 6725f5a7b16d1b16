#!/usr/bin/env bash
# One call on a GPU machine: install, check, time. Writes logs and JSONL rows to $OUT (or ./gpu-out).
#   bash benchmarks/run_gpu.sh            (wheels for packages the machine lacks may sit in .whl/)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/kiln-site .; then
  # no usable setuptools there: lay out the namespace by hand (kiln.engine <- engine/, ...)
  mkdir -p /tmp/kiln-site/kiln
  for d in engine kernels model benchmarks; do ln -sfn "$PWD/$d" /tmp/kiln-site/kiln/$d; done
fi
export PYTHONPATH=/tmp/kiln-site:${PYTHONPATH:-}
python3 -c "import kiln.engine.train, torch, triton; print('kiln ok; torch', torch.__version__, 'triton', triton.__version__)" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.txt"
python3 benchmarks/ceilings.py --out "$OUT/results.jsonl" 2>&1 | tee "$OUT/ceilings.log"
python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.log" | tail -5
python3 -m pytest -q -p no:cacheprovider -n 8 tests 2>&1 | tail -5 | tee -a "$OUT/pytest-gpu.log"
for spec in "tiny --steps 30 --warmup 10 --set train.batch_size=64" \
            "tiny --steps 30 --warmup 10 --set train.batch_size=256" \
            "base --steps 8 --warmup 3 --set data.resolution=256 --set model.patch_size=4 --set train.batch_size=8"; do
  python3 -m kiln.engine.cli bench step $spec --out "$OUT/results.jsonl" 2>&1 | grep -v Warning | tail -4 | tee -a "$OUT/bench.log"
done
python3 -m kiln.engine.cli train tiny --steps 3000 --out /tmp/tiny-gpu --set sample.every=1000 2>/dev/null | tail -30 > "$OUT/tiny-gpu-train.log"
cp /tmp/tiny-gpu/summary.json "$OUT/tiny-gpu-summary.json"; cp /tmp/tiny-gpu/samples/final.png "$OUT/tiny-gpu-final.png"
cat "$OUT/tiny-gpu-train.log"
