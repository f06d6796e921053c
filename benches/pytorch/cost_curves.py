"""Cost curves of gradkit, candle and PyTorch: time against the amount of work, plotted.

Runs `cargo bench --bench curves` one curve at a time (gradkit and candle, one JSON line per
point), times PyTorch 2.15 (CPU, 2 threads, f32) on the same points right after, and writes
`docs/cost_<curve>.svg` (log-log), `docs/cost_curves.json` (every time) and a markdown table per
curve on stdout. The curves (see `benches/curves.rs`):

  bn_batch        batch norm 2d training step, [N, 64, 28, 28], N = 1 .. 256
  bn_channels     the same step, [32, C, 28, 28], C = 8 .. 512
  clip_tensors    L2 clipping of ResNet-50's 25.56 M gradient elements as 161 .. 10,000 tensors
  monitor_params  reading an 8-layer MLP's gradients and weights, 2.2 K .. 33.6 M parameters

Before timing, PyTorch's batch norm and clipping must reproduce their conformance vectors (the
checks of side_by_side.py); the monitor has no PyTorch op, and its PyTorch column is the same
reading by hand with `torch._foreach_norm`. Not part of `cargo test` or CI.

    benches/pytorch/setup.sh
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 \\
        benches/pytorch/.venv/bin/python benches/pytorch/cost_curves.py [CURVE] [--seconds 1]
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_by_side as sbs  # noqa: E402  (exits 2 with the install commands without torch)

torch = sbs.torch
ROOT = sbs.ROOT

TITLES = {
    "bn_batch": ("Batch norm 2d training step, [N, 64, 28, 28]", "batch size N"),
    "bn_channels": ("Batch norm 2d training step, [32, C, 28, 28]", "channels C"),
    "clip_tensors": ("Clipping 25.56 M gradient elements by global L2 norm", "tensors"),
    "monitor_params": ("Reading an 8-layer MLP's gradients and weights", "parameters"),
}
CHECKS = {"bn_batch": sbs.check_batch_norm, "bn_channels": sbs.check_batch_norm,
          "clip_tensors": sbs.check_clip_grad}
COLORS = {"gradkit": "#1f77b4", "candle": "#d62728", "PyTorch": "#2ca02c"}


def clip_shapes(parts):
    shapes = json.loads((ROOT / "data" / "resnet50_shapes.json").read_text())["shapes"]
    if parts == len(shapes):
        return shapes
    total = sum(math.prod(s) for s in shapes)
    return [[total // parts]] * parts


def pytorch_run(curve, x):
    """The PyTorch function timed at point `x` of `curve`."""
    if curve == "bn_batch":
        return sbs.norm_step((x, 64, 28, 28), torch.nn.BatchNorm2d(64))
    if curve == "bn_channels":
        return sbs.norm_step((32, x, 28, 28), torch.nn.BatchNorm2d(x))
    if curve == "clip_tensors":
        params = [torch.nn.Parameter(torch.zeros(s)) for s in clip_shapes(x)]
        for p in params:
            p.grad = torch.randn(p.shape) * 1e-2
        return lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    if curve == "monitor_params":
        width = next(w for w in (16 << k for k in range(12)) if 8 * (w * w + w) == x)
        weights = [torch.randn(s) * 0.05 for _ in range(8) for s in ((width, width), (width,))]
        grads = [torch.randn(w.shape) for w in weights]

        def read():
            parts = (torch._foreach_norm(grads) + torch._foreach_norm(grads, math.inf)
                     + torch._foreach_norm(weights))
            return torch.stack(parts).tolist()

        return read
    raise SystemExit(f"cost_curves.py: unknown curve {curve}")


def rust_points(curve, seconds):
    cmd = ["cargo", "bench", "--quiet", "--bench", "curves", "--", "--curve", curve,
           "--seconds", str(seconds)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"cost_curves.py: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def svg(curve, series):
    """A log-log plot of `series` ({function: [(x, ms)]})."""
    title, xlabel = TITLES[curve]
    w, h, left, right, top, bottom = 640, 400, 70, 130, 40, 50
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    px = lambda x: left + (math.log10(x) - x0) / max(x1 - x0, 1e-9) * (w - left - right)
    py = lambda y: h - bottom - (math.log10(y) - y0) / max(y1 - y0, 1e-9) * (h - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    for e in range(y0, y1 + 1):
        y = py(10 ** e)
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="#ddd"/>')
        label = f"{10 ** e:g} ms"
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for x in sorted(set(xs)):
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{h - bottom}" '
                   f'stroke="#eee"/>')
        label = f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}K" if x >= 1e4 else f"{x}"
        out.append(f'<text x="{px(x):.1f}" y="{h - bottom + 16}" '
                   f'text-anchor="middle">{label}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" '
               f'text-anchor="middle">{xlabel} (log)</text>')
    for i, (name, pts) in enumerate(series.items()):
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline points="{path}" fill="none" stroke="{COLORS[name]}" '
                   f'stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" '
                       f'fill="{COLORS[name]}"/>')
        ly = top + 20 * i + 10
        out.append(f'<line x1="{w - right + 12}" x2="{w - right + 36}" y1="{ly}" y2="{ly}" '
                   f'stroke="{COLORS[name]}" stroke-width="2"/>')
        out.append(f'<text x="{w - right + 42}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("curve", nargs="?", default="", help="only this curve")
    parser.add_argument("--seconds", type=float, default=1.0, help="measurement time per point")
    args = parser.parse_args()
    curves = [c for c in TITLES if args.curve in ("", c)]
    if not curves:
        raise SystemExit(f"cost_curves.py: no curve {args.curve!r}")
    failures = []
    torch.set_default_dtype(torch.float64)
    for check in {CHECKS[c] for c in curves if c in CHECKS}:
        check(failures)
    torch.set_default_dtype(torch.float32)
    if failures:
        print("PyTorch's functions do not reproduce the conformance vectors; nothing timed:")
        for f in failures:
            print("  " + f)
        return 1
    data_file = ROOT / "docs" / "cost_curves.json"
    data = json.loads(data_file.read_text()) if data_file.exists() else {}
    for curve in curves:
        points = rust_points(curve, args.seconds)
        series = {"gradkit": [], "candle": [], "PyTorch": []}
        for p in points:
            series[p["function"]].append((p["x"], p["ms"]))
        for x, _ in series["gradkit"]:
            series["PyTorch"].append((x, sbs.torch_ms(pytorch_run(curve, x), args.seconds)))
        (ROOT / "docs" / f"cost_{curve}.svg").write_text(svg(curve, series))
        data[curve] = {name: [[x, round(ms, 4)] for x, ms in pts] for name, pts in series.items()}
        print(f"\n{TITLES[curve][0]}\n\n| {TITLES[curve][1]} | gradkit | candle | PyTorch "
              f"| gradkit / PyTorch |\n|---|---|---|---|---|")
        for (x, a), (_, b), (_, c) in zip(*series.values()):
            print(f"| {x} | {a:.3g} ms | {b:.3g} ms | {c:.3g} ms | {a / c:.2f} |", flush=True)
    data_file.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
