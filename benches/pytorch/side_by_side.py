"""gradkit's criterion groups side by side with PyTorch's CPU on the same workloads.

Each workload is a criterion group of the benches: the same shapes, dtype (f32), thread count
(2) and step (forward, then the backward of `(y * upstream).sum()` to the input and every
parameter, as benches/common/step.rs defines it). For each group the script runs the criterion
bench's `gradkit` function, then the PyTorch version, `--rounds` times in turn, so each ratio
comes from one stretch of this noisy machine. It prints a Markdown table: gradkit's mean, PyTorch's
median, and their ratio per round.

Before any timing, every PyTorch function timed is run on its op's PyTorch conformance vectors
(conformance/*.json, the golden values gradkit's conformance tests pass on both of its paths) and
must reproduce them, so gradkit and PyTorch are timed on the same computation. A mismatch stops
the script with exit status 1, and nothing is timed.

Run (not part of `cargo test` or CI):

    benches/pytorch/setup.sh
    benches/pytorch/.venv/bin/python benches/pytorch/side_by_side.py            # every group
    benches/pytorch/.venv/bin/python benches/pytorch/side_by_side.py batch_norm  # groups matching
    benches/pytorch/.venv/bin/python benches/pytorch/side_by_side.py --check-only

Without PyTorch installed it says how to install it and exits with status 2.
"""

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.stderr.write(
        "side_by_side.py: PyTorch is not installed for this Python.\n"
        "Install it into the bench venv and run the script with that venv's Python:\n"
        "    benches/pytorch/setup.sh\n"
        "    benches/pytorch/.venv/bin/python benches/pytorch/side_by_side.py\n"
    )
    sys.exit(2)

THREADS = 2
torch.set_num_threads(THREADS)


# ---------------------------------------------------------------- conformance: the same op


def tensor(spec, dtype=torch.float64):
    data = [float(v) if isinstance(v, str) else v for v in spec["data"]]
    if spec["dtype"] == "i64":
        return torch.tensor(data, dtype=torch.int64).reshape(spec["shape"])
    return torch.tensor(data, dtype=dtype).reshape(spec["shape"])


def close(got, spec, name, failures, case):
    want = tensor(spec).to(got.dtype) if spec["dtype"] != "i64" else tensor(spec)
    got = got.detach()
    if got.shape != want.shape:
        failures.append(f"{case}: {name} has shape {list(got.shape)}, expected {spec['shape']}")
        return
    if spec["dtype"] == "i64":
        ok = torch.equal(got.to(torch.int64), want)
    else:
        ok = torch.allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True)
    if not ok:
        failures.append(f"{case}: {name} differs from the golden value")


def cases(op):
    data = json.loads((ROOT / "conformance" / f"{op}.json").read_text())
    return [c for c in data["cases"] if "error" not in c["expected"]]


def with_grads(inputs, names):
    out = {}
    for k, v in inputs.items():
        t = tensor(v)
        if k in names:
            t.requires_grad_(True)
        out[k] = t
    return out


def compare_grads(t, case, failures):
    for name, spec in case["expected"].items():
        if name.startswith("grad_"):
            g = t[name[5:]].grad
            if g is None:
                failures.append(f"{case['name']}: no gradient for {name[5:]}")
            else:
                close(g, spec, name, failures, case["name"])


def check_batch_norm(failures):
    for c in cases("batch_norm"):
        a = c["attrs"]
        t = with_grads(c["inputs"], {"x", "weight", "bias"})
        rank = t["x"].dim()
        module = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                  5: torch.nn.BatchNorm3d}[rank]
        m = module(t["x"].shape[1], eps=a["eps"], momentum=a["momentum"], affine=a["affine"],
                   dtype=torch.float64)
        with torch.no_grad():
            m.running_mean.copy_(t["running_mean"])
            m.running_var.copy_(t["running_var"])
            m.num_batches_tracked.copy_(t["num_batches_tracked"].reshape(()))
        if a["affine"]:
            m.weight = torch.nn.Parameter(t["weight"])
            m.bias = torch.nn.Parameter(t["bias"])
            t["weight"], t["bias"] = m.weight, m.bias
        m.train(a["training"])
        y = m(t["x"])
        y.backward(t["grad_output"])
        close(y, c["expected"]["y"], "y", failures, c["name"])
        close(m.running_mean, c["expected"]["running_mean"], "running_mean", failures, c["name"])
        close(m.running_var, c["expected"]["running_var"], "running_var", failures, c["name"])
        compare_grads(t, c, failures)


def check_functional(op, forward, grads=("x", "weight", "bias"), output="y", select=None):
    """A check of `op`'s conformance cases (those `select(attrs)` keeps): `forward(t, attrs)`
    on the case's inputs `t`, its backward of `grad_output`, the output and every gradient
    compared with the golden values. No selected case is a failure too."""

    def check(failures):
        found = 0
        for c in cases(op):
            a = c["attrs"]
            if select is not None and not select(a):
                continue
            found += 1
            t = with_grads(c["inputs"], set(grads))
            y = forward(t, a)
            y.backward(t["grad_output"])
            close(y, c["expected"][output], output, failures, c["name"])
            compare_grads(t, c, failures)
        if found == 0:
            failures.append(f"{op}: no conformance case selected")

    return check


def trailing(t, a):
    """The normalised shape: the last `normalized_ndim` dims of x."""
    return t["x"].shape[-a["normalized_ndim"]:]


check_layer_norm = check_functional(
    "layer_norm",
    lambda t, a: F.layer_norm(t["x"], trailing(t, a), t.get("weight"), t.get("bias"), a["eps"]))
check_group_norm = check_functional(
    "group_norm",
    lambda t, a: F.group_norm(t["x"], a["num_groups"], t.get("weight"), t.get("bias"), a["eps"]))
check_rms_norm = check_functional(
    "rms_norm",
    lambda t, a: F.rms_norm(t["x"], trailing(t, a), t.get("weight"), a["eps"]))


ACTIVATIONS = {
    "leaky_relu": lambda a: lambda x: F.leaky_relu(x, a["negative_slope"]),
    "elu": lambda a: lambda x: F.elu(x, a["alpha"]),
    "selu": lambda a: F.selu,
    "gelu": lambda a: lambda x: F.gelu(x, approximate=a["approximate"]),
    "relu": lambda a: F.relu,
    "relu6": lambda a: F.relu6,
    "sigmoid": lambda a: torch.sigmoid,
    "tanh": lambda a: torch.tanh,
    "silu": lambda a: F.silu,
    "mish": lambda a: F.mish,
    "softplus": lambda a: lambda x: F.softplus(x, a["beta"], a["threshold"]),
    "hardswish": lambda a: F.hardswish,
    "hardsigmoid": lambda a: F.hardsigmoid,
    "hardtanh": lambda a: lambda x: F.hardtanh(x, a["min_val"], a["max_val"]),
    "celu": lambda a: lambda x: F.celu(x, a["alpha"]),
    "softsign": lambda a: F.softsign,
    "logsigmoid": lambda a: F.logsigmoid,
}


def check_activation(name):
    return check_functional(
        "activations", lambda t, a: ACTIVATIONS[name](a)(t["x"]), grads=("x",),
        select=lambda a: a["activation"] == name)


check_cross_entropy = check_functional(
    "cross_entropy",
    lambda t, a: F.cross_entropy(t["logits"], t["target"], weight=t.get("weight"),
                                 ignore_index=a["ignore_index"], reduction=a["reduction"],
                                 label_smoothing=a["label_smoothing"]),
    grads=("logits",), output="loss")


def check_clip_grad(failures):
    for c in cases("clip_grad"):
        a = c["attrs"]
        if a["kind"] != "norm":
            continue
        grads = [tensor(c["inputs"][f"g{i}"]) for i in range(len(c["inputs"]))]
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        norm_type = math.inf if a["norm_type"] == "inf" else a["norm_type"]
        total = torch.nn.utils.clip_grad_norm_(params, a["max_norm"], norm_type=norm_type,
                                               error_if_nonfinite=a["error_if_nonfinite"],
                                               foreach=True)
        close(total, c["expected"]["total_norm"], "total_norm", failures, c["name"])
        for i, p in enumerate(params):
            close(p.grad, c["expected"][f"g{i}"], f"g{i}", failures, c["name"])


def check_dropout(failures):
    # No conformance file: check the semantics gradkit's dropout tests use. A fraction p of
    # the elements is zeroed (within 6 standard errors), the rest are x / (1 - p), and the
    # backward applies the same mask.
    p, n = 0.5, 1 << 20
    x = torch.randn(n, requires_grad=True)
    y = F.dropout(x, p, training=True)
    y.backward(torch.ones(n))
    zero = (y == 0).double().mean().item()
    if abs(zero - p) > 6 * math.sqrt(p * (1 - p) / n):
        failures.append(f"dropout: {zero:.4f} of the elements zeroed, expected {p}")
    kept = y != 0
    if not torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6):
        failures.append("dropout: kept elements are not x / (1 - p)")
    if not torch.equal(x.grad != 0, kept):
        failures.append("dropout: the backward's mask differs from the forward's")


def check_instance_norm(failures):
    for c in cases("instance_norm"):
        a = c["attrs"]
        t = with_grads(c["inputs"], {"x", "weight", "bias"})
        rank = t["x"].dim()
        module = {2: torch.nn.InstanceNorm1d, 3: torch.nn.InstanceNorm1d,
                  4: torch.nn.InstanceNorm2d, 5: torch.nn.InstanceNorm3d}[rank]
        channels = t["x"].shape[0 if rank == 2 else 1]
        m = module(channels, eps=a["eps"], momentum=a["momentum"], affine=a["affine"],
                   track_running_stats=a["track_running_stats"], dtype=torch.float64)
        if a["affine"]:
            m.weight = torch.nn.Parameter(t["weight"])
            m.bias = torch.nn.Parameter(t["bias"])
            t["weight"], t["bias"] = m.weight, m.bias
        if a["track_running_stats"]:
            with torch.no_grad():
                m.running_mean.copy_(t["running_mean"])
                m.running_var.copy_(t["running_var"])
        m.train(a["training"])
        y = m(t["x"])
        y.backward(t["grad_output"])
        close(y, c["expected"]["y"], "y", failures, c["name"])
        for name in ("running_mean", "running_var"):
            if name in c["expected"]:
                close(getattr(m, name), c["expected"][name], name, failures, c["name"])
        compare_grads(t, c, failures)


def check_channel_scale(failures):
    # No conformance file: the scale is a broadcast product over the last axis, and its
    # gradient with respect to the scale is the sum of upstream * x over the other axes.
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    g = torch.randn(5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 4, 5, dtype=torch.float64)
    (x * g * up).sum().backward()
    want = torch.stack([x[..., k] * g.detach()[k] for k in range(5)], dim=-1)
    if not torch.allclose(x * g.detach(), want):
        failures.append("channel_scale: x * gamma is not the per-channel product")
    if not torch.allclose(g.grad, (up * x).sum(dim=(0, 1))):
        failures.append("channel_scale: the scale's gradient is not sum(upstream * x)")


def check_block(failures):
    # The block's parts: batch norm, leaky ReLU and dropout.
    check_batch_norm(failures)
    check_activation("leaky_relu")(failures)
    check_dropout(failures)


def check_group_block(failures):
    # The group-norm block's parts: group norm, SiLU and dropout.
    check_group_norm(failures)
    check_activation("silu")(failures)
    check_dropout(failures)


def check_layer_block(failures):
    # The layer-norm block's parts: layer norm, GELU and dropout.
    check_layer_norm(failures)
    check_activation("gelu")(failures)
    check_dropout(failures)


# ---------------------------------------------------------------------- the timed workloads


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def step(forward, x, params, up):
    """The benches' training step: forward, then backward of (y * up).sum()."""
    x.grad = None
    for p in params:
        p.grad = None
    (forward(x) * up).sum().backward()


def norm_step(shape, module):
    x = randn(*shape).requires_grad_(True)
    up = randn(*shape)
    params = list(module.parameters())
    return lambda: step(module, x, params, up)


def functional_step(shape, f, param_shapes=()):
    x = randn(*shape).requires_grad_(True)
    up = randn(*shape)
    params = [torch.ones(s, requires_grad=True) for s in param_shapes]
    return lambda: step(lambda t: f(t, *params), x, params, up)


def forward_only(f):
    x = randn(16 * 1024 * 1024)
    return lambda: f(x)


def cross_entropy_step(n, classes):
    logits = (randn(n, classes) * 3.0).requires_grad_(True)
    target = torch.tensor([(i * 7919) % classes for i in range(n)])

    def run():
        logits.grad = None
        F.cross_entropy(logits, target, label_smoothing=0.1).backward()

    return run


def clip_resnet50():
    shapes = json.loads((ROOT / "data" / "resnet50_shapes.json").read_text())["shapes"]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-2

    def run():
        # The first call scales the gradients to norm 1; later calls still read them all and
        # multiply by the clamped coefficient (1), in place: the same work on every call, and
        # no copy inside the timing (criterion's gradkit function copies outside it too).
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)

    return run


ACT_16M = {
    "relu6/16M": ("relu6", F.relu6),
    "sigmoid/16M": ("sigmoid", torch.sigmoid),
    "tanh/16M": ("tanh", torch.tanh),
    "silu/16M": ("silu", F.silu),
    "gelu/16M": ("gelu", F.gelu),
    "gelu_tanh/16M": ("gelu", lambda x: F.gelu(x, approximate="tanh")),
    "elu/16M": ("elu", F.elu),
    "selu/16M": ("selu", F.selu),
    "mish/16M": ("mish", F.mish),
    "hardswish/16M": ("hardswish", F.hardswish),
    "hardsigmoid/16M": ("hardsigmoid", F.hardsigmoid),
    "hardtanh/16M": ("hardtanh", F.hardtanh),
    "celu/16M": ("celu", F.celu),
    "softsign/16M": ("softsign", F.softsign),
    "log_sigmoid/16M": ("logsigmoid", F.logsigmoid),
    "leaky_relu/16M": ("leaky_relu", lambda x: F.leaky_relu(x, 0.01)),
    "softplus/16M": ("softplus", F.softplus),
}


def total_norm_resnet50():
    shapes = json.loads((ROOT / "data" / "resnet50_shapes.json").read_text())["shapes"]
    grads = [torch.randn(s) * 1e-2 for s in shapes]
    return lambda: torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)


def eval_step(shape, module):
    x = randn(*shape)
    module.eval()

    def run():
        with torch.no_grad():
            return module(x)

    return run


def layer_scale_forward():
    x = randn(16 * 1024, 1024)
    gamma = torch.full((1024,), 1e-5)
    return lambda: x * gamma


def workloads():
    """(criterion group, bench, conformance check, maker of the PyTorch step)."""
    out = [
        ("batch_norm2d_train/32x64x56x56", "norms", check_batch_norm,
         lambda: norm_step((32, 64, 56, 56), torch.nn.BatchNorm2d(64))),
        ("fused_block/bn2d_leaky_dropout/32x64x56x56", "norms", check_block,
         lambda: norm_step((32, 64, 56, 56), torch.nn.Sequential(
             torch.nn.BatchNorm2d(64), torch.nn.LeakyReLU(0.01), torch.nn.Dropout(0.2)))),
        ("fused_block/gn_silu_dropout/32x256x28x28", "norms", check_group_block,
         lambda: norm_step((32, 256, 28, 28), torch.nn.Sequential(
             torch.nn.GroupNorm(32, 256), torch.nn.SiLU(), torch.nn.Dropout(0.1)))),
        ("fused_block/ln_gelu_dropout/4096x1024", "norms", check_layer_block,
         lambda: norm_step((4096, 1024), torch.nn.Sequential(
             torch.nn.LayerNorm(1024), torch.nn.GELU(), torch.nn.Dropout(0.1)))),
        ("batch_norm2d_eval/32x64x56x56", "norms", check_batch_norm,
         lambda: eval_step((32, 64, 56, 56), torch.nn.BatchNorm2d(64))),
        ("instance_norm_train/32x64x56x56", "norms", check_instance_norm,
         lambda: norm_step((32, 64, 56, 56), torch.nn.InstanceNorm2d(64, affine=True))),
        ("instance_norm_train_tracked/32x64x56x56", "norms", check_instance_norm,
         lambda: norm_step((32, 64, 56, 56),
                           torch.nn.InstanceNorm2d(64, affine=True, track_running_stats=True))),
        ("global_norm/resnet50", "global_norm", check_clip_grad, total_norm_resnet50),
        ("layer_scale/16M", "activations", check_channel_scale, layer_scale_forward),
        ("layer_scale_fwdbwd/32x196x384", "activations", check_channel_scale,
         lambda: functional_step((32, 196, 384), lambda t, g: t * g, [(384,)])),
        ("rezero_fwdbwd/32x196x384", "activations", check_channel_scale,
         lambda: functional_step((32, 196, 384), lambda t, a: t * a, [()])),
        ("batch_norm1d_train/512x1024", "norms", check_batch_norm,
         lambda: norm_step((512, 1024), torch.nn.BatchNorm1d(1024))),
        ("layer_norm_train/4096x1024", "norms", check_layer_norm,
         lambda: norm_step((4096, 1024), torch.nn.LayerNorm(1024))),
        ("group_norm_train/32x256x28x28", "norms", check_group_norm,
         lambda: norm_step((32, 256, 28, 28), torch.nn.GroupNorm(32, 256))),
        ("rms_norm_train/4096x4096", "norms", check_rms_norm,
         lambda: functional_step((4096, 4096), lambda t, w: F.rms_norm(t, (4096,), w, 1e-6),
                                 [(4096,)])),
        ("dropout_train/16M", "activations", check_dropout,
         lambda: forward_only(lambda x: F.dropout(x, 0.5, training=True))),
        ("dropout_train_fwdbwd/16M", "activations", check_dropout,
         lambda: functional_step((16 * 1024 * 1024,), lambda t: F.dropout(t, 0.5, training=True))),
        ("leaky_relu_fwdbwd/16M", "activations", check_activation("leaky_relu"),
         lambda: functional_step((16 * 1024 * 1024,), lambda t: F.leaky_relu(t, 0.01))),
        ("gelu_fwdbwd/16M", "activations", check_activation("gelu"),
         lambda: functional_step((16 * 1024 * 1024,), F.gelu)),
        ("clip_grad_norm/resnet50", "regularize", check_clip_grad, clip_resnet50),
        ("cross_entropy_ls_fwdbwd/4096x1000", "regularize", check_cross_entropy,
         lambda: cross_entropy_step(4096, 1000)),
        ("cross_entropy_ls_fwdbwd/512x32000", "regularize", check_cross_entropy,
         lambda: cross_entropy_step(512, 32000)),
    ]
    for group, (name, f) in ACT_16M.items():
        out.append((group, "activations", check_activation(name),
                    lambda f=f: forward_only(f)))
    return out


# ------------------------------------------------------------------------------- timing


UNITS = {"ps": 1e-9, "ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def criterion_ms(bench, group, seconds):
    """criterion's mean estimate of `group/gradkit` in milliseconds."""
    pattern = "^" + re.escape(group) + "/gradkit$"
    cmd = ["cargo", "bench", "--quiet", "--bench", bench, "--", "--warm-up-time", "1",
           "--measurement-time", str(seconds), "--noplot", pattern]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"side_by_side.py: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", out.stdout)
    if not m:
        raise SystemExit(f"side_by_side.py: no criterion time for {group} in:\n{out.stdout}")
    return float(m.group(1)) * UNITS[m.group(2)]


def torch_ms(run, seconds):
    """PyTorch's median time per call over ten samples, after a second of warm-up."""
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        run()
    samples = []
    per_sample = seconds / 10
    for _ in range(10):
        calls, start = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= per_sample:
                break
        samples.append(elapsed / calls * 1e3)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("filter", nargs="?", default="", help="run the groups containing this")
    parser.add_argument("--rounds", type=int, default=2, help="gradkit/PyTorch pairs per group")
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement time per side")
    parser.add_argument("--check-only", action="store_true", help="only the conformance checks")
    args = parser.parse_args()
    chosen = [w for w in workloads() if args.filter in w[0]]
    if not chosen:
        raise SystemExit(f"side_by_side.py: no group matches {args.filter!r}")

    # The same op on both sides, or nothing is timed.
    failures, checked = [], set()
    for group, _, check, _ in chosen:
        if check in checked:
            continue
        checked.add(check)
        torch.set_default_dtype(torch.float64)
        try:
            check(failures)
        finally:
            torch.set_default_dtype(torch.float32)
    if failures:
        print("PyTorch's functions do not reproduce the conformance vectors; nothing timed:")
        for f in failures:
            print("  " + f)
        return 1
    print(f"torch {torch.__version__}, {THREADS} threads: every PyTorch function timed "
          f"reproduces its conformance vectors ({len(checked)} checks)")
    if args.check_only:
        return 0

    print("\n| group | gradkit | PyTorch | gradkit / PyTorch |\n|---|---|---|---|")
    for group, bench, _, make in chosen:
        run = make()
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(criterion_ms(bench, group, args.seconds))
            theirs.append(torch_ms(run, args.seconds))
        fmt = lambda v: ", ".join(f"{x:.3g} ms" for x in v)
        ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(ours, theirs))
        print(f"| {group} | {fmt(ours)} | {fmt(theirs)} | {ratios} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
