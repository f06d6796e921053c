#!/usr/bin/env bash
# Writes a monitored run as a TensorBoard event file (examples/tensorboard.rs) and reads it back
# with TensorBoard's own event reader, installed from PyPI into target/tensorboard-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/tensorboard-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check 'tensorboard>=2.16' >&2
out=target/tensorboard-check
rm -rf "$out"
cargo run --quiet --example tensorboard -- --steps 40 --nan-step 17 --out "$out" >/dev/null
"$venv/bin/python" .ci/tensorboard_check.py "$out"
