#!/usr/bin/env bash
# The GPU acceptance check in one call on a GPU machine (docs/performance.md): installs the carried wheels
# (.whl/, made by benchmarks/gpu_wheels.sh), runs benchmarks/acceptance.py's stages within 7 minutes, and
# prints the report. Writes under $OUT (default ./gpu-acceptance): report.md, report.json, acceptance.log and
# runs.tgz (every run's results.json, config and log).
#
#     bash benchmarks/gpu_acceptance.sh                              # on the GPU machine
#     GPU_ACCEPTANCE_REHEARSAL=1 bash benchmarks/gpu_acceptance.sh   # the same stages on CPU, tiny shapes
#     GPU_ACCEPTANCE_STAGES=replays,engines bash benchmarks/gpu_acceptance.sh   # a rerun of some stages
#
# Exit status: 0 when every stage finished and every check passed, 1 otherwise, 124 when the time limit
# stopped it (the report keeps what was done).
set -uo pipefail
cd "$(dirname "$0")/.."
begun=$SECONDS
rehearsal="${GPU_ACCEPTANCE_REHEARSAL:-0}"
if [ "$rehearsal" = 1 ]; then default_limit=1200; else default_limit=420; fi
limit="${GPU_ACCEPTANCE_LIMIT_S:-$default_limit}"
python="${PYTHON:-python3}"
out="${OUT:-gpu-acceptance}"
work="${GPU_ACCEPTANCE_WORK:-$(mktemp -d /tmp/shardkit-acceptance.XXXXXX)}"
mkdir -p "$out" "$work"
exec > >(tee -a "$out/acceptance.log") 2>&1

export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  wheels=$(cd .whl && ls -- *.whl | tr '\n' ' ')
  if [ "$rehearsal" = 1 ]; then
    # The wheels are for the GPU machine's CPython 3.12: here pip only proves that they install there.
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
      --only-binary=:all: --implementation cp --python-version 3.12 --platform manylinux_2_17_x86_64 .whl/*.whl
    status=$?
  else
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl
    status=$?
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
  export GPU_ACCEPTANCE_WHEELS="pip exit $status: $wheels"
fi

args=()
if [ "$rehearsal" = 1 ]; then
  export DS_ACCELERATOR=cpu
  args+=(--rehearsal)
else
  # DeepSpeed's op builder cannot parse the arch torch reports on Hopper ("9.0a"): name the card's own.
  capability=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${capability:-9.0}}"
fi
if [ -n "${GPU_ACCEPTANCE_STAGES:-}" ]; then
  args+=(--stages "$GPU_ACCEPTANCE_STAGES")
fi

# What is left of the limit, less a margin for the report and the kill of a stage cut short.
remaining=$((limit - (SECONDS - begun) - 20))
timeout --signal=TERM --kill-after=15 "$((remaining + 5))" \
  "$python" benchmarks/acceptance.py --out "$out" --work "$work" --limit-s "$remaining" ${args[@]+"${args[@]}"}
code=$?
echo
if [ -f "$out/report.md" ]; then
  cat "$out/report.md"
else
  echo "gpu_acceptance: no report was written (exit $code)"
fi
exit "$code"
