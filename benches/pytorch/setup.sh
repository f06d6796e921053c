#!/usr/bin/env bash
# A local venv with PyTorch from PyPI, for the scripts beside this one (never used by
# `cargo test` or CI). PyPI's Linux wheel brings its CUDA libraries (about 5 GB); the scripts
# run on the CPU. Usage: benches/pytorch/setup.sh, then benches/pytorch/.venv/bin/python <script>.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install --quiet "torch==2.15.0" numpy
"$here/.venv/bin/python" -c 'import torch; print("torch", torch.__version__)'
