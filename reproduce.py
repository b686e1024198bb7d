"""
Run the DenseCL++ poster's tables end to end: pretraining of every row and seed, both probes, one results
table.

    python reproduce.py --table main --seeds 0 1 2                 # the demo set (data/demo), CPU-sized
    python reproduce.py --quick                                    # a tiny two-row table in a few CPU minutes
    python reproduce.py --table main --seeds 0 1 2 --preset coco \\
        --data coco/annotations/instances_train2017.json \\
        --train-json coco/annotations/instances_train2017.json --train-images coco/train2017 \\
        --val-json coco/annotations/instances_val2017.json --val-images coco/val2017 \\
        --seg-root VOCdevkit/VOC2012

Tables (METHOD.md; the poster's numbers beside ours where it gives them):
    main       SimCLR, DenseCL, DenseCL++ (random), guided, DenseCL++* (M 256, beta 0.5, N 64); CLS and GAP
    agg-pair   the poster's first table: SimCLR at CLS / GAP, DenseCL with CLS + backbone / head pairing, GAP
    lambda     DenseCL++ at lam 0.1 ... 0.9, CLS and GAP
    negatives  DenseCL++ guided over the 3 x 3 x 4 grid M x beta x N (the poster averages mAP over it)
    recon      DenseCL++ at gamma 0, 0.1, 0.5, 1 with the conv and the transformer decoder

Every run lives in its own folder under --out-dir (<row>/seed<k>/: pretrain/, ml.json, seg.json). A finished
step is skipped and an interrupted pretraining resumed (--resume), so the same command continues a stopped
table. Pretraining starts as users start it: `python pretrain.py ...`, or `torchrun --nproc_per_node N
pretrain.py ...` when N > 1.
Writes <out-dir>/results.md, results.json and one PNG plot per table (drawn with PIL).
"""
import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from PIL import Image, ImageDraw

import demo

HERE = os.path.dirname(os.path.abspath(__file__))
DENSECLPP = ["--neg", "random", "--N", "0"]  # the poster's DenseCL++ row: dense-dense random negatives
TOKENS = {"demo": 64, "demo-large": 64, "coco": 196, "quick": 16}  # patch tokens a view at each scale
# --preset demo-large: a demo set 5x larger, 10x the validation images
LARGE = ("data/demo_large", 2000, 1000)
POSTER = {  # (table, row) -> (COCO mAP, F1, VOC mIoU, COCO mIoU), None where the poster gives no number
    ("main", "SimCLR cls"): (59.6, 37.8, None, None), ("main", "SimCLR gap"): (None, None, 69.3, 61.5),
    ("main", "DenseCL cls"): (59.9, 38.1, None, None), ("main", "DenseCL++ gap"): (63.4, 39.0, 70.0, 63.3),
    ("main", "DenseCL++* gap"): (64.1, 39.1, None, None),
    ("agg-pair", "SimCLR cls"): (57.8, 37.5, None, None),
    ("agg-pair", "SimCLR gap"): (59.6, 37.9, None, None),
    ("agg-pair", "DenseCL cls backbone"): (59.9, 38.1, None, None),
    ("agg-pair", "DenseCL cls head"): (59.8, 38.1, None, None),
    ("agg-pair", "DenseCL gap"): (58.1, 37.3, None, None)}
PRESETS = {  # pretraining flags of the scale (the demo's come from pretrain.py's own demo preset; demo-large
    # trains on its own generated set, the default of --data)
    "demo": [],
    "demo-large": ["--model", "vit_demo", "--img-size", "64", "--batch-size", "64", "--epochs", "20",
                   "--lr", "1e-3", "--warmup", "2", "--wd", "0.05", "--head-hidden", "512", "--workers", "2"],
    "coco": ["--model", "vit_small", "--img-size", "224", "--batch-size", "32", "--epochs", "300",
             "--lr", "1.5e-4"],
    "quick": ["--model", "vit_test", "--img-size", "32", "--head-hidden", "64", "--max-steps", "12",
              "--log-every", "4"]}


def cross_view(n, tokens):
    """The poster's N cross-view negatives (of T = 196 tokens) at another number of tokens: the same share of
    them [ours: the poster gives N at 224 px only]."""
    return str(min(tokens - 1, round(n * tokens / 196)))


def star(tokens):
    return ["--neg", "guided", "--M", "256", "--beta", "0.5", "--N", cross_view(64, tokens)]  # DenseCL++*


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add = parser.add_argument
    add("--table", choices=["main", "agg-pair", "lambda", "negatives", "recon"], default="main")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining (and probe) seeds of every row")
    add("--rows", nargs="+", default=None, help="only these rows of the table (names as in results.md)")
    add("--quick", action="store_true", help="a tiny two-row table (SimCLR, DenseCL++*) on the test ViT, "
        "one seed: the harness end to end in a few CPU minutes; its numbers mean nothing")
    add("--preset", choices=sorted(PRESETS), default="demo",
        help="scale of the pretraining: demo (the demo set, pretrain.py's demo preset), demo-large (a "
        "generated set of 2000 + 1000 images, 20 epochs: 2x the demo's steps; probes on 1000 val images), "
        "coco (ViT-S/16, 224 px, 300 epochs, batch 32 per GPU x 8 GPUs = 256)")
    add("--data", default=None, help="pretraining data (pretrain.py --data; default: the demo set)")
    add("--extra", default="", help="more pretrain.py flags for every row, e.g. \"--epochs 100\"")
    add("--nproc-per-node", type=int, default=None, help="processes per node for pretraining (default: the "
        "number of GPUs, 1 without; > 1 launches torchrun)")
    add("--train-json",
        help="multi-label probe: COCO instances file of the training split (default: the demo set)")
    add("--train-images", help="multi-label probe: folder of the training images")
    add("--val-json", help="multi-label probe: COCO instances file of the evaluation split")
    add("--val-images", help="multi-label probe: folder of the evaluation images")
    add("--seg-root", help="segmentation probe: VOC folder (default: the demo set's VOC layout)")
    add("--seg-flags", default="",
        help="more probe_segment.py flags, e.g. \"--train-split train_aug --mask-dir SegmentationClassAug\"")
    add("--probe-flags", default="", help="more flags for both probes, e.g. \"--epochs 100\"")
    add("--out-dir", default="repro",
        help="folder of all runs and the results (continued, never overwritten)")
    return parser


def rows_of(table, quick=False, tokens=196):
    """[(row name, pretrain.py flags)] of a table, at `tokens` patch tokens a view (cross_view scales N)."""
    if quick:
        return [("SimCLR gap", ["--lam", "0", "--agg", "gap"]),  # DenseCL++* at the test ViT's 16 tokens
                ("DenseCL++* gap", ["--neg", "guided", "--M", "8", "--beta", "0.5", "--N", "3",
                                    "--agg", "gap"])]
    if table == "main":
        methods = [("SimCLR", ["--lam", "0"]), ("DenseCL", ["--neg", "densecl", "--N", "0"]),
                   ("DenseCL++", DENSECLPP),
                   ("DenseCL++ guided", ["--neg", "guided", "--M", "256", "--beta", "-2", "--N", "0"]),
                   ("DenseCL++*", star(tokens))]
        return [(f"{name} {agg}", flags + ["--agg", agg]) for name, flags in methods
                for agg in ("cls", "gap")]
    if table == "agg-pair":
        return [("SimCLR cls", ["--lam", "0", "--agg", "cls"]),
                ("SimCLR gap", ["--lam", "0", "--agg", "gap"]),
                ("DenseCL cls backbone", ["--neg", "densecl", "--N", "0", "--agg", "cls",
                                          "--pair", "backbone"]),
                ("DenseCL cls head", ["--neg", "densecl", "--N", "0", "--agg", "cls", "--pair", "head"]),
                ("DenseCL gap", ["--neg", "densecl", "--N", "0", "--agg", "gap"])]
    if table == "lambda":
        return [(f"lam {lam} {agg}", DENSECLPP + ["--lam", str(lam), "--agg", agg])
                for agg in ("cls", "gap") for lam in (0.1, 0.3, 0.5, 0.7, 0.9)]
    if table == "negatives":
        return [(f"M {M} beta {beta} N {N}", ["--neg", "guided", "--M", str(M), "--beta", str(beta), "--N",
                                              cross_view(N, tokens)])
                for M in (64, 128, 256) for beta in (0.3, 0.5, 0.7) for N in (0, 16, 32, 64)]
    return [(f"gamma {gamma} {dec}", DENSECLPP + (["--gamma", str(gamma), "--decoder", dec] if gamma else []))
            for dec in ("conv", "transformer") for gamma in (0, 0.1, 0.5, 1.0)]


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("++*", "ppstar").replace("++", "pp")).strip("-")


def run(cmd, log_path):
    """Run cmd with its output appended to log_path; returns the exit code."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())


def pretrain_cmd(args, flags, seed, out):
    argv = [os.path.join(HERE, "pretrain.py")] + (["--data", args.data] if args.data else []) + \
        PRESETS["quick" if args.quick else args.preset] + args.extra.split() + flags + \
        ["--seed", str(seed), "--out-dir", out]
    n = args.nproc_per_node
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
            if n > 1 else [sys.executable]) + argv


def probe_cmds(args, ckpt, seed, folder):
    ml = [k for flag in ("train_json", "train_images", "val_json", "val_images") if getattr(args, flag)
          for k in (f"--{flag.replace('_', '-')}", getattr(args, flag))]
    seg = (["--root", args.seg_root] if args.seg_root else []) + args.seg_flags.split()
    common = [ckpt, "--seed", str(seed)] + args.probe_flags.split()
    return [("ml.json", [sys.executable, os.path.join(HERE, "probe_multilabel.py")] + common + ml +
             (["--epochs", "20"] if args.quick else []) +
             ["--out", os.path.join(folder, "ml.json"), "--cache", os.path.join(folder, "probe_cache")]),
            ("seg.json", [sys.executable, os.path.join(HERE, "probe_segment.py")] + common + seg +
             (["--epochs", "1"] if args.quick else []) + ["--out", os.path.join(folder, "seg.json")])]


def run_row(args, name, flags, seed):
    """Pretrain (or resume, or skip when done) and probe one row at one seed; returns its metrics or an
    error."""
    folder = os.path.join(args.out_dir, slug(name), f"seed{seed}")
    out = os.path.join(folder, "pretrain")
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "log.txt")
    if not os.path.exists(os.path.join(out, "DONE")):
        resume = ["--resume"] if os.path.exists(os.path.join(out, "ckpt.pt")) else []
        print(f"  {name} seed {seed}: pretraining{' (resumed)' if resume else ''} -> {out}", flush=True)
        code = run(pretrain_cmd(args, flags, seed, out) + resume, log)
        if code != 0:
            return {"error": f"pretrain.py exited with {code}; see {log}"}
        open(os.path.join(out, "DONE"), "w").write("done\n")
    for result, cmd in probe_cmds(args, os.path.join(out, "ckpt.pt"), seed, folder):
        if not os.path.exists(os.path.join(folder, result)):
            print(f"  {name} seed {seed}: {os.path.basename(cmd[1])}", flush=True)
            code = run(cmd, log)
            if code != 0:
                return {"error": f"{os.path.basename(cmd[1])} exited with {code}; see {log}"}
    ml, seg = (json.load(open(os.path.join(folder, f))) for f in ("ml.json", "seg.json"))
    return {"mAP": ml["mAP"], "CF1": ml["CF1"], "OF1": ml["OF1"], "mIoU": seg["mIoU"]}


def mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(table, rows, runs):
    """Per row: mean and std over seeds of every metric, the poster's numbers and the flags."""
    out = []
    for name, flags in rows:
        per_seed = runs[name]
        entry = {"row": name, "flags": flags, "seeds": sorted(per_seed),
                 "errors": {s: r["error"] for s, r in per_seed.items() if "error" in r}}
        for k in ("mAP", "CF1", "OF1", "mIoU"):
            entry[k] = mean_std([r.get(k) for r in per_seed.values()])
        entry["poster"] = dict(zip(("mAP", "F1", "VOC mIoU", "COCO mIoU"),
                                   POSTER.get((table, name), (None,) * 4)))
        out.append(entry)
    return out


def fmt(ms):
    return "-" if ms[0] is None else f"{ms[0]:.1f} ± {ms[1]:.1f}"


def markdown(table, summary, args):
    lines = [f"# reproduce.py --table {table}", "",
             f"Seeds {args.seeds}; preset {'quick' if args.quick else args.preset}; pretraining data "
             f"{args.data or 'the demo set'}; mean ± std over seeds (std of the sample). Poster: its "
             f"number for the same row where it gives one (COCO, ViT-S/16; VOC/COCO mIoU only for SimCLR "
             f"and DenseCL++).", "",
             "| row | mAP | CF1 | OF1 | mIoU | poster mAP / F1 | poster VOC / COCO mIoU | "
             "pretrain.py flags |",
             "|---|---|---|---|---|---|---|---|"]
    for e in summary:
        p = e["poster"]
        lines.append(f"| {e['row']} | {fmt(e['mAP'])} | {fmt(e['CF1'])} | {fmt(e['OF1'])} | "
                     f"{fmt(e['mIoU'])} | {p['mAP'] or '-'} / {p['F1'] or '-'} | {p['VOC mIoU'] or '-'} / "
                     f"{p['COCO mIoU'] or '-'} | `{' '.join(e['flags'])}` |")
        for seed, err in e["errors"].items():
            lines.append(f"|   seed {seed}: {err} | | | | | | | |")
    if table == "negatives":
        lines += ["", "Averaged mAP over the grid (each value of one factor, the others averaged):", ""]
        for factor in ("M", "beta", "N"):
            means = {}
            for e in summary:
                v = re.search(rf"{factor} ([0-9.]+)", e["row"]).group(1)
                if e["mAP"][0] is not None:
                    means.setdefault(v, []).append(e["mAP"][0])
            lines.append(f"- {factor}: "
                         + ", ".join(f"{v}: {statistics.mean(m):.1f}" for v, m in means.items()))
    return "\n".join(lines) + "\n"


def plot(summary, path, title):
    """Bars of mAP (mean, with a +-std whisker) per row, the poster's mAP as a red tick where it has one; PIL
    only."""
    rows = [e for e in summary if e["mAP"][0] is not None]
    W, row_h, left = 900, 26, 260
    img = Image.new("RGB", (W, 60 + row_h * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title
              + "  (bar: our mAP, mean +- std over seeds; red: the poster's mAP)", fill="black")
    values = [e["mAP"][0] + e["mAP"][1] for e in rows] + [e["poster"]["mAP"] or 0 for e in rows]
    top = max(values + [1.0]) * 1.05
    scale = (W - left - 40) / top
    for i, e in enumerate(rows):
        y = 40 + i * row_h
        m, s = e["mAP"]
        draw.text((10, y + 6), e["row"][:38], fill="black")
        draw.rectangle([left, y + 4, left + m * scale, y + row_h - 4], fill=(70, 120, 190))
        draw.line([left + (m - s) * scale, y + row_h // 2, left + (m + s) * scale, y + row_h // 2],
                  fill="black", width=2)
        # inside the bar, clear of the marks
        draw.text((left + 6, y + 6), f"{m:.1f} +- {s:.1f}", fill="white")
        if e["poster"]["mAP"]:
            x = left + e["poster"]["mAP"] * scale
            draw.line([x, y + 2, x, y + row_h - 2], fill=(220, 30, 30), width=3)
    img.save(path)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.seeds = args.seeds if argv and "--seeds" in argv else [0]
    # its data, generated once, and the probes on it (seg: 4 epochs of 2000 images)
    if args.preset == "demo-large":
        root = demo.make_demo(LARGE[0], seed=1, n_train=LARGE[1], n_val=LARGE[2])
        args.data = args.data or os.path.join(root, "images", "train")
        for flag, path in (("train_json", "annotations/instances_train.json"),
                           ("train_images", "images/train"),
                           ("val_json", "annotations/instances_val.json"), ("val_images", "images/val"),
                           ("seg_root", "voc")):
            setattr(args, flag, getattr(args, flag) or os.path.join(root, path))
        args.seg_flags = args.seg_flags or "--epochs 4"
    if args.nproc_per_node is None:
        try:
            import torch
            args.nproc_per_node = max(1, torch.cuda.device_count())
        except ImportError:
            args.nproc_per_node = 1
    if shutil.which("git"):  # the code version of the results, when this is a checkout
        args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                     text=True).stdout.strip() or None
    table = "quick" if args.quick else args.table
    rows = rows_of(args.table, args.quick, TOKENS["quick" if args.quick else args.preset])
    if args.rows:
        unknown = sorted(set(args.rows) - {name for name, _ in rows})
        if unknown:
            print(f"error: --rows {unknown}: not rows of --table {args.table} ({[name for name, _ in rows]})",
                  file=sys.stderr)
            return 2
        rows = [(name, flags) for name, flags in rows if name in args.rows]
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    print(f"reproduce.py: table {table}, {len(rows)} rows x {len(args.seeds)} seeds -> {args.out_dir}",
          flush=True)
    runs = {name: {seed: run_row(args, name, flags, seed) for seed in args.seeds} for name, flags in rows}
    summary = summarise(args.table, rows, runs)
    with open(os.path.join(args.out_dir, f"results_{table}.json"), "w") as f:
        json.dump({"table": table, "args": vars(args), "rows": summary, "runs": runs}, f, indent=1)
    with open(os.path.join(args.out_dir, f"results_{table}.md"), "w") as f:
        f.write(markdown(table, summary, args))
    plot(summary, os.path.join(args.out_dir, f"results_{table}.png"), f"reproduce.py --table {table}")
    for name in ("json", "md", "png"):  # the last table run is also results.<ext>
        shutil.copy(os.path.join(args.out_dir, f"results_{table}.{name}"),
                    os.path.join(args.out_dir, f"results.{name}"))
    print(open(os.path.join(args.out_dir, f"results_{table}.md")).read())
    print(f"{time.time() - t0:.0f} s; results in {args.out_dir}/results_{table}.{{md,json,png}}")
    return 1 if any("error" in r for per in runs.values() for r in per.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
