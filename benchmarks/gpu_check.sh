#!/usr/bin/env bash
# One device call for issue 2's GPU point: both engines x FSDP / ZeRO-3 (with and without offload) on the
# tiny preset and the 7B-layer-shaped model. Needs the wheels listed in docs/performance.md under .whl/.
# Writes engines.md (the table), engines.log and the raw results (a tarball) under $OUT.
set -euo pipefail
out="${OUT:-bench-out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed's op builder cannot parse torch's "9.0a" (FACTS.md)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 benchmarks/engines.py --out /tmp/engines --steps "${STEPS:-10}" "$@" 2>&1 | tee "$out/engines.log"
cp /tmp/engines/engines.md "$out/"
tar -czf "$out/results.tgz" -C /tmp engines
