#!/usr/bin/env bash
# The kernel issues' GPU acceptance (4, 5, 7) in ONE device call, on the machine's own torch and
# triton, nothing to carry: run `bash benchmarks/run_gpu_acceptance.sh` with timeout_s 600.
# Stages, budget and output files: benchmarks/acceptance.py (BUDGET seconds of stages, default 510;
# STAGES=a,b for a subset). The verdict table is printed last and written to $OUT/acceptance.md.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
# kiln importable from the tree at once (the namespace pyproject.toml maps: kiln.engine <- engine/,
# ...); the csrc extension is built beside the sources by the acceptance run, in the background
site=/tmp/kiln-site/kiln; mkdir -p "$site"
for d in engine kernels model benchmarks; do ln -sfn "$PWD/$d" "$site/$d"; done
export PYTHONPATH=/tmp/kiln-site${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/log.txt"
exec python3 -m kiln.benchmarks.acceptance --out "$OUT" --budget "${BUDGET:-510}" ${STAGES:+--stages "$STAGES"}
