#!/usr/bin/env bash
# The platform check CI can make without the standard library of other targets: every gradkit
# crate's normal dependencies resolve for macOS on Apple silicon and for Windows, and grad-core
# has the ones it cannot work without (a Linux-only [target] section once hid them elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for target in aarch64-apple-darwin x86_64-pc-windows-msvc; do
  for crate in grad-core grad-layers grad-regularize grad-diagnostics gradkit; do
    tree=$(cargo tree -p "$crate" -e normal --target "$target" --prefix none --format '{p}')
    echo "$crate on $target: $(echo "$tree" | sort -u | wc -l) packages"
  done
  direct=$(cargo tree -p grad-core -e normal --target "$target" --depth 1 --prefix none --format '{p}')
  echo "grad-core's dependencies on $target: $(echo "$direct" | tail -n +2 | cut -d' ' -f1 | sort | tr '\n' ' ')"
  for dep in thiserror serde rayon rand_core candle-core half; do
    if ! echo "$direct" | grep -q "^$dep v"; then
      echo "error: grad-core on $target lacks $dep" >&2
      status=1
    fi
  done
  # The Linux-only advice call must stay behind cfg: libc is not a dependency elsewhere.
  if echo "$direct" | grep -q "^libc v"; then
    echo "error: grad-core on $target depends on libc (madvise is Linux-only)" >&2
    status=1
  fi
done
exit $status
