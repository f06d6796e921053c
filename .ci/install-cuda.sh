#!/usr/bin/env bash
# Installs what candle's `cuda` feature needs to *compile* (no GPU, no driver): nvcc and the CUDA
# headers, from NVIDIA's PyPI wheels, into a local virtual environment. Prints the CUDA root.
#
#   .ci/install-cuda.sh [DIR]      (default: target/cuda-toolkit)
#
# cudarc 0.19.10 knows CUDA up to 13.4: pin the wheels there (13.5's build script panics with
# "Unsupported cuda toolkit version"), nvvm and crt included: a newer nvvm emits PTX that
# 13.4's ptxas rejects ("Unsupported .version 9.5"). CCCL (header-only) has its own numbering.
set -euo pipefail
dir=${1:-target/cuda-toolkit}
if [ ! -x "$dir/venv/bin/python" ]; then
  python3 -m venv "$dir/venv"
fi
"$dir/venv/bin/pip" install --quiet --disable-pip-version-check \
  'nvidia-cuda-nvcc==13.4.*' 'nvidia-nvvm==13.4.*' 'nvidia-cuda-crt==13.4.*' \
  'nvidia-cuda-runtime==13.4.*' 'nvidia-cuda-cccl>=13.3,<13.4' >&2
root=$("$dir/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
test -x "$root/bin/nvcc" || { echo "nvcc not found under $root" >&2; exit 1; }
echo "$root"
