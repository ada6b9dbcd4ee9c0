#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh --wheels DIR installs on a GPU host without the internet
# (run it where pip reaches PyPI; nothing is installed here):
#
#   benchmarks/gpu_wheels.sh .whl            # then: benchmarks/gpu_check.sh --wheels .whl
#
# The list (benchmarks/gpu_wheels.txt) is pinned and holds only what the host's image lacks; every wheel is
# fetched without its dependencies, for CPython 3.12 on x86-64 manylinux (override with PYVER=3.11 etc.).
set -euo pipefail
DIR="${1:?usage: benchmarks/gpu_wheels.sh DIR}"
PYVER="${PYVER:-3.12}"
cd "$(dirname "$0")/.."
mkdir -p "$DIR"
grep -v '^#' benchmarks/gpu_wheels.txt | grep . > "$DIR/.requirements.txt"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" -r "$DIR/.requirements.txt"
rm -f "$DIR/.requirements.txt"
echo "$(ls "$DIR"/*.whl | wc -l) wheels in $DIR ($(du -sh "$DIR" | cut -f1))"
