#!/usr/bin/env bash
# Create bench-work/mergekit-venv with mergekit from PyPI, for the comparison baseline.
#
# Why a separate venv: mergekit pins its own transformers/pydantic versions, which must not
# leak into gift-merge's environment. torch is installed first, pinned to the CPU build
# this machine serves from local disk, so pip never resolves a multi-GB CUDA torch.
#
# Usage: bash benchmarks/setup_mergekit.sh [MERGEKIT_VERSION]   (default 0.1.5)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${BENCH_WORK:-$ROOT/bench-work}"
VENV="$WORK/mergekit-venv"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MERGEKIT_VERSION="${1:-${MERGEKIT_VERSION:-0.1.5}}"

mkdir -p "$WORK"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first, exactly this version (CPU wheel); mergekit then sees it as satisfied.
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install --quiet "mergekit==$MERGEKIT_VERSION"

# Guard: mergekit's dependency resolution must not have replaced torch.
installed_torch="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
case "$installed_torch" in
    "$TORCH_VERSION"*) ;;
    *) echo "error: torch was changed to $installed_torch (wanted $TORCH_VERSION)" >&2; exit 1 ;;
esac

"$VENV/bin/mergekit-yaml" --help >/dev/null
echo "mergekit $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mergekit"))')" \
     "with torch $installed_torch ready in $VENV"
