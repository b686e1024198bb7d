"""
Speed of pretraining, in one table (medians over timed steps after warm-up; CUDA events on GPU, perf_counter
on CPU):

    train  the pretrain.py training step (forward, backward, AdamW) of every objective, on batches already on the device
    vit    our ViT forward+backward against timm's vit_small_patch16_224 (when timm is installed)
    data   our two-view pipeline (TwoViews in the worker + batched photometric) against a per-image torchvision.v2 one
    e2e    the training step fed by the JPEG DataLoader against the same step on batches already on the device
    run    pretrain.py itself for a few steps on a folder of COCO-sized JPEGs: its last log line (img/s, MFU)
    prof   torch.profiler of chosen objectives: the kernels that take the most device time
    kernel the thresholded set score of DenseCL++* (CUDA): the fused Triton kernel against the two torch ops,
           time and error against float64

    python bench.py                          # H100: vit_small, 224 px, batch 256, bf16 + torch.compile (as pretrain.py)
    python bench.py --gpu-check --out g.json # the one prepared GPU check (< 6 min on one H100, compilation included)
    python bench.py --quick                  # a CPU smoke run (< 2 min on 2 cores); its numbers say nothing about GPUs
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
import subprocess
import sys
import tempfile
import time

import torch
from torchvision.transforms import v2

import data
import demo
import losses
import methods
import pretrain
import pretrainer
import rundir
import vit


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    add = parser.add_argument
    add("--quick", action="store_true", help="vit_demo at 64 px, batch 16, 3 timed steps, 64 JPEGs: a CPU smoke run")
    add("--gpu-check", action="store_true", help="the prepared GPU check: the scoring kernel, SimCLR, DenseCL++* exact "
        "(with and without the kernel) and scored on 16 tokens, ours vs timm, e2e from JPEGs with every core, a "
        "pretrain.py run, profiles; no data part")
    add("--model", default=None, help="backbone config of vit.py (default vit_small; --quick: vit_demo)")
    add("--img-size", type=int, default=None, help="view size (default 224; --quick: 64)")
    add("--batch-size", type=int, default=None, help="images per step, two views each (default 256; --quick: 16)")
    add("--steps", type=int, default=None, help="timed steps per row (default 20; --quick: 3)")
    add("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 5; --quick: 1)")
    add("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the data and e2e parts")
    add("--jpeg-dir", default=None, help="folder for the synthetic JPEGs, kept and reused (default: a temp dir)")
    add("--n-jpegs", type=int, default=None, help="synthetic COCO-sized JPEGs (default 512; --quick: 64)")
    add("--crop", type=int, default=224, help="view size of the data part: the pretraining size, also with --quick "
        "(the data rows measure CPU work)")
    add("--threads", type=int, default=None, help="torch threads of the main process (default: torch's; --quick on "
        "CPU: 1, as 2+ OpenMP threads next to loader workers or another busy process on a small CPU slow down 30x)")
    add("--skip", default="", help="comma-separated parts to leave out: kernel, train, vit, data, e2e, run, prof (e2e "
        "and prof run inside train)")
    add("--run-steps", type=int, default=None, help="steps of the pretrain.py run (default 48, --quick: 4; 0 = no run)")
    add("--profile", default=None, help="comma-separated train rows to profile (default: none; --gpu-check: DenseCL++* "
        "exact and scored on 16 tokens)")
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
UNFUSED = "DenseCL++* (+N=64) scoring unfused"  # the step as before the kernel (the same on CPU: no kernel there)
GPU_CHECK = ("SimCLR", "DenseCL++* (+N=64)", UNFUSED, "DenseCL++* scored on 16 tokens")  # the rows of --gpu-check
GPU_E2E = ("SimCLR", "DenseCL++* scored on 16 tokens")
MEAN, STD = data.IMAGENET_MEAN, data.IMAGENET_STD
KERNEL_CONFIGS = [(64, 128, 8, 8, 3), (32, 128, 8, 4, 3), (32, 256, 8, 8, 3), (64, 256, 8, 8, 3), (16, 256, 8, 8, 4),
                  (64, 128, 1, 4, 3), (128, 128, 4, 8, 3), (32, 128, 16, 4, 4), (64, 256, 16, 8, 3), (64, 256, 8, 8, 4),
                  (64, 256, 4, 8, 3), (16, 128, 8, 4, 4)]  # BLOCK_T, BLOCK_K, GROUP, warps, stages of the kernel sweep


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, warmup, steps):
    """Median seconds of fn() over `steps` calls after `warmup` calls (CUDA event pairs on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
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
    opt = torch.optim.AdamW(pretrain.param_groups(model, pargs.wd), lr=pargs.lr, betas=(0.9, 0.95), fused=cuda or None)
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


def bench_train(cfg, device, files, rows, save):
    """Part 1, and parts e2e and prof for their configs (reusing the compiled step)."""
    cuda, B, S = device.type == "cuda", cfg.batch_size, cfg.img_size
    T = (S // vit.CONFIGS[cfg.model]["patch_size"]) ** 2
    peak, simclr_time = rundir.peak_flops(device), None  # SimCLR runs first: the reference of the ratios
    for objective in cfg.objectives:
        flags, name = objective_flags(objective, T)
        pargs = pretrain.resolve_args(["--data", "unused"] + size_flags(cfg) + flags)
        row, model, step, x = {"part": "train", "name": name, "objective": objective, "flags": flags}, None, None, None
        t0, kernel = time.perf_counter(), losses.triton
        try:
            free(device)
            losses.triton = None if objective == UNFUSED else kernel  # the fused scoring off for this row only
            model, step, photometric = train_step(pargs, device)
            x = torch.randn(2 * B, 3, S, S, device=device)
            t = median_time(lambda: step(x), device, cfg.warmup, cfg.steps)
            simclr_time = t if objective == "SimCLR" else simclr_time
            flops = 3 * vit.vit_flops(model.backbone.config, S) * 2 * B
            row.update(img_s=B / t, views_s=2 * B / t, step_ms=1e3 * t, mfu=100 * flops / t / peak if peak else None,
                       mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                       ratio=t / simclr_time if simclr_time else None, wall_s=time.perf_counter() - t0)
            rows.append(row)
            save()
            if objective in cfg.profile:
                bench_profile(cfg, device, name, step, x, rows)
            if objective in cfg.e2e and files:
                bench_e2e(cfg, device, files, name, step, photometric, x, rows)
        except torch.cuda.OutOfMemoryError:
            row["oom"] = True
            rows.append(row)
        except Exception as e:  # one broken row must not cost the rest of a GPU check
            row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            rows.append(row)
            print(f"error in train row {name}: {row['error'][:400]}", file=sys.stderr, flush=True)
        finally:
            losses.triton = kernel
        print(f"  [{time.perf_counter() - cfg.t_start:.0f} s] train {name}: {row.get('step_ms', float('nan')):.1f} ms",
              flush=True)
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
    every = pretrain.get_args_parser().get_default("ccrop_every")
    rows.append({"part": "train", "name": f"ContrastiveCrop (pass every {every} ep)", "objective": "ccrop",
                 "img_s": B / t, "ratio": 1 + (t / B) / (simclr_time / B) / every if simclr_time else None})
    free(device)


def bench_e2e(cfg, device, files, name, step, photometric, x, rows):
    """Part e2e: steps/s (wall clock, data waits included) fed by the JPEG loader as in pretrain.py (workers,
    pinned memory, data.device_batches, the compiled photometric ops on the device) against the same steps on
    the batch x already there. The loader is first run for one batch per worker (start-up, and the photometric
    compilation), then timed over 3x the steps of the other parts."""
    B, cuda = cfg.batch_size, device.type == "cuda"
    warmup, n = max(cfg.warmup, cfg.workers), 3 * cfg.steps
    loader = torch.utils.data.DataLoader(
        data.TwoViews(files, cfg.img_size), batch_size=B, num_workers=cfg.workers, collate_fn=data.two_view_batch,
        sampler=[i % len(files) for i in range((warmup + n) * B)], pin_memory=cuda,
        prefetch_factor=4 if cfg.workers else None)

    def batches():
        for views, _ in data.device_batches(loader, device, photometric):
            yield views

    def steps_per_s(feed, k):
        sync(device)
        t0 = time.perf_counter()
        for xb in itertools.islice(feed, k):
            step(xb)
        sync(device)
        return k / (time.perf_counter() - t0)

    on_device = steps_per_s(itertools.repeat(x), n)
    feed = batches()
    steps_per_s(feed, warmup)
    fed = steps_per_s(feed, n)
    feed.close()
    for label, v in (("on device", on_device), ("JPEG loader", fed)):
        rows.append({"part": "e2e", "name": f"{name} {label}", "steps_s": v, "img_s": v * B, "ratio": v / on_device,
                     "workers": cfg.workers})


def bench_profile(cfg, device, name, step, x, rows, n=3, top=25):
    """Part prof: torch.profiler over n steps (after the timed ones, so compiled and warm); the `top` kernels by
    self device time (CPU ops on CPU), each with its share of the profiled total."""
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
                              "share": getattr(e, attr) / total, "calls_per_step": e.count / n} for e in kernels]})


def triton_cdiv(a, b):
    return -(-a // b)


def bench_kernel(cfg, device, rows, beta=0.5, M=256, D=128):
    """Part kernel (CUDA with triton): losses._guided_choice at the bench size, the fused Triton score against
    the two torch ops (bf16 product, float32 sum), on clustered unit tokens (cosines spread over [-0.5, 1], as
    trained features, not the ~0 of random ones): median times, the largest error of each score table against
    float64 on 8 anchor views, and how often each picks the float64 choice's set."""
    if device.type != "cuda" or losses.triton is None:
        rows.append({"part": "kernel", "name": "no CUDA or no triton: skipped"})
        return
    B, T = cfg.batch_size, (cfg.img_size // vit.CONFIGS[cfg.model]["patch_size"]) ** 2
    g = torch.Generator(device).manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(64, D, device=device, generator=g), dim=-1)
    pick = torch.randint(64, (2, B, T), device=device, generator=g)
    z = protos[pick] + 0.8 * torch.randn(2, B, T, D, device=device, generator=g) / D ** 0.5
    z = torch.nn.functional.normalize(z, dim=-1).to(torch.bfloat16)
    z_all, img = z.reshape(2 * B, T, D), torch.arange(B, device=device)
    r = torch.randint(T, (M, 2 * B), device=device, generator=g)
    own = torch.stack([img, B + img], -1)[None].expand(2, B, 2)
    row = {"part": "kernel", "name": f"thresholded set score, B={B} T={T} M={M}", "beta": beta}
    try:
        with torch.no_grad():
            want = losses._guided_choice(z.double(), z_all.double(), r, own, beta, fused=False)
            exact = losses._threshold_sum(z_all[:8].double(), z_all.reshape(-1, D).double(), beta, False)
            for fused in (True, False):
                key = "fused" if fused else "unfused"
                t = median_time(lambda: losses._guided_choice(z, z_all, r, own, beta, fused=fused), device,
                                cfg.warmup, cfg.steps)
                table = losses._threshold_sum(z_all[:8], z_all.reshape(-1, D), beta, fused)
                best = losses._guided_choice(z, z_all, r, own, beta, fused=fused)
                row.update({f"{key}_ms": 1e3 * t, f"{key}_max_err": (table.double() - exact).abs().max().item(),
                            f"{key}_same_choice": (best == want).double().mean().item()})
        row["ratio"] = row["fused_ms"] / row["unfused_ms"]
        for T_ in (T, 16):  # every candidate block config: the exact score and the score on 16 tokens
            zt = z_all[:, :T_].contiguous()
            keys = z_all.reshape(-1, D).contiguous()
            for c in KERNEL_CONFIGS:
                out = torch.empty(2 * B, keys.shape[0], device=device)
                kw = dict(zip(("BLOCK_T", "BLOCK_K", "GROUP", "num_warps", "num_stages"), c))
                launch = lambda: losses._threshold_sum_kernel[(triton_cdiv(keys.shape[0], kw["BLOCK_K"]), triton_cdiv(2 * B, kw["GROUP"]))](
                    zt, keys, out, 2 * B, T_, keys.shape[0], D, beta, BLOCK_D=D, PRECISION="tf32", **kw)
                try:
                    t = median_time(launch, device, 2, 10)
                    row.setdefault("configs", []).append(dict(T=T_, ms=1e3 * t, **kw))
                except Exception as e:
                    row.setdefault("configs", []).append(dict(T=T_, error=str(e)[:300], **kw))
    except Exception as e:  # one broken part must not cost the rest of a GPU check
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    rows.append(row)
    print(f"  [{time.perf_counter() - cfg.t_start:.0f} s] kernel: {row}", flush=True)
    free(device)


def bench_vit(cfg, device, rows):
    """Part 2: backbone forward+backward, loss = mean of the output tokens, ours against timm with the same config."""
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


def bench_run(cfg, device, folder, rows):
    """Part run: pretrain.py in its own process, as a user starts it, on the JPEG folder for --run-steps steps
    (DenseCL++* on 16 tokens; on CUDA --compile on --dtype bf16), logging every third of the run; the row
    keeps the last log line (the first window includes start-up and compilation) and the whole output."""
    cuda = device.type == "cuda"
    out_dir = tempfile.mkdtemp(prefix="bench_run_")
    T = (cfg.img_size // vit.CONFIGS[cfg.model]["patch_size"]) ** 2
    flags, name = objective_flags("DenseCL++* scored on 16 tokens", T)
    argv = ["--data", folder, "--out-dir", os.path.join(out_dir, "run"), "--max-steps", str(cfg.run_steps),
            "--log-every", str(max(1, cfg.run_steps // 3)), "--workers", str(cfg.workers), "--warmup", "1",
            "--compile", "on" if cuda else "off", "--dtype", "bf16" if cuda else "fp32"] + size_flags(cfg) + flags
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")] + argv
    row = {"part": "run", "name": f"pretrain.py {name}", "flags": argv}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.run_timeout)
        row.update(returncode=proc.returncode, output=(proc.stdout + proc.stderr)[-4000:])
        log = os.path.join(out_dir, "run", "log.jsonl")
        recs = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
        if recs:
            last = recs[-1]
            row.update(img_s=last["img_per_s"], views_s=2 * last["img_per_s"], mfu=last.get("mfu"),
                       log_line=[ln for ln in proc.stdout.splitlines() if ln.startswith("step ")][-1])
    except subprocess.TimeoutExpired as e:
        row["error"] = f"timed out after {cfg.run_timeout} s: {str(e.stdout or '')[-2000:]}"
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    row["wall_s"] = time.perf_counter() - t0
    rows.append(row)
    print(
        f"  [{time.perf_counter() - cfg.t_start:.0f} s] run: "
        f"{row.get('log_line', row.get('error', row.get('output', '')[-600:]))}",
        flush=True)


class TorchvisionTwoViews(torch.utils.data.Dataset):
    """The baseline: full PIL decode, then the augmentation of METHOD.md 10 per image and view in the worker (PIL
    ops, then to tensor: on a 2-core CPU ~1.5x faster than v2.ToImage first and tensor ops)."""

    def __init__(self, files, S):
        self.files = files
        self.tf = v2.Compose([
            v2.RandomResizedCrop(S, scale=(0.2, 1.0)), v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
            v2.RandomApply([v2.GaussianBlur(2 * int(0.05 * S) + 1, (0.1, 2.0))], p=0.5),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = data.load_rgb(self.files[i])
        return self.tf(img), self.tf(img)


def data_img_s(pipeline, files, S, workers, n_images, batch, device):
    """Images/s (two views each) from DataLoader creation to the last batch ready. pipeline: "ours" (loader
    workers + photometric on `device`), "loader" (ours without the photometric part: the CPU cost per process
    when the photometric ops run on a GPU) or "torchvision"."""
    ours = pipeline != "torchvision"
    ds = data.TwoViews(files, S) if ours else TorchvisionTwoViews(files, S)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=[i % len(files) for i in range(n_images)],
                                         num_workers=workers, collate_fn=data.two_view_batch if ours else None,
                                         pin_memory=device.type == "cuda")
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # one process: as in a loader worker
    try:
        sync(device)
        t0 = time.perf_counter()
        for b in loader:
            if pipeline == "ours":  # on CPU this counts the photometric ops; on CUDA they run on the GPU
                _ = [data.photometric(b[f"view{i}"].to(device, non_blocking=True), b[f"photo{i}"].to(device))
                     for i in (1, 2)]
            elif pipeline == "loader":
                _ = [b[f"view{i}"].to(device, non_blocking=True) for i in (1, 2)]
            else:
                _ = [v.to(device, non_blocking=True) for v in b]
        sync(device)
        return n_images / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def bench_data(cfg, device, files, rows):
    """Part 3: one process (num_workers=0), then --workers workers; ours with and without the photometric ops
    against torchvision doing everything."""
    batch = min(32, cfg.batch_size)
    names = {"ours": "ours", "loader": "ours, loader only", "torchvision": "torchvision"}
    for workers in sorted({0, cfg.workers}):
        n = len(files) if workers == 0 else max(len(files), 8 * batch * workers)
        n -= n % batch
        for name in ("ours", "torchvision"):  # warm the page cache and the imports once
            data_img_s(name, files, cfg.crop, 0, batch, batch, device)
        img_s = {name: data_img_s(name, files, cfg.crop, workers, n, batch, device) for name in names}
        label = "1 process" if workers == 0 else f"{workers} workers"
        for name, title in names.items():
            rows.append({"part": "data", "name": f"{title}, {label}", "img_s": img_s[name], "views_s": 2 * img_s[name],
                         "ratio": img_s[name] / img_s["torchvision"]})


def fmt(v, width, digits):
    return f"{'-' if v is None else f'{v:.{digits}f}':>{width}}"


def print_table(rows, header):
    print(header)
    print(f"{'part':<6}{'row':<44}{'img/s':>10}{'views/s':>10}{'steps/s':>9}{'MFU %':>7}{'mem GiB':>9}{'ratio':>8}")
    explain = {"train": "ratio: step time / SimCLR's", "vit": "ratio: time ours / time timm",
               "data": "ratio: img/s ours / torchvision's (same number of processes)",
               "e2e": "ratio: steps/s JPEG loader / on device (wall clock over all timed steps)",
               "run": "pretrain.py in its own process: its last log line (img/s and MFU over that log window)"}
    part = None
    for r in rows:
        if r["part"] in ("prof", "kernel"):
            continue
        if r["part"] != part:
            part = r["part"]
            print(f"  -- {explain[part]}")
        if r.get("oom") or r.get("error"):
            print(f"{r['part']:<6}{r['name']:<44}{'OOM' if r.get('oom') else 'error: ' + r['error'][:300]:>10}")
            continue
        print(f"{r['part']:<6}{r['name']:<44}{fmt(r.get('img_s'), 10, 1)}{fmt(r.get('views_s'), 10, 1)}"
              f"{fmt(r.get('steps_s'), 9, 2)}{fmt(r.get('mfu'), 7, 1)}{fmt(r.get('mem_gb'), 9, 2)}"
              f"{fmt(r.get('ratio'), 8, 2)}")
    for r in rows:
        if r["part"] == "kernel":
            print(f"kernel {r['name']}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in r.items() if k not in ("part", "name")))
        if r["part"] == "prof":
            print(f"  -- profile of {r['name']}: {r['total_ms_per_step']:.2f} ms of kernels per step; the top ones")
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
    """Sizes (full: ViT-S at 224 px, batch 256; --quick: the demo ViT at 64 px, batch 16) and the parts and rows
    of the full bench or of --gpu-check (fewer timed steps: it must fit in 6 minutes with compilation)."""
    for k, full, quick in (("model", "vit_small", "vit_demo"), ("img_size", 224, 64), ("batch_size", 256, 16),
                           ("steps", 20, 3), ("warmup", 5, 1), ("n_jpegs", 512, 64), ("run_steps", 48, 4)):
        if getattr(cfg, k) is None:
            setattr(cfg, k, quick if cfg.quick else full)
    skip = set(cfg.skip.split(",")) - {""}
    if cfg.gpu_check:
        cfg.objectives, cfg.e2e, skip = GPU_CHECK, GPU_E2E, skip | {"data"}
        cfg.steps, cfg.warmup = (3, 1) if cfg.quick else (10, 3)
        cfg.n_jpegs = max(cfg.n_jpegs, 64 if cfg.quick else 4096)  # 16 steps an epoch for the pretrain.py run
        cfg.profile = "DenseCL++* (+N=64),DenseCL++* scored on 16 tokens" if cfg.profile is None else cfg.profile
    else:
        cfg.objectives, cfg.e2e, skip = list(OBJECTIVES), E2E, skip | {"run"}
    cfg.profile = [] if "prof" in skip else [o for o in (cfg.profile or "").split(",") if o]
    if set(cfg.profile) - set(OBJECTIVES):
        parser.error(f"--profile: unknown rows {sorted(set(cfg.profile) - set(OBJECTIVES))}; expected names from "
                     f"{list(OBJECTIVES)}")
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
    header = (f"bench.py | {name} | torch {torch.__version__} | {cfg.model} {cfg.img_size} px, batch {cfg.batch_size} "
              f"(x2 views) | {'bf16 autocast + torch.compile' if device.type == 'cuda' else 'fp32 eager'} | "
              f"median of {cfg.steps} steps after {cfg.warmup} | data: {cfg.n_jpegs} JPEGs, {cfg.crop} px crops, "
              f"{cfg.workers} workers | {torch.get_num_threads()} torch threads")
    if device.type == "cpu":
        header += (f"\nnote: CPU numbers say nothing about GPU speed; load average {os.getloadavg()[0]:.1f} at the "
                   f"start (other processes on these {os.cpu_count()} cores skew the timings)")
    print(header, flush=True)
    cfg.t_start, env, rows = time.perf_counter(), environment(device), []
    tmp = None if cfg.jpeg_dir else tempfile.mkdtemp(prefix="bench_jpegs_")

    def save():  # after every row: a check cut short still leaves what it measured
        if cfg.out:
            config = {k: v for k, v in vars(cfg).items() if k != "t_start"}
            with open(cfg.out + ".tmp", "w") as fh:
                json.dump({"header": header, "environment": env, "config": config, "rows": rows}, fh, indent=1)
            os.replace(cfg.out + ".tmp", cfg.out)
    try:
        folder = cfg.jpeg_dir or tmp
        files = demo.make_jpegs(folder, cfg.n_jpegs) if {"data", "e2e", "run"} - skip else []
        for part, run in (("kernel", lambda: bench_kernel(cfg, device, rows)),
                          ("train", lambda: bench_train(cfg, device, [] if "e2e" in skip else files, rows, save)),
                          ("vit", lambda: bench_vit(cfg, device, rows)),
                          ("run", lambda: bench_run(cfg, device, folder, rows)),
                          ("data", lambda: bench_data(cfg, device, files, rows))):
            if part not in skip and (part != "run" or cfg.run_steps):
                run()
                save()
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    order = ["train", "vit", "data", "e2e", "run", "kernel", "prof"]
    rows.sort(key=lambda r: order.index(r["part"]))  # stable: e2e rows are measured with the train rows
    print_table(rows, header)
    print(f"bench time {time.perf_counter() - cfg.t_start:.0f} s")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
