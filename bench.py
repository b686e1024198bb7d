"""
Speed of pretraining, in one table (medians over timed steps after warm-up; CUDA events on GPU, perf_counter
on CPU):

    train  pretrain.py's training step (forward, backward, AdamW) of every objective, on batches on the device
    vit    our ViT forward+backward against timm's vit_small_patch16_224 (when timm is installed)
    data   our two-view pipeline (TwoViews in the worker + batched photometric) against per-image torchvision
    world  one rank's training step at world sizes 1, 2, 4, 8, simulated in one process: the objective gets
           the all-gathered shapes, the other ranks' tensors built locally (the communication is not measured;
           bench_world.py)
    e2e    the training step fed by the JPEG DataLoader against the same step on batches already on the
           device, with the JPEGs decoded by the loader workers and (--decode gpu) on the device
    run    pretrain.py itself for a few steps on a folder of COCO-sized JPEGs: its last log line (img/s, MFU)
    decode --decode gpu against the workers' decode: the views' difference, the decoder's speed, on CUDA its
           stream hazard (data, e2e, run and decode: bench_input.py)
    prof   torch.profiler of chosen objectives: the kernels that take the most device time
    kernel the thresholded set score of DenseCL++* (CUDA): the fused Triton kernel against the two torch ops,
           time and error against float64, and a sweep of its block sizes (bench_kernel.py)
    detect a training iteration of probe_detect.py's COCO fine-tuning (Mask R-CNN, ViT of --model, 800x1067
           images, 2 a GPU): ms, images/s, the GPU-hours of its COCO and VOC protocols (bench_detect.py)

    python bench.py                          # GPU: vit_small, 224 px, batch 256, bf16, compiled
    python bench.py --gpu-check --out g.json # the prepared GPU check (~6 min on one H200 with compilation)
    python bench.py --quick                  # a CPU smoke run (< 2 min on 2 cores); says nothing about GPUs
    python bench.py --gpu-check --quick      # the GPU check's every row at the --quick size (its CPU test)
    python bench.py --out bench.json         # also write the rows as JSON (rewritten after every row)
"""
import argparse
import datetime
import gc
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

import bench_detect
import bench_input
import bench_kernel
import bench_world
import config
import demo
import losses
import methods
import pretrain
import pretrainer
import rundir
import vit
from bench_input import sync


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add = parser.add_argument
    add("--quick", action="store_true",
        help="vit_demo at 64 px, batch 16, 3 timed steps, 64 JPEGs: a CPU smoke run")
    add("--gpu-check", action="store_true", help="the prepared GPU check: the scoring kernel, SimCLR, "
        "DenseCL++* exact (with and without the kernel) and scored on 16 tokens, their step at world size 8, "
        "ours vs timm, e2e from JPEGs with every core (decoded by the workers and on the GPU), a pretrain.py "
        "run, profiles, a detection fine-tuning iteration; no data part")
    add("--model", default=None, help="backbone config of vit.py (default vit_small; --quick: vit_demo)")
    add("--img-size", type=int, default=None, help="view size (default 224; --quick: 64)")
    add("--batch-size", type=int, default=None,
        help="images per step, two views each (default 256; --quick: 16)")
    add("--steps", type=int, default=None, help="timed steps per row (default 20; --quick: 3)")
    add("--warmup", type=int, default=None,
        help="untimed steps first, compilation included (default 5; --quick: 1)")
    add("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the data and e2e parts")
    add("--jpeg-dir", default=None,
        help="folder for the synthetic JPEGs, kept and reused (default: a temp dir)")
    add("--n-jpegs", type=int, default=None, help="synthetic COCO-sized JPEGs (default 512; --quick: 64)")
    add("--crop", type=int, default=224, help="view size of the data part: the pretraining size, also with "
        "--quick (the data rows measure CPU work)")
    add("--threads", type=int, default=None,
        help="torch threads of the main process (default: torch's; --quick on CPU: 1, as 2+ OpenMP threads "
        "next to loader workers or another busy process on a small CPU slow down 30x)")
    add("--skip", default="", help="comma-separated parts to leave out: kernel, train, world, vit, data, e2e, "
        "run, decode, detect, prof (e2e and prof run inside train)")
    add("--run-steps", type=int, default=None,
        help="steps of the pretrain.py run (default 48, --quick: 4; 0 = no run)")
    add("--profile", default=None, help="comma-separated train rows to profile (default: none; --gpu-check: "
        "DenseCL++* exact and scored on 16 tokens)")
    add("--out", default=None, help="also write the rows to this JSON file")
    return parser


OBJECTIVES = {  # row name -> pretrain.py flags (beta < -1 turns thresholding off)
    "SimCLR": ["--lam", "0"],
    "DenseCL": ["--neg", "densecl", "--N", "0"],
    "DenseCL++ random": ["--neg", "random", "--N", "0"],
    "guided M=256": ["--neg", "guided", "--M", "256", "--beta", "-2", "--N", "0"],
    "guided M=256 beta=0.5": ["--neg", "guided", "--M", "256", "--beta", "0.5", "--N", "0"],
    "DenseCL++* (+N=64)": ["--neg", "guided", "--M", "256", "--beta", "0.5", "--N", "64"],
    "DenseCL++* (+N=64) scoring unfused": ["--neg", "guided", "--M", "256", "--beta", "0.5", "--N", "64"],
    "DenseCL++* scored on 16 tokens": ["--neg", "guided", "--M", "256", "--beta", "0.5", "--N", "64",
                                       "--score-tokens", "16"],
    "DenseCL++* + montage r=2,7": ["--neg", "guided", "--M", "256", "--beta", "0.5", "--N", "64", "--montage",
                                   "--montage-r", "2", "7"],
    "DenseCL++* + recon": ["--neg", "guided", "--M", "256", "--beta", "0.5", "--N", "64", "--gamma", "0.1",
                           "--decoder", "conv"],
}
E2E = ("SimCLR", "DenseCL++* (+N=64)")
# the step as before the kernel (the same on CPU: no kernel there)
UNFUSED = "DenseCL++* (+N=64) scoring unfused"
# the rows of --gpu-check
GPU_CHECK = ("SimCLR", "DenseCL++* (+N=64)", UNFUSED, "DenseCL++* scored on 16 tokens")
GPU_E2E = ("SimCLR", "DenseCL++* scored on 16 tokens")


def median_time(fn, device, warmup, steps):
    """Median seconds of fn() over `steps` calls after `warmup` calls (CUDA event pairs on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in events)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free(device):
    gc.collect()
    torch._dynamo.reset()  # a fresh compile per config, never the recompile limit
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_step(pargs, device):
    """pretrain.py's model, optimiser and step (pretrain.compiled_parts and pretrain.train_step: bf16 autocast
    and torch.compile on CUDA); returns (model, step(x), photometric)."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = pretrainer.Pretrainer(pargs).to(device)
    opt = torch.optim.AdamW(pretrain.param_groups(model, pargs.wd), lr=pargs.lr, betas=(0.9, 0.95),
                            fused=cuda or None)
    fwd, photometric = pretrain.compiled_parts(model, cuda)
    counter = itertools.count()

    def step(x):
        pretrain.train_step(model, fwd, opt, x, pargs, next(counter), torch.bfloat16 if cuda else None)
    return model, step, photometric


def objective_flags(objective, T):
    """The pretrain.py flags and row name of an objective at T tokens (--quick: fewer tokens than N=64, and
    montage levels that divide the demo's 8x8 grid)."""
    flags, name = OBJECTIVES[objective], objective
    if "--N" in flags and int(flags[flags.index("--N") + 1]) > T - 2:
        flags, name = flags + ["--N", str(T // 2)], name.replace("N=64", f"N={T // 2}")
    if "--montage" in flags and math.isqrt(T) % 7:
        flags, name = flags + ["--montage-r", "2", "4"], name.replace("r=2,7", "r=2,4")
    if "--score-tokens" in flags and int(flags[flags.index("--score-tokens") + 1]) >= T:
        flags = flags + ["--score-tokens", str(T // 4)]
    return flags, name


def size_flags(cfg):
    return ["--model", cfg.model, "--img-size", str(cfg.img_size), "--batch-size", str(cfg.batch_size)] + \
        (["--head-hidden", "512"] if cfg.quick else [])


def run_flags(cfg):
    """Name and flags of the pretrain.py run of part run: DenseCL++* scored on 16 tokens at the bench's
    size."""
    flags, name = objective_flags("DenseCL++* scored on 16 tokens",
                                  (cfg.img_size // vit.CONFIGS[cfg.model]["patch_size"]) ** 2)
    return name, size_flags(cfg) + flags


def bench_train(cfg, device, files, rows, save):
    """Part 1, and parts e2e and prof for their configs (reusing the compiled step)."""
    cuda, B, S = device.type == "cuda", cfg.batch_size, cfg.img_size
    T = (S // vit.CONFIGS[cfg.model]["patch_size"]) ** 2
    peak, simclr_time = rundir.peak_flops(device), None  # SimCLR runs first: the reference of the ratios
    for objective in cfg.objectives:
        flags, name = objective_flags(objective, T)
        pargs = config.resolve_args(["--data", "unused"] + size_flags(cfg) + flags)
        row, model, step, x = {"part": "train", "name": name, "objective": objective,
                               "flags": flags}, None, None, None
        t0, kernel = time.perf_counter(), losses.fused_score
        try:
            free(device)
            # the fused scoring off for this row only
            losses.fused_score = None if objective == UNFUSED else kernel
            model, step, photometric = train_step(pargs, device)
            x = torch.randn(2 * B, 3, S, S, device=device)
            t = median_time(lambda: step(x), device, cfg.warmup, cfg.steps)
            simclr_time = t if objective == "SimCLR" else simclr_time
            flops = 3 * vit.vit_flops(model.backbone.config, S) * 2 * B
            row.update(img_s=B / t, views_s=2 * B / t, step_ms=1e3 * t,
                       mfu=100 * flops / t / peak if peak else None,
                       mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                       ratio=t / simclr_time if simclr_time else None, wall_s=time.perf_counter() - t0)
            rows.append(row)
            save()
            if objective in cfg.profile:
                bench_profile(cfg, device, name, step, x, rows)
            if objective in cfg.e2e and files:
                bench_input.bench_e2e(cfg, device, files, name, step, photometric, x, rows)
        except torch.cuda.OutOfMemoryError:
            row["oom"] = True
            rows.append(row)
        except Exception as e:  # one broken row must not cost the rest of a GPU check
            row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            rows.append(row)
            print(f"error in train row {name}: {row['error'][:400]}", file=sys.stderr, flush=True)
        finally:
            losses.fused_score = kernel
        print(f"  [{time.perf_counter() - cfg.t_start:.0f} s] train {name}: "
              f"{row.get('step_ms', float('nan')):.1f} ms", flush=True)
        model = step = x = None
        save()
    free(device)
    if cfg.gpu_check:
        return
    # ContrastiveCrop costs nothing per step: its price is one no-grad pass over the data every --ccrop-every
    # epochs
    backbone = vit.create_vit(cfg.model, img_size=S).to(device).eval()
    x = torch.randn(B, 3, S, S, device=device)

    def localise_batch():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            methods.heat_maps(backbone, x, "cls_attn")
    t = median_time(localise_batch, device, cfg.warmup, cfg.steps)
    every = config.get_args_parser().get_default("ccrop_every")
    rows.append({"part": "train", "name": f"ContrastiveCrop (pass every {every} ep)", "objective": "ccrop",
                 "img_s": B / t, "ratio": 1 + (t / B) / (simclr_time / B) / every if simclr_time else None})
    free(device)


def bench_profile(cfg, device, name, step, x, rows, n=3, top=25):
    """Part prof: torch.profiler over n steps (after the timed ones, so compiled and warm); the `top` kernels
    by self device time (CPU ops on CPU), each with its share of the profiled total."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step(x)
        sync(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda:  # the kernels themselves (an aten op's self device time repeats its kernels')
        events = [e for e in events if str(e.device_type).endswith("CUDA")]
        attr = attr if not events or hasattr(events[0], attr) else "self_cuda_time_total"  # older torch
    total = sum(getattr(e, attr) for e in events) or 1.0
    kernels = sorted(events, key=lambda e: -getattr(e, attr))[:top]
    rows.append({"part": "prof", "name": f"{name}: {n} steps", "total_ms_per_step": total / 1e3 / n,
                 "kernels": [{"name": e.key[:160], "ms_per_step": getattr(e, attr) / 1e3 / n,
                              "share": getattr(e, attr) / total, "calls_per_step": e.count / n}
                             for e in kernels]})


def bench_vit(cfg, device, rows):
    """Part 2: backbone forward+backward, loss = mean of the output tokens, ours against timm with the same
    config."""
    try:
        import timm
    except ImportError:
        rows.append({"part": "vit", "name": "timm not installed: skipped"})
        return
    cuda, conf, S = device.type == "cuda", vit.CONFIGS[cfg.model], cfg.img_size
    kw = dict(img_size=S, patch_size=conf["patch_size"], embed_dim=conf["embed_dim"], depth=conf["depth"],
              num_heads=conf["num_heads"])
    times = {}
    for name, make in (("ours", lambda: vit.create_vit(cfg.model, img_size=S)),
                       ("timm", lambda: timm.create_model("vit_small_patch16_224", num_classes=0, **kw))):
        free(device)
        torch.manual_seed(0)
        model = make().to(device)
        fwd = torch.compile(model.forward_features) if cuda else model.forward_features
        x = torch.randn(2 * cfg.batch_size, 3, S, S, device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = fwd(x).float().mean()
            model.zero_grad(set_to_none=True)
            loss.backward()
        try:
            times[name] = median_time(step, device, cfg.warmup, cfg.steps)
        except torch.cuda.OutOfMemoryError:
            times[name] = None
        model = fwd = x = step = None
    for name, t in times.items():
        rows.append({"part": "vit", "name": f"{name} {cfg.model} fwd+bwd", "oom": t is None,
                     "img_s": 2 * cfg.batch_size / t if t else None,
                     "ratio": times["ours"] / t if t and times["ours"] else None})
    free(device)


def fmt(v, width, digits):
    return f"{'-' if v is None else f'{v:.{digits}f}':>{width}}"


def print_table(rows, header):
    print(header)
    print(f"{'part':<6}{'row':<44}{'img/s':>10}{'views/s':>10}{'steps/s':>9}{'MFU %':>7}"
          f"{'mem GiB':>9}{'ratio':>8}")
    explain = {"train": "ratio: step time / SimCLR's", "vit": "ratio: time ours / time timm",
               "world": "one rank's step, other ranks' tensors built locally (communication not measured); "
               "ratio: step time / SimCLR's at the same world size",
               "data": "ratio: img/s ours / torchvision's (same number of processes)",
               "e2e": "ratio: steps/s JPEG loader / on device (wall clock over all timed steps)",
               "run": "pretrain.py in its own process: its last log line (img/s and MFU over "
               "that log window)"}
    part = None
    for r in rows:
        if r["part"] in ("prof", "kernel", "decode", "detect"):
            continue
        if r["part"] != part:
            part = r["part"]
            print(f"  -- {explain[part]}")
        if r.get("oom") or r.get("error"):
            problem = "OOM" if r.get("oom") else "error: " + r["error"][:300]
            print(f"{r['part']:<6}{r['name']:<44}{problem:>10}")
            continue
        print(f"{r['part']:<6}{r['name']:<44}{fmt(r.get('img_s'), 10, 1)}{fmt(r.get('views_s'), 10, 1)}"
              f"{fmt(r.get('steps_s'), 9, 2)}{fmt(r.get('mfu'), 7, 1)}{fmt(r.get('mem_gb'), 9, 2)}"
              f"{fmt(r.get('ratio'), 8, 2)}")
    for r in rows:
        if r["part"] in ("kernel", "decode", "detect"):
            items = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                     if k not in ("part", "name"))
            print(f"{r['part']} {r['name']}: " + ", ".join(items))
        if r["part"] == "prof":
            print(f"  -- profile of {r['name']}: {r['total_ms_per_step']:.2f} ms of kernels per "
                  f"step; the top ones")
            for k in r["kernels"][:12]:
                print(f"prof  {k['ms_per_step']:8.2f} ms {100 * k['share']:5.1f}% x{k['calls_per_step']:<5g} "
                      f"{k['name'][:90]}")


def environment(device):
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    try:
        import timm
        env["timm"] = timm.__version__
    except ImportError:
        pass
    return env


def presets(cfg, parser):
    """Sizes (full: ViT-S at 224 px, batch 256; --quick: the demo ViT at 64 px, batch 16) and the parts and
    rows of the full bench or of --gpu-check (fewer timed steps: it must fit in 6 minutes with
    compilation). Part detect keeps its own sizes and 3 + 5 iterations (bench_detect.py); on an H200 it adds an
    estimated 10 s to either, not measured yet: 8 eager Mask R-CNN iterations of 2 images (~3.5 TFLOP each, at
    a guessed 0.1-0.3 s with torchvision's small kernels and host syncs), the build and the first iteration's
    start-up."""
    for k, full, quick in (("model", "vit_small", "vit_demo"), ("img_size", 224, 64), ("batch_size", 256, 16),
                           ("steps", 20, 3), ("warmup", 5, 1), ("n_jpegs", 512, 64), ("run_steps", 48, 4)):
        if getattr(cfg, k) is None:
            setattr(cfg, k, quick if cfg.quick else full)
    skip = set(cfg.skip.split(",")) - {""}
    if cfg.gpu_check:
        cfg.objectives, cfg.e2e, skip, cfg.worlds = GPU_CHECK, GPU_E2E, skip | {"data"}, (1, 8)
        cfg.steps, cfg.warmup = (3, 1) if cfg.quick else (10, 3)
        cfg.n_jpegs = max(cfg.n_jpegs, 64 if cfg.quick else 4096)  # 16 steps an epoch for the pretrain.py run
        if cfg.profile is None:
            cfg.profile = "DenseCL++* (+N=64),DenseCL++* scored on 16 tokens"
    else:
        cfg.objectives, cfg.e2e, skip, cfg.worlds = list(OBJECTIVES), E2E, skip | {"run"}, (1, 2, 4, 8)
    cfg.profile = [] if "prof" in skip else [o for o in (cfg.profile or "").split(",") if o]
    if set(cfg.profile) - set(OBJECTIVES):
        parser.error(f"--profile: unknown rows {sorted(set(cfg.profile) - set(OBJECTIVES))}; expected names "
                     f"from {list(OBJECTIVES)}")
    cfg.skip, cfg.run_timeout = sorted(skip), 300
    return skip


def main(argv=None):
    parser = get_args_parser()
    cfg = parser.parse_args(sys.argv[1:] if argv is None else argv)
    skip = presets(cfg, parser)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if cfg.threads or (cfg.quick and device.type == "cpu"):
        torch.set_num_threads(cfg.threads or 1)
    if device.type == "cuda":  # as pretrain.train does
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_flush_denormal(True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    header = (f"bench.py | {name} | torch {torch.__version__} | {cfg.model} {cfg.img_size} px, batch "
              f"{cfg.batch_size} "
              f"(x2 views) | {'bf16 autocast + torch.compile' if device.type == 'cuda' else 'fp32 eager'} | "
              f"median of {cfg.steps} steps after {cfg.warmup} | data: {cfg.n_jpegs} JPEGs, {cfg.crop} px "
              f"crops, {cfg.workers} workers | {torch.get_num_threads()} torch threads")
    if device.type == "cpu":
        header += (f"\nnote: CPU numbers say nothing about GPU speed; load average {os.getloadavg()[0]:.1f} "
                   f"at the start (other processes on these {os.cpu_count()} cores skew the timings)")
    print(header, flush=True)
    cfg.t_start, env, rows = time.perf_counter(), environment(device), []
    tmp = None if cfg.jpeg_dir else tempfile.mkdtemp(prefix="bench_jpegs_")

    def save():  # after every row: a check cut short still leaves what it measured
        if cfg.out:
            settings = {k: v for k, v in vars(cfg).items() if k != "t_start"}
            with open(cfg.out + ".tmp", "w") as fh:
                json.dump({"header": header, "environment": env, "config": settings,
                           "rows": rows}, fh, indent=1)
            os.replace(cfg.out + ".tmp", cfg.out)
    try:
        folder = cfg.jpeg_dir or tmp
        files = demo.make_jpegs(folder, cfg.n_jpegs) if {"data", "e2e", "run", "decode"} - skip else []
        for part, run in (("kernel", lambda: bench_kernel.bench_kernel(cfg, device, rows, median_time, free)),
                          ("train", lambda: bench_train(cfg, device, [] if "e2e" in skip else files,
                                                        rows, save)),
                          ("world", lambda: bench_world.bench_world(cfg, device, rows, median_time, free, train_step,
                                                                    objective_flags, size_flags)),
                          ("vit", lambda: bench_vit(cfg, device, rows)),
                          ("run", lambda: bench_input.bench_run(cfg, device, folder, rows, *run_flags(cfg))),
                          ("data", lambda: bench_input.bench_data(cfg, device, files, rows)),
                          ("decode", lambda: bench_input.bench_decode(cfg, device, files, rows)),
                          ("detect", lambda: bench_detect.bench_detect(cfg, device, rows, median_time, free))):
            if part not in skip and (part != "run" or cfg.run_steps):
                run()
                save()
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    order = ["train", "world", "vit", "data", "e2e", "run", "decode", "detect", "kernel", "prof"]
    rows.sort(key=lambda r: order.index(r["part"]))  # stable: e2e rows are measured with the train rows
    print_table(rows, header)
    print(f"bench time {time.perf_counter() - cfg.t_start:.0f} s")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
