#!/usr/bin/env bash
# The wheels a GPU machine without network lacks to run shardkit and DeepSpeed, made here into .whl/ (ignored
# by git, carried with the working tree): DeepSpeed built from its sdist, pydantic and pydantic_core, hjson,
# annotated_types, typing_inspection and typing_extensions (pydantic needs a newer one than torch brings).
# Versions and hashes come from the project's locks (requirements/cuda.lock, requirements/deepspeed.lock), the
# binary ones for CPython 3.12 on manylinux x86_64. The rest of DeepSpeed's Requires-Dist (ninja, psutil,
# py-cpuinfo, msgpack, einops, packaging, tqdm, numpy) and torch come with a CUDA torch install.
#
#     bash benchmarks/gpu_wheels.sh        # then: bash benchmarks/gpu_acceptance.sh on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
limit=$((64 * 1024 * 1024))  # what travels with the working tree, wheels included
binary_from_cuda_lock=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# A package's locked block: "name==version \" and its "--hash=" lines.
locked() {
  awk -v name="$1" '
    $0 ~ "^" name "==" { keep = 1; sub(/ *\\$/, ""); printf "%s", $0; next }
    keep && /^ +--hash=/ { line = $0; sub(/^ +/, "", line); sub(/ *\\$/, "", line); printf " %s", line; next }
    keep { keep = 0; print "" }
  ' "$2"
}

for name in "${binary_from_cuda_lock[@]}"; do
  locked "$name" requirements/cuda.lock
done >"$scratch/binary.txt"
locked hjson requirements/deepspeed.lock >>"$scratch/binary.txt"
locked deepspeed requirements/deepspeed.lock >"$scratch/sdist.txt"
for name in "${binary_from_cuda_lock[@]}" hjson; do
  grep -q "^$name==" "$scratch/binary.txt" || { echo "gpu_wheels: $name is not in the locks" >&2; exit 1; }
done
grep -q "^deepspeed==" "$scratch/sdist.txt" || { echo "gpu_wheels: deepspeed is not in requirements/deepspeed.lock" >&2; exit 1; }

rm -rf .whl
mkdir -p .whl
"$python" -m pip download --quiet --no-deps --require-hashes --only-binary=:all: --implementation cp \
  --python-version 3.12 --platform manylinux_2_17_x86_64 -r "$scratch/binary.txt" -d .whl
# Built without torch in the build environment: a pure-Python wheel whose ops are JIT-compiled on the GPU
# machine against its own torch and CUDA.
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-deps --require-hashes --no-binary=deepspeed \
  -r "$scratch/sdist.txt" -w .whl

expected=$(( ${#binary_from_cuda_lock[@]} + 2 ))
found=$(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$found" -ne "$expected" ]; then
  echo "gpu_wheels: expected $expected wheels in .whl/, found $found" >&2
  ls -l .whl >&2
  exit 1
fi
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
# Everything that travels: tracked and untracked-but-not-ignored files, plus .whl/.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
  | awk '{ s += $1 } END { print s + 0 }')
ls -l .whl
echo "wheels: $wheels bytes ($((wheels / 1024 / 1024)) MiB); working tree with them: $((tree + wheels)) bytes"
if [ "$((tree + wheels))" -ge "$limit" ]; then
  echo "gpu_wheels: the working tree with .whl/ is $((tree + wheels)) bytes, over the 64 MiB that can travel" >&2
  exit 1
fi
