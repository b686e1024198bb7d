"""
The results of reproduce.py's tables: reproduce.py collects the finished runs of a table (with --report only
those, running nothing) and `write` turns them into one set of files per table and scale: per row the mean ± std
over its seeds of every probe's metric, the paired difference to its reference row seed by seed with its sign
count, the poster's number where it gives one, and where each seed's pretraining ran. Here too what the probes
score (PROBES: each probe's script, result file and metrics, by which reproduce.py runs and reads them) and the
poster's numbers (POSTER).

    <out-dir>/results_<table>_<preset>.md    the table and the paired differences (--quick: results_quick.*)
    <out-dir>/results_<table>_<preset>.json  per row its summary; the args; every run's metrics and provenance
    <out-dir>/results_<table>_<preset>.png   visualize.py's picture: a bar per row, or for lambda, negatives and
                                             recon the poster's figure: the metric over the swept value
"""
import json
import math
import os
import re
import statistics

import visualize

POSTER = {  # (table, row) -> {metric: the poster's number}: COCO mAP and F1, VOC and COCO mIoU
    ("main", "SimCLR cls"): {"mAP": 59.6, "F1": 37.8},
    ("main", "SimCLR gap"): {"VOC mIoU": 69.3, "COCO mIoU": 61.5},
    ("main", "DenseCL cls"): {"mAP": 59.9, "F1": 38.1},
    ("main", "DenseCL++ gap"): {"mAP": 63.4, "F1": 39.0, "VOC mIoU": 70.0, "COCO mIoU": 63.3},
    ("main", "DenseCL++* gap"): {"mAP": 64.1, "F1": 39.1},
    ("agg-pair", "SimCLR cls"): {"mAP": 57.8, "F1": 37.5}, ("agg-pair", "SimCLR gap"): {"mAP": 59.6, "F1": 37.9},
    ("agg-pair", "DenseCL cls backbone"): {"mAP": 59.9, "F1": 38.1},
    ("agg-pair", "DenseCL cls head"): {"mAP": 59.8, "F1": 38.1}, ("agg-pair", "DenseCL gap"): {"mAP": 58.1, "F1": 37.3}}
# probe -> (script, result file, {our metric name (%): (key in its JSON, factor to %)}, the poster's metric)
PROBES = {"ml": ("probe_multilabel.py", "ml.json", {"mAP": ("mAP", 1), "CF1": ("CF1", 1), "OF1": ("OF1", 1)}, "mAP"),
          "seg": ("probe_segment.py", "seg.json", {"mIoU": ("mIoU", 1)}, "VOC mIoU"),
          "det": ("probe_detect.py", "det.json", {"AP": ("box_AP", 1), "AP50": ("box_AP50", 1)}, None),
          "diag": ("diagnose.py", "diag.json", {"match": ("match_acc", 100), "hubs": ("hub_share", 100),
                                                "attn J": ("attn_jaccard", 100)}, None)}


def mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a, b):
    """{metric: (mean, std, seeds with a positive difference, seeds)} of a - b over the seeds both have."""
    out = {}
    for m in metric_names(a, b):
        d = [a[s][m] - b[s][m] for s in sorted(set(a) & set(b)) if a[s].get(m) is not None and
             b[s].get(m) is not None]
        if d:
            mean, std = mean_std(d)
            out[m] = (mean, std, sum(x > 0 for x in d), len(d))
    return out


def metric_names(*runs):
    names = [m for p in PROBES.values() for m in p[2]]
    return [m for m in names if any(r.get(m) is not None for per in runs for r in per.values())]


def summarise(table, rows, runs):
    """Per row: mean and std over its finished seeds of every metric, the paired difference to its reference
    row, the poster's numbers, the flags and the provenance of each seed."""
    ok = {name: {s: r for s, r in per.items() if "error" not in r} for name, per in runs.items()}
    out = []
    for name, flags, ref in rows:
        entry = {"row": name, "flags": flags, "reference": ref, "seeds": sorted(ok[name]),
                 "errors": {s: r["error"] for s, r in runs[name].items() if "error" in r},
                 "poster": POSTER.get((table, name), {}),
                 "provenance": {s: r["provenance"] for s, r in ok[name].items()}}
        entry["n"] = {}
        for m in metric_names(ok[name]):
            values = [r[m] for r in ok[name].values() if r.get(m) is not None]
            entry[m], entry["n"][m] = mean_std(values), len(values)
        entry["paired"] = paired(ok[name], ok[ref]) if ref else {}
        out.append(entry)
    return out


def fmt(ms, n=None, seeds=None):
    """mean ± std, with the number of seeds where fewer than the row's have this metric (a probe still
    running)."""
    if ms is None or ms[0] is None:
        return "-"
    return f"{ms[0]:.1f} ± {ms[1]:.1f}" + (f" (n={n})" if n is not None and seeds and n < seeds else "")


def fmt_paired(p):
    return "-" if p is None else f"{p[0]:+.1f} ± {p[1]:.1f} ({p[2]}/{p[3]} > 0)"


def markdown(table, summary, args):
    metrics = [m for m in (m for p in PROBES.values() for m in p[2]) if any(m in e for e in summary)]
    commits = {}
    for e in summary:
        for per in e["provenance"].values():
            for a in per["pretrain"]:
                tag = (a.get("commit") or "?")[:7] + (" (uncommitted changes)" if a.get("dirty") else "")
                commits.setdefault(tag, set()).add(f"{a.get('host')}: {a.get('cpu')}" +
                                                   (f", {a['gpu']}" if a.get("gpu") else ""))
    lines = [f"# reproduce.py --table {table} --preset {args.preset}" + (" --quick" if args.quick else ""), "",
             f"mean ± std over the seeds of each row (std of the sample); pretraining data "
             f"{args.data or 'the preset set'}; probes {' '.join(args.probes)}. Poster: its number for the "
             f"same row where it gives one (COCO, ViT-S/16). Pretraining ran at: "
             + "; ".join(f"{c} on {', '.join(sorted(m))}" for c, m in sorted(commits.items())) + ".", "",
             "| row | seeds | " + " | ".join(metrics) + " | poster | pretrain.py flags |",
             "|---|---|" + "---|" * len(metrics) + "---|---|"]
    for e in summary:
        poster = ", ".join(f"{k} {v}" for k, v in e["poster"].items()) or "-"
        flags = "random init" if e["flags"] is None else f"`{' '.join(e['flags'])}`"
        lines.append(f"| {e['row']} | {len(e['seeds'])} | " +
                     " | ".join(fmt(e.get(m), e["n"].get(m), len(e["seeds"])) for m in metrics) +
                     f" | {poster} | {flags} |")
        for seed, err in e["errors"].items():
            lines.append(f"|   seed {seed}: {err} |" + " |" * (len(metrics) + 3))
    lines += ["", "Paired differences to the reference row, seed by seed (a seed fixes the initialisation and "
              "the augmentation draws): mean ± std of the differences, (k/n > 0) = k of the n seeds both "
              "rows have are above the reference.", "",
              "| row | reference | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for e in summary:
        if e["reference"]:
            lines.append(f"| {e['row']} | {e['reference']} | " +
                         " | ".join(fmt_paired(e["paired"].get(m)) for m in metrics) + " |")
    if table == "negatives":
        lines += ["", "Averaged mAP over the grid (each value of one factor, the others averaged):", ""]
        for factor in ("M", "beta", "N"):
            means = {}
            for e in summary:
                v = re.search(rf"{factor} ([0-9.]+)", e["row"]).group(1)
                if e.get("mAP", (None,))[0] is not None:
                    means.setdefault(v, []).append(e["mAP"][0])
            lines.append(f"- {factor}: " + ", ".join(f"{v}: {fmt(mean_std(m))} ({len(m)} configurations)"
                                                     for v, m in means.items()))
    return "\n".join(lines) + "\n"


def results_base(args):
    """<out-dir>/results_<table>_<preset> (--quick: results_quick): one set of files per table and scale."""
    return os.path.join(args.out_dir, "results_" + ("quick" if args.quick else f"{args.table}_{args.preset}"))



def write(args, table, rows, runs):
    """Summarise the runs ({row: {seed: its metrics and provenance, or an error}}) of the table's rows and write
    <results_base>.json, .md and .png; returns the base."""
    summary = summarise(args.table, rows, runs)
    for e in summary:
        e["values"] = {m: [runs[e["row"]][s][m] for s in e["seeds"] if runs[e["row"]][s].get(m) is not None]
                       for m in metric_names({s: runs[e["row"]][s] for s in e["seeds"]})}
    summary = [e for e in summary if e["seeds"] or e["errors"]]
    base = results_base(args)
    with open(base + ".json", "w") as f:
        json.dump({"table": table, "args": {k: v for k, v in vars(args).items()}, "rows": summary,
                   "runs": {n: per for n, per in runs.items() if per}}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(table, summary, args))
    title = f"reproduce.py --table {table} --preset {args.preset}"
    picture = visualize.sweep_picture(args.table, summary, title) if args.table in ("lambda", "negatives", "recon") \
        and not args.quick else visualize.results_picture(summary, title)
    picture.save(base + ".png")
    return base
