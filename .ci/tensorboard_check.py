"""Reads a gradkit TensorBoard event file back with TensorBoard's own reader (the event
accumulator) and checks every tag, step and value against the run's JSON Lines log.

    python .ci/tensorboard_check.py LOGDIR      (LOGDIR holds events.out.tfevents.* and log.jsonl)
"""

import json
import math
import struct
import sys

from tensorboard.backend.event_processing import event_accumulator as ea


def num(v):
    if isinstance(v, str):
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[v]
    return float(v)


def f32(v):
    return struct.unpack("f", struct.pack("f", v))[0]


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def main(logdir):
    acc = ea.EventAccumulator(logdir, size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    records = [json.loads(line) for line in open(f"{logdir}/log.jsonl") if line.strip()]
    scalars, histograms = {}, {}
    for r in records:
        step = r["step"]

        def scalar(tag, v):
            scalars.setdefault(tag, []).append((step, f32(num(v))))

        if r.get("loss") is not None:
            scalar("loss", r["loss"])
        if r.get("learning_rate") is not None:
            scalar("learning_rate", r["learning_rate"])
        scalar("grad_norm/global", r["global_grad_norm"])
        for l in r["layers"]:
            scalar(f"grad_norm/{l['name']}", l["grad_norm"])
            if l.get("update_ratio") is not None:
                scalar(f"update_ratio/{l['name']}", l["update_ratio"])
            if l["non_finite"] > 0:
                scalar(f"grad_non_finite/{l['name']}", l["non_finite"])
        if r.get("clip") is not None:
            c = r["clip"]
            scalar("clip/total_norm", c["total_norm"])
            scalar("clip/clipped", float(c["clipped"]))
            scalar("clip/skipped", float(c["skipped"]))
        for l in r["layers"]:
            for tag, h in [
                (f"grad_abs/{l['name']}", l["grad_histogram"]),
                (f"update_ratio_elements/{l['name']}", l.get("update_histogram")),
            ]:
                if h is None:
                    continue
                bins = [0] * 54
                for k, c in enumerate(h.get("counts", [])):
                    bins[h.get("lo", 0) + k] = c
                histograms.setdefault(tag, []).append((step, [h.get("zero", 0)] + bins))

    tags = acc.Tags()
    errors = []
    if set(tags["scalars"]) != set(scalars):
        errors.append(f"scalar tags differ: {sorted(set(tags['scalars']) ^ set(scalars))}")
    if set(tags["histograms"]) != set(histograms):
        errors.append(f"histogram tags differ: {sorted(set(tags['histograms']) ^ set(histograms))}")
    checked = 0
    for tag, want in scalars.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)] if tag in tags["scalars"] else []
        if len(got) != len(want):
            errors.append(f"{tag}: {len(got)} events, expected {len(want)}")
            continue
        for (gs, gv), (ws, wv) in zip(got, want):
            checked += 1
            if gs != ws or not same(gv, wv):
                errors.append(f"{tag}: step {gs} value {gv}, expected step {ws} value {wv}")
    for tag, want in histograms.items():
        got = acc.Histograms(tag) if tag in tags["histograms"] else []
        if len(got) != len(want):
            errors.append(f"{tag}: {len(got)} histograms, expected {len(want)}")
            continue
        for event, (ws, counts) in zip(got, want):
            checked += 1
            h = event.histogram_value
            buckets = [int(b) for b in h.bucket]
            if event.step != ws or buckets != counts or h.num != sum(counts):
                errors.append(f"{tag}: step {event.step} buckets {buckets}, expected {counts}")
            if h.bucket_limit[0] != 0.0 or abs(h.bucket_limit[1] - 2.0 ** -39) > 0:
                errors.append(f"{tag}: bucket limits start {list(h.bucket_limit[:2])}")
    for e in errors[:20]:
        print("error:", e)
    if errors:
        print(f"{len(errors)} mismatch(es)")
        sys.exit(1)
    print(
        f"tensorboard read-back: {len(scalars)} scalar tags, {len(histograms)} histogram tags, "
        f"{len(records)} steps, {checked} events checked, all equal"
    )


if __name__ == "__main__":
    main(sys.argv[1])
