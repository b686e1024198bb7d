"""
Run the DenseCL++ poster's tables end to end: pretraining of every row and seed, the probes, one results table
with the paired differences to the table's reference row.

    python reproduce.py --table main --seeds 0 1 2                 # the demo set (data/demo), CPU-sized
    python reproduce.py --quick                                    # a tiny two-row table in a few CPU minutes
    python reproduce.py --table main --seeds 0 1 2 --preset coco \\
        --data coco/annotations/instances_train2017.json \\
        --train-json coco/annotations/instances_train2017.json --train-images coco/train2017 \\
        --val-json coco/annotations/instances_val2017.json --val-images coco/val2017 \\
        --seg-root VOCdevkit/VOC2012

Tables (METHOD.md; the poster's numbers beside ours where it gives them):
    main       random init, SimCLR, DenseCL, DenseCL++ (random), guided, DenseCL++* (M 256, beta 0.5,
               N 64); CLS and GAP
    agg-pair   the poster's first table: SimCLR at CLS / GAP, DenseCL with CLS + backbone / head pairing, GAP
    lambda     DenseCL++ at lam 0.1 ... 0.9, CLS and GAP
    negatives  DenseCL++ guided over the 3 x 3 x 4 grid M x beta x N (the poster averages mAP over it)
    recon      DenseCL++ at gamma 0, 0.1, 0.5, 1 with the conv and the transformer decoder
    controls   one change each, paired with the unchanged row (GAP): SimCLR -> DenseCL (a dense loss) ->
               DenseCL++ (its negatives tokens of other images) -> DenseCL++* (guided, thresholded, cross-view);
               and to DenseCL / DenseCL++: independent draws, the full sum (--neg all), detached negatives,
               oracle false negatives (a diagnostic with labels), --tau-d, lam (METHOD.md 4.1, 4.3, 4.7, 4.8)

Every run lives in its own folder, <out-dir>/<preset>/<row>/seed<k>/: pretrain/ (pretrain.py's run), one JSON
per probe, log.txt, and run.json: the command line of the pretraining and of every probe, the checkpoint each
probe scored (its SHA-256), and the provenance of each attempt (commit, uncommitted changes, machine, times).
The same command continues a stopped table: pretraining always runs with --resume (a run killed before its
first checkpoint starts again, one killed later continues from it), a finished step is skipped. A folder made
by another command (other preset, flags, --extra, probe flags or data) is refused before anything runs, naming
both commands; a probe result is reused only for the checkpoint it scored. Pretraining starts as users start
it: `python pretrain.py --preset P ...`, or `torchrun --nproc_per_node N pretrain.py ...` when N > 1.
Writes (results.py) <out-dir>/results_<table>_<preset>.md, .json and .png (--quick: results_quick.*): every
finished run of the table in the out-dir, mean ± std over seeds, and per row the paired difference to the
reference row (same seeds) with its sign count; the picture (visualize.py) is a bar per row, or for lambda,
negatives and recon the poster's figure: the metric over the swept value.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

import config
import results

HERE = os.path.dirname(os.path.abspath(__file__))
DENSECLPP = ["--neg", "random", "--N", "0"]  # the poster's DenseCL++ row: dense-dense random negatives
# patch tokens a view at each scale
TOKENS = {"demo": 64, "demo-large": 64, "demo-clutter": 64, "coco": 196, "quick": 16}
# --quick: the demo recipe on the 32 px test ViT for 12 steps
QUICK = ["--model", "vit_test", "--img-size", "32", "--head-hidden", "64", "--max-steps", "12", "--log-every", "4"]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add = parser.add_argument
    add("--table", choices=["main", "agg-pair", "lambda", "negatives", "recon", "controls"], default="main")
    add("--seeds", type=int, nargs="+", default=None,
        help="pretraining (and probe) seeds of every row (default 0 1 2; --quick: 0)")
    add("--rows", nargs="+", default=None, help="only these rows of the table (names as in the results; a row's "
        "paired difference needs its reference row run too)")
    add("--probes", nargs="+", choices=sorted(results.PROBES), default=None, help="probes of every run: ml "
        "(multi-label), seg (segmentation), det (detection), diag (diagnose.py: matching accuracy, hubness, "
        "attention Jaccard); default: ml seg det for --table main, ml seg diag for controls, ml seg otherwise "
        "and with --quick")
    add("--quick", action="store_true", help="a tiny two-row table (SimCLR, DenseCL++*) on the test ViT: the "
        "harness end to end in a few CPU minutes; its numbers mean nothing")
    add("--preset", choices=sorted(config.PRESETS), default="demo",
        help="the recipe of pretrain.py --preset: demo (the demo set), demo-large (a generated set of 2000 + "
        "1000 images, 20 epochs: 2x the demo's steps; probes on 1000 val images), coco (ViT-S/16, 224 px, "
        "300 epochs, a global batch of 256 on any number of GPUs)")
    add("--data", default=None, help="pretraining data (pretrain.py --data; default: the preset's set)")
    add("--extra", default="", help="more pretrain.py flags for every row, e.g. \"--epochs 100\"")
    add("--oracle-stuff", default=None, help="pretrain.py --oracle-stuff for the rows with --oracle-negatives "
        "(COCO-Stuff's stuff_train2017.json beside --data instances_train2017.json)")
    add("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run (default: inherited); part of "
        "a run's command, so a rerun at another count measures what rounding alone changes")
    add("--nproc-per-node", type=int, default=None, help="processes per node for pretraining (default: the "
        "number of GPUs, 1 without; > 1 launches torchrun)")
    add("--train-json", help="multi-label and detection probes: COCO instances file of the training split "
        "(default: the preset's set)")
    add("--train-images", help="multi-label and detection probes: folder of the training images")
    add("--val-json", help="multi-label and detection probes: COCO instances file of the evaluation split")
    add("--val-images", help="multi-label and detection probes: folder of the evaluation images")
    add("--seg-root", help="segmentation probe: VOC folder (default: the preset's VOC layout)")
    add("--seg-flags", default="",
        help="more probe_segment.py flags, e.g. \"--train-split train_aug --mask-dir SegmentationClassAug\"")
    add("--det-flags", default="", help="more probe_detect.py flags, e.g. \"--finetune\"")
    add("--probe-flags", default="", help="more flags for the multi-label and segmentation probes")
    add("--out-dir", default="repro",
        help="folder of all runs and the results (continued, never overwritten)")
    add("--report", action="store_true", help="run nothing: write the results of the finished runs of this "
        "command in --out-dir")
    return parser


# ------------------------------------------------------------------------------------------------------------
# the tables: rows and their reference

def rows_of(table, quick=False, tokens=196):
    """[(row name, pretrain.py flags or None for a random init, reference row or None)] of a table, at
    `tokens` patch tokens a view (the cross-view negatives keep the poster's share of them). The reference of
    a row is the row its paired differences are taken to: SimCLR at the same aggregation, lam 0.5, the
    default grid point, gamma 0, the unchanged row of a control."""
    def n(k):
        return str(config.cross_view(k, tokens))
    if quick:
        return [("SimCLR gap", ["--lam", "0", "--agg", "gap"], None),  # DenseCL++* at the test ViT's 16 tokens
                ("DenseCL++* gap", ["--neg", "guided", "--M", "8", "--beta", "0.5", "--N", "3", "--agg", "gap"],
                 "SimCLR gap")]
    if table == "main":
        methods = [("SimCLR", ["--lam", "0"]), ("DenseCL", ["--neg", "densecl", "--N", "0"]),
                   ("DenseCL++", DENSECLPP),
                   ("DenseCL++ guided", ["--neg", "guided", "--M", "256", "--beta", "-2", "--N", "0"]),
                   ("DenseCL++*", ["--neg", "guided", "--M", "256", "--beta", "0.5", "--N", n(64)])]
        return [("random init", None, None)] + [
            (f"{name} {agg}", flags + ["--agg", agg], None if name == "SimCLR" else f"SimCLR {agg}")
            for name, flags in methods for agg in ("cls", "gap")]
    if table == "agg-pair":
        return [("SimCLR cls", ["--lam", "0", "--agg", "cls"], None),
                ("SimCLR gap", ["--lam", "0", "--agg", "gap"], None),
                ("DenseCL cls backbone", ["--neg", "densecl", "--N", "0", "--agg", "cls", "--pair", "backbone"],
                 "SimCLR cls"),
                ("DenseCL cls head", ["--neg", "densecl", "--N", "0", "--agg", "cls", "--pair", "head"],
                 "SimCLR cls"),
                ("DenseCL gap", ["--neg", "densecl", "--N", "0", "--agg", "gap"], "SimCLR gap")]
    if table == "lambda":
        return [(f"lam {lam} {agg}", DENSECLPP + ["--lam", str(lam), "--agg", agg],
                 None if lam == 0.5 else f"lam 0.5 {agg}")
                for agg in ("cls", "gap") for lam in (0.1, 0.3, 0.5, 0.7, 0.9)]
    if table == "negatives":
        ref = f"M 256 beta 0.5 N {n(64)}"
        return [(f"M {M} beta {beta} N {n(N)}", ["--neg", "guided", "--M", str(M), "--beta", str(beta), "--N",
                                                 n(N)], None if (M, beta, N) == (256, 0.5, 64) else ref)
                for M in (64, 128, 256) for beta in (0.3, 0.5, 0.7) for N in (0, 16, 32, 64)]
    if table == "controls":
        base = [("SimCLR", ["--lam", "0"]), ("DenseCL", ["--neg", "densecl", "--N", "0"]), ("DenseCL++", DENSECLPP),
                ("DenseCL++*", ["--neg", "guided", "--M", "256", "--beta", "0.5", "--N", n(64)])]
        f = dict(base)
        changes = [("DenseCL++", "independent", DENSECLPP + ["--neg-draw", "independent"]),
                   ("DenseCL++", "all", ["--neg", "all", "--N", "0"]),
                   ("DenseCL", "detached", f["DenseCL"] + ["--detach-neg"]),
                   ("DenseCL++", "detached", DENSECLPP + ["--detach-neg"]),
                   ("DenseCL++", "oracle", DENSECLPP + ["--oracle-negatives"]),
                   ("DenseCL++", "oracle shuffled", DENSECLPP + ["--oracle-negatives", "--oracle-shuffle"]),
                   ("DenseCL++*", "oracle", f["DenseCL++*"] + ["--oracle-negatives"])]
        changes += [(m, f"{k} {v}", f[m] + [f"--{k}", v]) for m in ("DenseCL", "DenseCL++")
                    for k, vs in (("tau-d", ("0.1", "0.5")), ("lam", ("0.1", "0.3"))) for v in vs]
        chain = {"SimCLR": None, "DenseCL": "SimCLR gap", "DenseCL++": "DenseCL gap", "DenseCL++*": "DenseCL++ gap"}
        return [(f"{m} gap", flags + ["--agg", "gap"], chain[m]) for m, flags in base] + [
            (f"{m} {what} gap", flags + ["--agg", "gap"], f"{m} gap") for m, what, flags in changes]
    return [("gamma 0", DENSECLPP, None)] + [
        (f"gamma {gamma} {dec}", DENSECLPP + ["--gamma", str(gamma), "--decoder", dec], "gamma 0")
        for dec in ("conv", "transformer") for gamma in (0.1, 0.5, 1.0)]


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("++*", "ppstar").replace("++", "pp")).strip("-")


# ------------------------------------------------------------------------------------------------------------
# one run: its commands, its record (run.json), pretraining and probes

def pretrain_cmd(args, flags, seed, out):
    """The launcher and pretrain.py's argv of one run (always --resume: a killed run starts or continues);
    argv None for the random-init row (flags None), which pretrains nothing."""
    if flags is None:
        return [sys.executable], None
    stuff = ["--oracle-stuff", args.oracle_stuff] if args.oracle_stuff and "--oracle-negatives" in flags else []
    argv = ["pretrain.py", "--preset", args.recipe] + (["--data", args.data] if args.data else []) + \
        (QUICK if args.quick else []) + args.extra.split() + flags + stuff + ["--seed", str(seed), "--out-dir", out,
                                                                             "--resume"]
    n = args.nproc_per_node
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
            if n > 1 else [sys.executable]), argv


def probe_cmds(args, flags, seed, folder):
    """{probe: argv} of one run's probes; a random init (flags None) is probed at the preset's model and
    size."""
    ckpt = os.path.join(folder, "pretrain", "ckpt.pt")
    if flags is None:
        model, size = ("vit_test", "32") if args.quick else (
            config.PRESETS[args.recipe].get("model", "vit_small"), str(config.PRESETS[args.recipe].get(
                "img_size", 224)))
        source, size = ["--random-init", "--model", model], ["--img-size", size]  # (detection: its own sizes)
    else:
        source, size = [ckpt], []
    def flags_of(*names):
        return [k for flag in names if getattr(args, flag) for k in (f"--{flag.replace('_', '-')}",
                                                                       getattr(args, flag))]
    coco = flags_of("train_json", "train_images", "val_json", "val_images")
    common = source + ["--seed", str(seed)]
    agg = ["--agg", "gap"] if flags is None else []
    cmds = {"ml": common + size + agg + coco + args.probe_flags.split() + (["--epochs", "20"] if args.quick else [])
            + ["--cache", os.path.join(folder, "probe_cache")],
            "seg": common + size + (["--root", args.seg_root] if args.seg_root else []) + args.probe_flags.split() +
            args.seg_flags.split() + (["--epochs", "1"] if args.quick else []),
            "det": common + coco + args.det_flags.split(),
            "diag": common + size + flags_of("val_json", "val_images")}
    return {p: [results.PROBES[p][0]] + cmds[p] + ["--out", os.path.join(folder, results.PROBES[p][1])]
            for p in args.probes}


def key(argv, folder):
    """A command as stored in run.json: its argv with the run's own folder written as <run>."""
    return [a.replace(folder, "<run>") for a in argv]


def provenance():
    """Where a step ran: the commit of this checkout and whether its code (.py, requirements.txt) has
    uncommitted changes, the machine, the versions, the time."""
    def git(*cmd):
        r = subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain")
    dirty = None if status is None else any(line[3:].endswith(".py") or line[3:] == "requirements.txt"
                                            for line in status.splitlines())
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"commit": git("rev-parse", "HEAD"), "dirty": dirty, "host": platform.node(), "cpu": cpu,
            "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_record(folder):
    path = os.path.join(folder, "run.json")
    return json.load(open(path)) if os.path.exists(path) else None


def write_record(folder, record):
    tmp = os.path.join(folder, "run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(folder, "run.json"))


def conflict(args, name, flags, seed):
    """Why the folder of (row, seed) holds another run than this command's, or None."""
    folder = run_folder(args, name, seed)
    record = read_record(folder)
    if record is None:
        made = os.path.isdir(folder) and any(f != "log.txt" for f in os.listdir(folder))
        return f"{folder} holds a run without run.json (made by an older reproduce.py)" if made else None
    launch, argv = pretrain_cmd(args, flags, seed, os.path.join(folder, "pretrain"))
    want = {"pretrain": key(argv, folder) if flags else None, "launch": key(launch, folder)[1:],
            "threads": args.threads,
            **{p: key(c, folder) for p, c in probe_cmds(args, flags, seed, folder).items()}}
    have = {"pretrain": record["pretrain"]["cmd"], "launch": record["pretrain"].get("launch"),
            "threads": record.get("threads"),
            **{p: r["cmd"] for p, r in record["probes"].items()}}
    for part in want:
        if part in have and have[part] != want[part]:
            return (f"{folder}: its {part} was\n    {words(have[part])}\n  this command's is\n    "
                    f"{words(want[part])}")
    return None


def words(cmd):
    return "(none)" if cmd is None else " ".join(map(str, cmd)) if isinstance(cmd, list) else str(cmd)


def run_folder(args, name, seed):
    return os.path.join(args.out_dir, "quick" if args.quick else args.preset, slug(name), f"seed{seed}")


def run(cmd, log_path, threads=None):
    """Run cmd (at OMP_NUM_THREADS=threads when given) with its output appended to log_path; returns the exit
    code."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log_path, "a") as log:
        log.write(f"\n$ {'OMP_NUM_THREADS=%d ' % threads if threads else ''}{' '.join(cmd)}\n")
        log.flush()
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_row(args, name, flags, seed):
    """Pretrain (resume, or skip when done) and probe one row at one seed; returns its metrics and
    provenance, or an error."""
    folder = run_folder(args, name, seed)
    out, log = os.path.join(folder, "pretrain"), os.path.join(folder, "log.txt")
    os.makedirs(folder, exist_ok=True)
    launch, argv = pretrain_cmd(args, flags, seed, out)
    record = read_record(folder) or {"pretrain": {"cmd": key(argv, folder) if flags else None,
                                                  "launch": key(launch, folder)[1:], "done": flags is None,
                                                  "attempts": []}, "probes": {}, "threads": args.threads}
    ckpt, probes = os.path.join(out, "ckpt.pt"), probe_cmds(args, flags, seed, folder)

    def scored(probe):  # its result is there, made from the checkpoint of this pretraining
        done = record["probes"].get(probe, {})
        return done.get("ckpt_sha256") == record["pretrain"].get("ckpt_sha256") and done.get("exit") == 0 and \
            os.path.exists(os.path.join(folder, results.PROBES[probe][1]))
    # a finished run whose probes are all scored needs no checkpoint (results are kept without them)
    if not record["pretrain"]["done"] or flags and not os.path.exists(ckpt) and not all(map(scored, probes)):
        print(f"  {name} seed {seed}: pretraining -> {out}", flush=True)
        record["pretrain"].update(done=False)
        record["pretrain"]["attempts"].append(provenance())
        write_record(folder, record)
        code = run(launch + [os.path.join(HERE, argv[0])] + argv[1:], log, args.threads)
        record["pretrain"]["attempts"][-1]["exit"] = code
        if code == 0:
            record["pretrain"].update(done=True, ckpt_sha256=sha256(ckpt))
        write_record(folder, record)
        if code != 0:
            return {"error": f"pretrain.py exited with {code}; see {log}"}
    for probe, cmd in probes.items():
        if scored(probe):
            continue
        print(f"  {name} seed {seed}: {cmd[0]}", flush=True)
        record["probes"][probe] = {"cmd": key(cmd, folder), "ckpt_sha256": record["pretrain"].get("ckpt_sha256"),
                                   **provenance()}
        code = run([sys.executable, os.path.join(HERE, cmd[0])] + cmd[1:], log, args.threads)
        record["probes"][probe]["exit"] = code
        write_record(folder, record)
        if code != 0:
            return {"error": f"{cmd[0]} exited with {code}; see {log}"}
    return collect(folder, record, args.probes)


def collect(folder, record, probes):
    """The metrics of a finished run (None where a probe has not run) and where its steps ran."""
    metrics = {}
    for probe in probes:
        path = os.path.join(folder, results.PROBES[probe][1])
        done = record["probes"].get(probe, {})
        result = json.load(open(path)) if os.path.exists(path) and done.get("exit") == 0 and \
            done.get("ckpt_sha256") == record["pretrain"].get("ckpt_sha256") else {}
        metrics.update({m: None if result.get(k) is None else result[k] * f
                        for m, (k, f) in results.PROBES[probe][2].items()})
    attempts = record["pretrain"]["attempts"]
    return {**metrics, "provenance": {"pretrain": attempts,
                                      **{p: {k: v for k, v in r.items() if k != "cmd"}
                                         for p, r in record["probes"].items()}}}


# ------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.probes = args.probes or (["ml", "seg"] if args.quick else {"main": ["ml", "seg", "det"],
                                                                     "controls": ["ml", "seg", "diag"]}.get(
        args.table, ["ml", "seg"]))
    args.recipe = "demo" if args.quick else args.preset
    root = config.preset_data(args.recipe)  # the preset's generated set: pretraining data and the probes'
    if root and args.preset != "demo":
        for flag, sub in (("train_json", "annotations/instances_train.json"), ("train_images", "images/train"),
                          ("val_json", "annotations/instances_val.json"), ("val_images", "images/val"),
                          ("seg_root", "voc")):
            setattr(args, flag, getattr(args, flag) or os.path.join(root, sub))
    if args.preset == "demo-large" and not args.quick:
        args.seg_flags = args.seg_flags or "--epochs 4"  # 2000 training images: 4 epochs of the demo's steps
    if args.nproc_per_node is None:
        args.nproc_per_node = max(1, torch.cuda.device_count())
    table = "quick" if args.quick else args.table
    rows = rows_of(args.table, args.quick, TOKENS["quick" if args.quick else args.preset])
    if args.rows:
        unknown = sorted(set(args.rows) - {name for name, _, _ in rows})
        if unknown:
            print(f"error: --rows {unknown}: not rows of --table {args.table} ({[r[0] for r in rows]})",
                  file=sys.stderr)
            return 2
    chosen = [r for r in rows if not args.rows or r[0] in args.rows]
    conflicts = [c for name, flags, _ in chosen for s in args.seeds if (c := conflict(args, name, flags, s))]
    if conflicts:
        print("error: --out-dir holds runs of another command; choose another --out-dir, or move these "
              "folders away:\n" + "\n".join(conflicts), file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    print(f"reproduce.py: table {table}, {len(chosen)} rows x {len(args.seeds)} seeds -> {args.out_dir}",
          flush=True)
    runs = {name: {} for name, _, _ in rows}
    for name, flags, _ in [] if args.report else chosen:
        for seed in args.seeds:
            runs[name][seed] = run_row(args, name, flags, seed)
    for name, flags, _ in rows:  # every other finished run of the table in the out-dir, made by this command
        folder = os.path.dirname(run_folder(args, name, 0))
        for seed in sorted(int(d[4:]) for d in os.listdir(folder) if re.fullmatch(r"seed\d+", d)) \
                if os.path.isdir(folder) else []:
            record = read_record(run_folder(args, name, seed))
            if seed not in runs[name] and record and not conflict(args, name, flags, seed) and \
                    record["pretrain"]["done"]:
                runs[name][seed] = collect(run_folder(args, name, seed), record, args.probes)
    base = results.write(args, table, rows, runs)
    print(open(base + ".md").read())
    print(f"{time.time() - t0:.0f} s; results in {base}.{{md,json,png}}")
    return 1 if any("error" in r for per in runs.values() for r in per.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
