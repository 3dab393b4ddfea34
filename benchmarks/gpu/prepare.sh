#!/usr/bin/env bash
# Build gpu-kit/ for a GPU machine that has PyTorch but no network (a cluster's compute node,
# say): the Python wheels difflab needs beyond a stock PyTorch image, and the full MNIST,
# gzipped. Copy the project with gpu-kit/ to that machine and run benchmarks/gpu/run.sh there.
#
#   benchmarks/gpu/prepare.sh [KIT_DIR]      (PYVER=3.12 by default: the GPU machine's Python)
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT="${1:-gpu-kit}"
PYVER="${PYVER:-3.12}"
PY="${PY:-.venv/bin/python}"
mkdir -p "$KIT/wheels" "$KIT/data"
# pure-Python packages a PyTorch image usually lacks, at the versions this checkout uses
want=()
for pkg in diffusers importlib_metadata zipp mlxtend; do
  v="$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))" 2>/dev/null)" || continue
  want+=("$pkg==$v")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$KIT/wheels" "${want[@]}"
tools/fetch-mnist "$KIT/data"
for f in "$KIT"/data/MNIST/raw/*-ubyte; do
  gzip -9 -c "$f" > "$f.gz.tmp" && mv "$f.gz.tmp" "$f.gz" && rm "$f"
done
du -sh "$KIT"
echo "gpu-kit ready: ${want[*]} and MNIST (gzipped) in $KIT"
